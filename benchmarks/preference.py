"""Step speed and peak RSS of the preference losses: DPO (reference = the model with its adapters off, scored every
step) against the reference-free SimPO and ORPO, with LoRA, on the same pairs, model and machine.

    python benchmarks/preference.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
    python benchmarks/preference.py --steps 3 --no_append     # a quick look

Each loss trains in its own process (`--worker`, through `litllm.finetune.dpo.setup` as the CLI runs it), so its
peak RSS is its own. The pairs are the first rows of data/hh_rlhf_demo.jsonl; the seed fixes the order, so every
loss sees the same batches. tokens/s is the mean of the logged per-step rates after the first step. Prints one table
and appends it to benchmarks/RESULTS.md (unless --no_append).
"""
from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from common import append_results, machine

LOSSES = ("sigmoid", "simpo", "orpo")
DATA = Path(__file__).resolve().parents[1] / "data" / "hh_rlhf_demo.jsonl"


def worker(args) -> None:
    from litllm.data import Preference
    from litllm.finetune import dpo
    from litllm.lora import LoRAConfig
    from litllm.training.args import TrainArgs

    with tempfile.TemporaryDirectory() as out_dir:
        train = TrainArgs(global_batch_size=args.batch_size, micro_batch_size=args.batch_size, max_steps=args.steps,
                          max_seq_length=args.seq_len, lr=5e-4, warmup_steps=0, eval_interval=None,
                          save_interval=None)
        dpo.setup(args.checkpoint_dir, out_dir=Path(out_dir), data=Preference(json_path=DATA, val_split_fraction=0.0),
                  train=train, dpo=dpo.DPOArgs(loss=args.loss, beta=2.0 if args.loss == "simpo" else 0.1),
                  lora=LoRAConfig(r=8, alpha=16, dropout=0.0))
        rows = list(csv.DictReader(open(next(Path(out_dir).glob("logs/version_*/metrics.csv")))))
    rates = [float(row["tokens_per_sec"]) for row in rows if row.get("tokens_per_sec") and int(row["step"]) > 1]
    print(json.dumps({"tokens_per_sec": sum(rates) / len(rates),
                      "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint_dir", type=Path,
                        default=Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch_size", type=int, default=4, help="pairs per step")
    parser.add_argument("--seq_len", type=int, default=256, help="--train.max_seq_length")
    parser.add_argument("--no_append", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--loss", choices=LOSSES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    results = {}
    for loss in LOSSES:
        command = [sys.executable, __file__, "--worker", "--loss", loss, "--checkpoint_dir", str(args.checkpoint_dir),
                   "--steps", str(args.steps), "--batch_size", str(args.batch_size), "--seq_len", str(args.seq_len)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{loss} failed:\n{done.stderr[-3000:]}")
        results[loss] = json.loads(done.stdout.strip().splitlines()[-1])
        print(loss, results[loss], file=sys.stderr)

    dpo = results["sigmoid"]
    lines = ["| loss | reference pass | tokens/s | speed vs DPO | peak RSS GB | RSS vs DPO |", "|---|---|---|---|---|---|"]
    for loss, result in results.items():
        lines.append(f"| {'dpo (sigmoid)' if loss == 'sigmoid' else loss} | "
                     f"{'adapters off, every step' if loss == 'sigmoid' else 'none'} | "
                     f"{result['tokens_per_sec']:.1f} | {result['tokens_per_sec'] / dpo['tokens_per_sec']:.2f}x | "
                     f"{result['rss_gb']:.2f} | {result['rss_gb'] / dpo['rss_gb']:.2f} |")
    table = "\n".join(lines)
    print(table)
    if not args.no_append:
        name = args.checkpoint_dir.name
        notes = (f"{machine()}; LoRA r=8 alpha=16 dropout 0 on every linear layer (litllm's default targets), "
                 f"32-true, {args.batch_size} pairs of at most {args.seq_len} tokens per step from hh_rlhf_demo.jsonl, "
                 f"{args.steps} steps, tokens/s the mean of the logged rates after step 1; each loss in its own "
                 "process (peak RSS: its ru_maxrss, model loading included).")
        append_results(f"Preference losses, {name}, LoRA, {args.batch_size} pairs x {args.seq_len} tokens",
                       "python benchmarks/preference.py " + " ".join(sys.argv[1:]), table, notes)


if __name__ == "__main__":
    main()
