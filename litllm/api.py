"""The Python API: `LLM.load(checkpoint_dir)` then `generate`, `chat`, `model`, `tokenizer`."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from litllm.checkpoint import check_checkpoint_dir, inference_dtype, load_model, parse_device
from litllm.decode import (OneTokenStep, compiled_step, generate_tokens, inference_linears,
                           one_row_kernel, one_row_steps, stream_text)
from litllm.lora import load_adapter, merge_lora
from litllm.memory import weights_on_huge_pages
from litllm.model import GPT, fuse_projections
from litllm.tokenizer import Tokenizer


class LLM:
    def __init__(self, model: GPT, tokenizer: Tokenizer, checkpoint_dir: Path, compile: bool = False,
                 one_row: bool = False) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.checkpoint_dir = checkpoint_dir
        # one-token decode steps are many tiny ops: compiling fuses them (measured in benchmarks/decode.py), and
        # eager on a CPU, OneTokenStep runs them without the modules' Python overhead; the prompt's prefill stays
        # eager and the model's own, as its length changes from call to call
        step = compiled_step(model) if compile else OneTokenStep(model)
        self.decode_step = one_row_steps(step) if one_row else step

    @classmethod
    def load(
        cls,
        checkpoint_dir: Path | str,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        adapter: Path | str | None = None,
        compile: bool = False,
        batched: bool = False,
    ) -> "LLM":
        """Load a Hugging Face model dir. dtype defaults to float32 on CPU and the checkpoint's dtype on GPU
        (CPU matmuls in bf16/fp16 are slower to train and less exact; GPUs want the half types).

        `adapter` is a LoRA adapter dir (PEFT format) for this checkpoint; it is merged into the weights, so
        decoding costs what the base model's does. `compile` compiles the decode step with torch.compile:
        faster per token (most in bfloat16/float16), at a one-off cost of about a minute on a small CPU. `batched`
        is for decoding several sequences together (the server): products of a few rows, whose fastest CPU kernel
        can differ from a single stream's (decode.one_row_kernel)."""
        checkpoint_dir = check_checkpoint_dir(checkpoint_dir)
        device = parse_device(device)
        model = load_model(checkpoint_dir, dtype=inference_dtype(dtype, device), device=device)
        tokenizer = Tokenizer(checkpoint_dir)
        if adapter is not None:
            load_adapter(model, adapter, base_checkpoint=checkpoint_dir)
            model = merge_lora(model)
        fuse_projections(model)
        one_row = device.type == "cpu" and not batched and one_row_kernel(model.embed_tokens.weight.dtype)
        inference_linears(model, pack=not one_row)  # CPU: few-row products over all threads, fast 16-bit ones
        weights_on_huge_pages(model)  # before the decode step binds views of the weights
        return cls(model, tokenizer, checkpoint_dir, compile=compile, one_row=one_row)

    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float = 1.0,
        stop: list[str] | None = None,
        seed: int | None = None,
        stream: bool = False,
    ) -> str | Iterator[str]:
        """Complete the raw `prompt` (no chat template). With stream=True, yield text pieces as they come."""
        return self._complete(self.tokenizer.encode(prompt), max_new_tokens, temperature, top_k, top_p,
                              stop, seed, stream)

    def chat(self, messages: list[dict[str, str]] | str, stream: bool = False, **kwargs) -> str | Iterator[str]:
        """Answer a conversation (a list of {"role", "content"}, or one user message) with the chat template."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        prompt_ids = self.tokenizer.encode_chat(messages, add_generation_prompt=True)
        return self._complete(prompt_ids, stream=stream, **kwargs)

    def _complete(self, prompt_ids, max_new_tokens=128, temperature=0.0, top_k=None, top_p=1.0, stop=None,
                  seed=None, stream=False):
        tokens = generate_tokens(self.model, prompt_ids, max_new_tokens, temperature, top_k, top_p,
                                 stop_ids=self.tokenizer.stop_ids, seed=seed, decode_step=self.decode_step)
        pieces = stream_text(self.tokenizer, tokens, stop)
        return pieces if stream else "".join(pieces)
