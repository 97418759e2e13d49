"""A reward model trained on real preference pairs, judged on pairs it never saw: held-out pair accuracy before
training (the base model with a fresh score head) and after, and the wall time of training.

    python benchmarks/reward.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
    python benchmarks/reward.py --train_pairs 64 --held_out 32 --no_append     # a quick look

The pairs come from ../shared/data/preference/hh_rlhf_harmless_2k_pcr.jsonl (Anthropic HH-RLHF, harmless-base): the
first --train_pairs rows train (`litllm.finetune.reward.setup`, as `litllm finetune reward` runs it: LoRA r=8 on
every linear layer, a new score head), the last --held_out rows are the test pairs. A pair counts as right when the
reward model scores its chosen conversation above its rejected one (RewardModel.score). Prints one table and appends
it to benchmarks/RESULTS.md (unless --no_append).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from common import append_results, machine

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "preference" / "hh_rlhf_harmless_2k_pcr.jsonl"


def accuracy(model, pairs: list[dict]) -> float:
    chosen = model.score([pair["chosen"] for pair in pairs])
    rejected = model.score([pair["rejected"] for pair in pairs])
    return sum(c > r for c, r in zip(chosen, rejected)) / len(pairs)


def conversations(model, pairs: list[dict]) -> list[dict]:
    """Each hh-rlhf pair's two transcripts as chat messages, rendered as training renders them."""
    from litllm.data import Preference

    data = Preference()
    out = []
    for row in pairs:
        prompt, chosen, rejected = data.conversation(row)
        out.append({side: [*prompt, {"role": "assistant", "content": text}]
                    for side, text in (("chosen", chosen), ("rejected", rejected))})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint_dir", type=Path, default=Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"))
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--train_pairs", type=int, default=512)
    parser.add_argument("--held_out", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--no_append", action="store_true")
    args = parser.parse_args()

    from litllm import RewardModel
    from litllm.checkpoint import load_model
    from litllm.data import Preference
    from litllm.finetune import reward
    from litllm.lora import LoRAConfig
    from litllm.tokenizer import Tokenizer
    from litllm.training.args import TrainArgs

    rows = [json.loads(line) for line in args.data.read_text().splitlines()]
    if args.train_pairs + args.held_out > len(rows):
        raise SystemExit(f"{args.data} has {len(rows)} pairs, fewer than --train_pairs + --held_out")
    held_out = rows[-args.held_out:]

    torch.manual_seed(1337)  # the fresh score head, as training draws it
    untrained = RewardModel(load_model(args.checkpoint_dir, reward=True), Tokenizer(args.checkpoint_dir))
    tests = conversations(untrained, held_out)
    before = accuracy(untrained, tests)
    del untrained

    with tempfile.TemporaryDirectory() as tmp:
        train_file = Path(tmp) / "train.jsonl"
        train_file.write_text("".join(json.dumps(row) + "\n" for row in rows[:args.train_pairs]))
        steps = args.epochs * args.train_pairs // 16
        train = TrainArgs(global_batch_size=16, micro_batch_size=4, max_steps=steps, max_seq_length=args.seq_len,
                          lr=args.lr, warmup_steps=max(1, steps // 10), eval_interval=None, save_interval=None,
                          log_interval=max(1, steps // 8))
        started = time.perf_counter()
        final = reward.setup(args.checkpoint_dir, out_dir=Path(tmp) / "run",
                             data=Preference(json_path=train_file, val_split_fraction=0.0), train=train,
                             lora=LoRAConfig(r=8, alpha=16, dropout=0.0))
        seconds = time.perf_counter() - started
        after = accuracy(RewardModel.load(args.checkpoint_dir, adapter=final), tests)

    table = ("| reward model | held-out pairs | accuracy |\n|---|---|---|\n"
             f"| fresh score head (before training) | {len(held_out)} | {before:.3f} |\n"
             f"| after {steps} steps x 16 pairs ({args.train_pairs} pairs, {args.epochs} epoch(s), "
             f"{seconds / 60:.1f} min) | {len(held_out)} | {after:.3f} |")
    print(table)
    if not args.no_append:
        command = (f"python benchmarks/reward.py --checkpoint_dir {args.checkpoint_dir} --train_pairs "
                   f"{args.train_pairs} --held_out {args.held_out} --epochs {args.epochs} --seq_len {args.seq_len} "
                   f"--lr {args.lr}")
        append_results(f"Reward model on hh-rlhf harmless ({args.checkpoint_dir.name})", command, table,
                       f"{machine()}. LoRA r=8 alpha=16 dropout 0 on all linear layers, float32, max {args.seq_len} "
                       "tokens per conversation; training wall time includes tokenizing and saving.")


if __name__ == "__main__":
    main()
