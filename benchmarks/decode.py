"""Greedy decode tokens/s: litllm vs transformers' `generate`, same checkpoint, prompt, dtype and machine.

    python benchmarks/decode.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
    python benchmarks/decode.py --device cuda --dtypes bfloat16,float16

Both sides run on --device (default: cuda when available); each token comes back to Python as it is chosen, so the
timings hold the GPU's work.

Where `llama_cpp` (llama-cpp-python) is importable, the same prompt also runs through llama.cpp on the checkpoint
exported by `litllm convert to_gguf` in f16, the CPU inference anchor (and the table says when it is not).
Prints one table and appends it to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import append_results, machine

from litllm import LLM
from litllm.decode import generate_tokens
from litllm.tokenizer import Tokenizer

PROMPT = [{"role": "user", "content": "Explain in detail how a steam engine works, step by step."}]


def time_litllm(llm: LLM, prompt_ids: list[int], new_tokens: int) -> tuple[float, list[int]]:
    start = time.perf_counter()
    # no stop ids: exactly new_tokens
    tokens = list(generate_tokens(llm.model, prompt_ids, new_tokens, decode_step=llm.decode_step))
    return time.perf_counter() - start, tokens


def time_llama_cpp(checkpoint_dir: Path, prompt_ids: list[int], new_tokens: int, repeats: int
                   ) -> tuple[float, list[int]]:
    """Best of `repeats` greedy runs of llama.cpp on the checkpoint exported to an f16 GGUF: (seconds, tokens), as
    the other sides are timed (prompt included)."""
    import llama_cpp
    import llama_cpp.llama_cpp as llama_cpp_lib

    from litllm.convert.to_gguf import to_gguf

    default_params = llama_cpp_lib.llama_model_default_params

    def params():  # weights as stored: ggml's AMX repacking dies with SIGILL on machines that list AMX unenabled
        p = default_params()
        p.use_extra_bufts = False
        return p

    llama_cpp_lib.llama_model_default_params = params
    with tempfile.TemporaryDirectory() as tmp:
        gguf_file = to_gguf(checkpoint_dir, Path(tmp) / "model-f16.gguf", dtype="f16")
        # logits_all, as benchmarks/llamacpp.py reads them (llm.scores row by row)
        llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=len(prompt_ids) + new_tokens + 8, verbose=False,
                              logits_all=True, n_threads=torch.get_num_threads(),
                              n_threads_batch=torch.get_num_threads())
        runs = []
        for _ in range(repeats + 1):  # the first is a warm-up
            llm.reset()
            start = time.perf_counter()
            llm.eval(prompt_ids)
            tokens = []
            for _ in range(new_tokens):
                tokens.append(int(llm.scores[llm.n_tokens - 1].argmax()))
                llm.eval(tokens[-1:])
            runs.append((time.perf_counter() - start, tokens))
        return min(runs[1:])


@torch.inference_mode()
def time_transformers(model, prompt_ids: list[int], new_tokens: int) -> tuple[float, list[int]]:
    ids = torch.tensor([prompt_ids], device=model.device)
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return time.perf_counter() - start, out[0, len(prompt_ids):].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint_dir", type=Path, default=Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"))
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="best of N timed runs per side")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no_append", action="store_true", help="print the table, leave RESULTS.md alone")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    prompt_ids = Tokenizer(args.checkpoint_dir).encode_chat(PROMPT)
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        hf = AutoModelForCausalLM.from_pretrained(args.checkpoint_dir, dtype=dtype).to(args.device).eval()
        eager = LLM.load(args.checkpoint_dir, dtype=dtype, device=args.device)
        compiled = LLM.load(args.checkpoint_dir, dtype=dtype, device=args.device, compile=True)  # as `--compile true`
        time_transformers(hf, prompt_ids, 8), time_litllm(eager, prompt_ids, 8)  # warm-up
        compile_seconds = time_litllm(compiled, prompt_ids, 8)[0]  # compiles the decode step
        runs = []
        for _ in range(args.repeats):  # the three take turns, so a slow spell of the machine hits each alike
            runs.append((time_transformers(hf, prompt_ids, args.new_tokens),
                         time_litllm(eager, prompt_ids, args.new_tokens),
                         time_litllm(compiled, prompt_ids, args.new_tokens)))
        theirs, ours, ours_compiled = (min(side) for side in zip(*runs))
        same = sum(a == b for a, b in zip(ours[1], theirs[1]))
        same_compiled = ours_compiled[1] == ours[1]
        rows.append((dtype_name, theirs[1], args.new_tokens / theirs[0], args.new_tokens / ours[0], theirs[0] / ours[0],
                     args.new_tokens / ours_compiled[0], theirs[0] / ours_compiled[0], compile_seconds,
                     f"{same}/{args.new_tokens}", "yes" if same_compiled else "no"))
        print(rows[-1][0], rows[-1][2:], file=sys.stderr)
        del eager, compiled, hf

    header = ["dtype", "transformers tok/s", "litllm tok/s", "speed-up", "litllm compiled tok/s",
              "speed-up compiled", "compile s", "greedy tokens equal to transformers'", "compiled = eager"]
    lines = [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}"]
    for name, _, hf_tps, tps, ratio, ctps, cratio, compile_s, same, same_compiled in rows:
        lines.append(f"| {name} | {hf_tps:.1f} | {tps:.1f} | {ratio:.2f}x | {ctps:.1f} | {cratio:.2f}x | "
                     f"{compile_s:.0f} | {same} | {same_compiled} |")
    if args.device != "cpu":
        lines.append(f"\nllama.cpp: not measured (the CPU anchor; this run is on {args.device})")
    elif importlib.util.find_spec("llama_cpp") is None:
        lines.append("\nllama.cpp: not measured (llama_cpp, from the llama-cpp-python package, is not importable here)")
    else:
        seconds, tokens = time_llama_cpp(args.checkpoint_dir, prompt_ids, args.new_tokens, args.repeats)
        anchor = args.new_tokens / seconds
        lines += ["", "| llama.cpp f16 tok/s | dtype | litllm / llama.cpp | litllm compiled / llama.cpp | "
                      "llama.cpp greedy tokens equal to transformers' |", "|---|---|---|---|---|"]
        for name, hf_tokens, _, tps, _, ctps, *_ in rows:
            same = sum(a == b for a, b in zip(tokens, hf_tokens))
            lines.append(f"| {anchor:.1f} | {name} | {tps / anchor:.2f}x | {ctps / anchor:.2f}x | "
                         f"{same}/{args.new_tokens} |")
    table = "\n".join(lines)
    print(table)
    if args.no_append:
        return
    append_results(
        title=f"Greedy decode, {args.checkpoint_dir.name}, {len(prompt_ids)}-token prompt, {args.new_tokens} new tokens",
        command="python " + " ".join(sys.argv),
        table=table,
        notes=f"{machine()}; best of {args.repeats} runs per side, taking turns, after a warm-up; batch 1. 'compiled' is "
              "`LLM.load(..., compile=True)` (`--compile true`): the decode step under torch.compile; 'compile s' "
              "is its one-off cost. In bfloat16/float16 greedy tokens can part from transformers' where two "
              "logits tie within half-precision rounding.",
    )


if __name__ == "__main__":
    main()
