"""llama.cpp runs litllm's GGUF exports as litllm runs the checkpoint: loading, tokenization, logits, greedy tokens.

    python benchmarks/llamacpp.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \\
        --adapter_dir out/finetune/smollm2-135m-lora/final --korean_dir out/ko/merged --tiny_families

Needs llama-cpp-python (`pip install llama-cpp-python` builds llama.cpp from source: about 15 minutes on 2 cores).
Exports written fresh with `litllm convert to_gguf`: the checkpoint in f16, bf16 and q8_0; the adapter merged with
`convert merge_lora` then f16 (the path of issue 18); the Korean pipeline's output (extended tokenizer) in f16 and
q8_0; and with --tiny_families a tiny random model of every family with its family's real pre-tokenizer, and a
tiny Llama with a Llama 2 style sentencepiece tokenizer (tests/family_tokenizers.py), in f16 and q8_0. For each,
llama.cpp (through llama-cpp-python) must:

- load the file;
- tokenize English and Korean texts (special tokens parsed) to litllm's ids;
- render the chat template stored in the file to the same prompt ids as litllm;
- give first-step logits (the next-token scores after a chat prompt) within a tolerance of litllm's float32 logits
  on the source checkpoint, relative to the largest logit: f16 1.5e-3, bf16 and q8_0 1.5e-2 (llama.cpp rounds
  weights and activations to the format; bf16 keeps 8 significant bits, q8_0 8-bit blocks);
- and greedy-decode a 32-token continuation, compared token by token with litllm's, and timed.

Prints one table and appends it to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from common import append_results, machine

import llama_cpp
import llama_cpp.llama_cpp as llama_cpp_lib
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from litllm.checkpoint import hf_to_litllm, load_model
from litllm.convert.from_gguf import hf_state_dict
from litllm.convert.merge_lora import merge_lora
from litllm.convert.to_gguf import to_gguf
from litllm.tokenizer import Tokenizer

TOLERANCES = {"f16": 1.5e-3, "bf16": 1.5e-2, "q8_0": 1.5e-2}  # max |logit difference| / max |logit|
NEW_TOKENS = 32
ENGLISH = [
    "Hello, world! It's 2024: the quick brown fox jumps over the lazy dog.",
    "def f(x):\n\treturn x ** 2  # squares\n\n\n    indented   spaces   ",
    "Prices rose 3.14159% to $1,234,567.89 on 2024-12-31; CamelCase HTTPServer naïve café!!!",
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
]
KOREAN = [
    "안녕하세요, 만나서 반갑습니다. 오늘 날씨가 정말 좋네요!",
    "이 영화 정말 재밌어요 ㅋㅋㅋ 배우들 연기가 최고였고 123,456명이 봤대요.",
    "<|im_start|>user\n한국어로 대답해 주세요: 서울의 인구는?<|im_end|>\n<|im_start|>assistant\n",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    [{"role": "user", "content": "오늘 너무 피곤해. 어떻게 하면 좋을까?"}],
]


@dataclass
class Export:
    name: str
    source_dir: Path  # what litllm runs: the checkpoint the GGUF was written from
    dtype: str


@dataclass
class Result:
    loads: bool
    english: str = "-"
    korean: str = "-"
    chat_prompts: str = "-"
    logit_diff: float = float("nan")
    rounding_diff: float = float("nan")
    greedy: str = "-"
    tokens_per_second: float = float("nan")


def without_weight_repacking() -> None:
    """Load weights as stored. ggml's CPU backend repacks q8_0 weights for AMX where the CPU lists it; where the OS or
    sandbox does not enable AMX (this machine), the first repacked matmul dies with SIGILL. Repacking changes the
    memory layout and speed only, and llama-cpp-python exposes no switch for it, so its default params are wrapped."""
    default_params = llama_cpp_lib.llama_model_default_params

    def params():
        p = default_params()
        p.use_extra_bufts = False
        return p

    llama_cpp_lib.llama_model_default_params = params


@torch.inference_mode()
def litllm_greedy(model, ids: list[int], new_tokens: int) -> tuple[np.ndarray, list[int]]:
    """litllm's float32 first-step logits and greedy continuation (a full forward per token: no cache to trust)."""
    first = None
    ids = list(ids)
    generated = []
    for _ in range(new_tokens):
        logits = model(torch.tensor([ids]))[0, -1]
        first = logits.numpy().copy() if first is None else first
        generated.append(int(logits.argmax()))
        ids.append(generated[-1])
    return first, generated


def model_with_the_files_weights(source_dir: Path, gguf_file: Path) -> torch.nn.Module:
    """litllm's model of source_dir with the GGUF's own weights, dequantized as from_gguf does: how far the format's
    rounding alone moves the logits, to tell that apart from what llama.cpp's arithmetic adds."""
    model = load_model(source_dir, dtype=torch.float32)
    reader = gguf.GGUFReader(gguf_file)
    arch = reader.fields["general.architecture"].contents()
    config = {"model_type": arch, "num_attention_heads": model.config.n_heads,
             "num_key_value_heads": model.config.n_kv_heads}
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    weights = {hf_to_litllm(name): weight for name, weight in hf_state_dict(tensors, config, gguf_file).items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # tied: the embedding
    return model


def llama_cpp_greedy(llm: llama_cpp.Llama, ids: list[int], new_tokens: int) -> tuple[np.ndarray, list[int], float]:
    """llama.cpp's first-step logits, greedy continuation, and decode tokens/s (after the prompt is evaluated)."""
    llm.reset()
    llm.eval(ids)
    first = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
    generated = [int(first.argmax())]
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        llm.eval(generated[-1:])
        generated.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
    return first, generated, (new_tokens - 1) / (time.perf_counter() - start)


def equal_count(pairs: list[tuple[list[int], list[int]]]) -> str:
    return f"{sum(a == b for a, b in pairs)}/{len(pairs)}"


def check(export: Export, gguf_file: Path, threads: int) -> Result:
    try:
        llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=512, logits_all=True, n_threads=threads,
                              verbose=False)
    except ValueError as error:  # llama.cpp printed why on stderr
        print(f"{export.name}: llama.cpp does not load {gguf_file}: {error}", file=sys.stderr)
        return Result(loads=False)
    with contextlib.closing(llm):
        tokenizer = Tokenizer(export.source_dir)

        def ids(text: str) -> tuple[list[int], list[int]]:
            return llm.tokenize(text.encode(), add_bos=True, special=True), tokenizer.encode(text)

        # the chat template as llama-cpp-python applies it: the file's template, the file's BOS/EOS text
        template = llm.metadata["tokenizer.chat_template"]
        bos, eos = (llm.detokenize([i], special=True).decode() if i != -1 else ""
                    for i in (llm.token_bos(), llm.token_eos()))
        formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
        chat_ids = [(llm.tokenize(formatter(messages=chat).prompt.encode(), add_bos=False, special=True),
                     tokenizer.encode_chat(chat)) for chat in CHATS]

        model = load_model(export.source_dir, dtype=torch.float32)
        rounded = model_with_the_files_weights(export.source_dir, gguf_file)
        diffs, rounding_diffs, greedy, speeds = [], [], [], []
        for _, prompt in chat_ids:
            expected_logits, expected_tokens = litllm_greedy(model, prompt, NEW_TOKENS)
            rounded_logits, _ = litllm_greedy(rounded, prompt, 1)
            logits, tokens, speed = llama_cpp_greedy(llm, prompt, NEW_TOKENS)
            diffs.append(np.abs(logits - expected_logits).max() / np.abs(expected_logits).max())
            rounding_diffs.append(np.abs(rounded_logits - expected_logits).max() / np.abs(expected_logits).max())
            same = next((i for i, (a, b) in enumerate(zip(tokens, expected_tokens)) if a != b), NEW_TOKENS)
            greedy.append(f"{same}/{NEW_TOKENS}")
            speeds.append(speed)
        return Result(
            loads=True,
            english=equal_count([ids(text) for text in ENGLISH]),
            korean=equal_count([ids(text) for text in KOREAN]),
            chat_prompts=equal_count(chat_ids),
            logit_diff=max(diffs),
            rounding_diff=max(rounding_diffs),
            greedy=", ".join(greedy),
            tokens_per_second=float(np.mean(speeds)),
        )


def exports(args: argparse.Namespace, work_dir: Path) -> list[Export]:
    found = [Export("SmolLM2-135M-Instruct", args.checkpoint_dir, dtype) for dtype in ("f16", "bf16", "q8_0")]
    if args.adapter_dir is not None:
        merged = merge_lora(args.adapter_dir, work_dir / "lora-merged")
        found.append(Export("SmolLM2 + LoRA, merged", merged, "f16"))
    if args.korean_dir is not None:
        found += [Export("Korean pipeline output", args.korean_dir, dtype) for dtype in ("f16", "q8_0")]
    if args.tiny_families:
        root = Path(__file__).parent.parent
        sys.path.insert(0, str(root / "tests"))
        from family_tokenizers import FAMILY_TOKENIZERS, save_tiny_family, save_tiny_sentencepiece_llama

        for family, tokenizer in FAMILY_TOKENIZERS.items():
            source = save_tiny_family(family, args.checkpoint_dir, work_dir / family)
            if family == "mistral-sliding":
                # a 5-token window tests litllm's sliding attention; llama.cpp's llama architecture has none (to_gguf
                # says so), so this compares at Mistral 7B v0.1's 4096, which the prompts here fit in
                config = json.loads((source / "config.json").read_text())
                (source / "config.json").write_text(json.dumps({**config, "sliding_window": 4096}))
            found += [Export(f"tiny {family} ({tokenizer} tokenizer)", source, dtype) for dtype in ("f16", "q8_0")]
        corpus = [root / "data" / "tiny_shakespeare.txt", root / "data" / "ko_nsmc_reviews.txt"]
        source = save_tiny_sentencepiece_llama(work_dir / "sentencepiece", corpus)
        found += [Export("tiny llama (Llama 2 style sentencepiece)", source, dtype) for dtype in ("f16", "q8_0")]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint_dir", type=Path, required=True, help="SmolLM2-135M-Instruct (HF dir)")
    parser.add_argument("--adapter_dir", type=Path, help="a LoRA adapter of the checkpoint, merged then exported")
    parser.add_argument("--korean_dir", type=Path, help="the Korean pipeline's output (out/ko/merged)")
    parser.add_argument("--tiny_families", action="store_true", help="also a tiny model of every family")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    without_weight_repacking()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work_dir = Path(tmp)
        for export in exports(args, work_dir):
            gguf_file = to_gguf(export.source_dir, work_dir / f"{len(rows)}-{export.dtype}.gguf", dtype=export.dtype)
            result = check(export, gguf_file, args.threads)
            tolerance = TOLERANCES[export.dtype]
            within = "yes" if result.logit_diff <= tolerance else "**no**"
            loads = "yes" if result.loads else "**no**"
            rows.append(f"| {export.name} | {export.dtype} | {loads} | {result.english} | "
                        f"{result.korean} | {result.chat_prompts} | {result.logit_diff:.2e} (≤ {tolerance:.1e}: "
                        f"{within}) | {result.rounding_diff:.2e} | {result.greedy} | {result.tokens_per_second:.1f} |")
            print(rows[-1], flush=True)
            gguf_file.unlink()

    header = ("| export | dtype | loads | EN texts tokenized alike | KO texts tokenized alike | chat prompts alike | "
              "llama.cpp: max abs logit diff / max abs logit | litllm on the file's weights: same | "
              "greedy tokens equal (EN, KO chat) | llama.cpp decode tok/s |\n"
              "|---|---|---|---|---|---|---|---|---|---|")
    table = header + "\n" + "\n".join(rows)
    print(table)
    notes = (f"{machine()}; llama-cpp-python {llama_cpp.__version__} built from source (llama.cpp 0c1e570), "
             f"{args.threads} threads, weights not repacked (AMX repacking dies with SIGILL here). Each export written "
             "fresh by `to_gguf`. Tokenization: llama.cpp with special tokens parsed vs litllm's encode. Chat prompts: "
             "the file's template rendered by llama-cpp-python's Jinja2ChatFormatter vs litllm's encode_chat. "
             "Logits: first step after each chat prompt, llama.cpp vs litllm float32 on the source checkpoint; beside "
             "it the same measure for litllm running the file's own weights (dequantized as from_gguf does): the "
             "format's rounding alone. "
             f"Greedy: {NEW_TOKENS} tokens, equal tokens before the first difference; decode tok/s: llama.cpp's "
             "mean over both prompts after the prompt (with all-position logits kept, as the comparison needs).")
    command = "python benchmarks/llamacpp.py " + " ".join(sys.argv[1:])
    append_results("llama.cpp runs litllm's GGUF exports", command, table, notes)


if __name__ == "__main__":
    main()
