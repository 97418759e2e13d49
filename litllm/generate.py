"""`litllm generate` (complete a raw prompt) and `litllm chat` (talk with the chat template), through LLM."""
from __future__ import annotations

import sys
from pathlib import Path

from litllm.api import LLM


def main(
    checkpoint_dir: Path,
    prompt: str = "What food do llamas eat?",
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: list[str] | None = None,
    adapter: Path | None = None,
    dtype: str | None = None,
    device: str | None = None,
    compile: bool = False,
) -> None:
    """Complete a raw prompt (no chat template) and stream the text to stdout.

    Args:
        checkpoint_dir: a Hugging Face model directory.
        prompt: the text to continue.
        max_new_tokens: at most this many new tokens.
        temperature: 0 decodes greedily; higher samples more freely.
        top_k: sample only among the k most likely tokens.
        top_p: sample only among the most likely tokens covering this probability mass.
        seed: random seed for sampling.
        stop: strings that end the completion (not included).
        adapter: a LoRA adapter directory (PEFT format) to apply to the checkpoint.
        dtype: float32, bfloat16 or float16 (default: float32 on CPU, the checkpoint's on GPU).
        device: cpu or cuda (default: cuda when available).
        compile: torch.compile the decode step: faster tokens after a one-off compile (about a minute on CPU).
    """
    llm = LLM.load(checkpoint_dir, dtype=dtype, device=device, adapter=adapter, compile=compile)
    pieces = llm.generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, seed=seed, stop=stop, stream=True)
    for piece in pieces:
        print(piece, end="", flush=True)
    print()


def chat(
    checkpoint_dir: Path,
    system: str | None = None,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    seed: int | None = None,
    adapter: Path | None = None,
    dtype: str | None = None,
    device: str | None = None,
    compile: bool = False,
) -> None:
    """Chat in the terminal with the checkpoint's chat template; `/exit` (or end of input) quits.

    Args:
        checkpoint_dir: a Hugging Face model directory with a chat template.
        system: an optional system message.
        max_new_tokens: at most this many new tokens per answer.
        temperature: 0 decodes greedily; higher samples more freely.
        top_k: sample only among the k most likely tokens.
        top_p: sample only among the most likely tokens covering this probability mass.
        seed: random seed for sampling.
        adapter: a LoRA adapter directory (PEFT format) to apply to the checkpoint.
        dtype: float32, bfloat16 or float16 (default: float32 on CPU, the checkpoint's on GPU).
        device: cpu or cuda (default: cuda when available).
        compile: torch.compile the decode step: faster tokens after a one-off compile (about a minute on CPU).
    """
    llm = LLM.load(checkpoint_dir, dtype=dtype, device=device, adapter=adapter, compile=compile)
    llm.tokenizer.apply_chat_template([{"role": "user", "content": ""}])  # no template: fail before the prompt
    messages = [{"role": "system", "content": system}] if system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"Chatting with {checkpoint_dir}. Type /exit to quit.")
    while True:
        try:
            text = input(">> You: " if interactive else "")
        except EOFError:
            break
        if text.strip() == "/exit":
            break
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        print(">> Model: " if interactive else "", end="", flush=True)
        answer = ""
        for piece in llm.chat(messages, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                              top_p=top_p, seed=seed, stream=True):
            print(piece, end="", flush=True)
            answer += piece
        print()
        messages.append({"role": "assistant", "content": answer})


if __name__ == "__main__":
    from litllm.cli import run

    run({"generate": main, "chat": chat})
