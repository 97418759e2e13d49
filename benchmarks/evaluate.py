"""lm-eval task time: litllm's backend vs lm-eval's `hf` backend (transformers), same checkpoint, task, dtype, batch.

    python benchmarks/evaluate.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct

Runs the local ARC-Easy task (data/eval/arc_easy, 500 questions) with both backends in one process, checks that
they give the same accuracy, prints one table and appends it to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from common import append_results, machine

from litllm.evaluate import LitLLM

TASK_DIR = Path(__file__).parent.parent / "data" / "eval" / "arc_easy"


def timed_evaluate(lm, task: str, limit: int | None, task_manager) -> tuple[float, dict]:
    from lm_eval import simple_evaluate

    start = time.perf_counter()
    results = simple_evaluate(model=lm, tasks=[task], limit=limit, task_manager=task_manager, bootstrap_iters=0)
    return time.perf_counter() - start, results["results"][task]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint_dir", type=Path, default=Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"))
    parser.add_argument("--task", default="arc_easy_500")
    parser.add_argument("--include_path", type=Path, default=TASK_DIR)
    parser.add_argument("--limit", type=int, default=None, help="first N questions (default: all)")
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    checkpoint_dir = args.checkpoint_dir.resolve()
    os.chdir(args.include_path)  # the task's data_files are relative to its folder
    task_manager = TaskManager(include_path=".")
    backends = {
        "lm-eval hf (transformers)": HFLM(pretrained=str(checkpoint_dir), dtype="float32", device="cpu",
                                          batch_size=args.batch_size),
        "litllm": LitLLM(checkpoint_dir, dtype="float32", device="cpu", batch_size=args.batch_size),
    }
    for lm in backends.values():  # warm-up: the dataset is prepared and the kernels are loaded before timing
        timed_evaluate(lm, args.task, 2, task_manager)
    rows = {name: timed_evaluate(lm, args.task, args.limit, task_manager) for name, lm in backends.items()}
    for name, (seconds, metrics) in rows.items():
        print(name, f"{seconds:.1f} s", metrics, file=sys.stderr)
    (hf_seconds, hf_metrics), (seconds, metrics) = rows.values()
    for metric in ("acc,none", "acc_norm,none"):
        assert metrics[metric] == hf_metrics[metric], f"{metric}: litllm {metrics[metric]} != hf {hf_metrics[metric]}"

    header = ["backend", "seconds", "questions/s", "acc", "acc_norm", "speed-up"]
    lines = [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}"]
    for name, (secs, m) in rows.items():
        lines.append(f"| {name} | {secs:.1f} | {m['sample_len'] / secs:.2f} | {m['acc,none']:.4f} | "
                     f"{m['acc_norm,none']:.4f} | {hf_seconds / secs:.2f}x |")
    table = "\n".join(lines)
    print(table)
    append_results(
        title=f"lm-eval {args.task}, {checkpoint_dir.name}, {metrics['sample_len']} questions, batch {args.batch_size}",
        command="python " + " ".join(sys.argv),
        table=table,
        notes=f"{machine()}; float32, CPU, 0-shot; one timed run per backend after a 2-question warm-up. litllm runs "
              "each distinct context once into the KV cache and its continuations on copies of it, and applies "
              "the output layer only at scored positions; `hf` scores each choice as a whole sequence. Same "
              "accuracy asserted.",
    )


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
