"""Fine-tuning tokens/s and peak RSS: litllm vs transformers (+ PEFT for LoRA), same model, data, dtype and machine.

    python benchmarks/finetune_lora.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
    python benchmarks/finetune_lora.py --modes lora --precisions 32-true --steps 1 --warmup 0 --seq_len 32 --no_append
    python benchmarks/finetune_lora.py --modes lora --precisions 32-true --lora_dropouts 0.05 --compile
    python benchmarks/finetune_lora.py --modes lora --precisions 32-true --repeats 3
    python benchmarks/finetune_lora.py --accelerator cuda --precisions bf16-true --batch_size 8 --seq_len 1024

`--repeats N` runs the sides of each row N times, taking turns (and the rows of one mode and precision, the LoRA
dropouts, take turns with each other), and reports each side's best tokens/s and largest peak RSS: on a shared 2-core
machine one run of a side can be 20-25% off another's with nothing changed. The last column is what a LoRA dropout
costs litllm: its tokens/s and peak RSS against its own run at the first dropout listed (0 by default).

`--compile` adds a run per row: litllm trained as `--train.compile true` does (each block under torch.compile;
the compile happens in the untimed warm-up steps).

`--profile` has each side profile one more step, untimed, and print its costliest operators and how many operator calls
(and GPU kernels) the step makes.

`--same_allocator` adds a run per row: transformers(+PEFT) under litllm's allocator settings (glibc keeping freed
memory, from its environment: memory.KEEP_FREED_MEMORY_ENV), and litllm's speed-up against that run. With glibc's
defaults the reference's steps write to fresh pages, and what those page faults cost moves with the machine's state
(on a 2-core Xeon, the same PEFT LoRA run 249 against 395 tok/s three hours apart, benchmarks/RESULTS.md): this column
is litllm's speed apart from that.

Modes: `lora` (r=8, alpha=16, all seven linear layers of every block, at each of --lora_dropouts: 0, and litllm's
default 0.05, PEFT given the same) and `full` (every weight trained);
precisions: `32-true`, `bf16-mixed` (fp32 weights, bf16 autocast) and `bf16-true` (bf16 weights, litllm's default on
GPUs). `--accelerator cuda` runs both sides on the GPU and reports peak CUDA memory allocated instead of peak RSS.
The batches are built once from real rows of data/alpaca_demo.json with litllm's tokenizer and data pipeline
(concatenated into batch_size x seq_len tokens, every position a target) and the identical tensors go to both sides.
Each side runs in its own subprocess (`--worker`), so its peak memory is its own. litllm trains through its real path
(Fabric, the lora script's `next_token_loss`, `StepUnits`, `build_optimizer`); transformers through
`model(input_ids, labels=labels).loss.backward()` and fused AdamW, the optimizer its Trainer defaults to. Each side
with the memory settings its users get: litllm's scripts have glibc keep freed memory on CPU
(`memory.keep_freed_memory`), transformers runs with glibc's defaults (see --same_allocator); running this under
MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483647 gives every run those settings (which the notes
then say). Prints one table and appends it to benchmarks/RESULTS.md (unless --no_append).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import append_results, machine, too_slow_here

from litllm.memory import GLIBC_MALLOC_ENV, KEEP_FREED_MEMORY_ENV

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIDES = ("transformers", "litllm")


def build_batches(checkpoint_dir: Path, data_path: Path, count: int, batch_size: int, seq_len: int) -> list[dict]:
    """`count` batches of (batch_size, seq_len) tokens: the tokenized rows end to end (repeated if too few)."""
    from litllm.data.sft import JSON
    from litllm.tokenizer import Tokenizer

    data = JSON(json_path=data_path, mask_prompt=False, val_split_fraction=0.0)
    dataset, _ = data.setup(Tokenizer(checkpoint_dir), max_seq_length=1 << 30)
    stream = torch.cat([example["input_ids"] for example in dataset.examples])
    needed = count * batch_size * seq_len
    stream = stream.repeat(-(-needed // len(stream)))[:needed]
    rows = [{"input_ids": row, "labels": row.clone()} for row in stream.view(-1, seq_len)]
    return [dataset.collate(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]


def litllm_step(args):
    """A function doing one optimizer step on a batch, as the lora script's `fit` does (no clipping, no schedule)."""
    import lightning_fabric as L

    from litllm.checkpoint import load_model
    from litllm.finetune.lora import next_token_loss
    from litllm.lora import LoRAConfig, apply_lora
    from litllm.training.args import TrainArgs
    from litllm.memory import keep_freed_memory
    from litllm.training.fabric import model_dtype
    from litllm.training.loop import StepUnits, build_optimizer, compile_blocks_for_training
    from litllm.training.losses import count_targets

    fabric = L.Fabric(devices=1, accelerator=args.accelerator, precision=args.precision)
    if args.accelerator == "cpu":
        keep_freed_memory()  # as setup_fabric
    model = load_model(args.checkpoint_dir, dtype=model_dtype(fabric))
    if args.mode == "lora":
        apply_lora(model, LoRAConfig(r=8, alpha=16, dropout=args.dropout, targets=TARGETS))
    model.train()
    if args.compile:
        compile_blocks_for_training(model)
    model = fabric.setup_module(model)
    optimizer = fabric.setup_optimizers(build_optimizer(model.parameters(), "AdamW", TrainArgs(lr=args.lr)))
    chunk_size = args.loss_chunk_size or TrainArgs().loss_chunk_size

    def step(batch: dict) -> float:
        units = StepUnits(fabric, count_targets(batch))
        with fabric.autocast():  # as the script's fit: the loss, outside the model's forward, in mixed precision too
            loss = next_token_loss(model, fabric.to_device(batch), chunk_size)
        fabric.backward(loss * units.loss_scale)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return units.mean({"loss": loss.detach()})["loss"]

    return step


def transformers_step(args):
    """A function doing one optimizer step on a batch with a transformers model (+ PEFT adapters for LoRA)."""
    from transformers import AutoModelForCausalLM

    device = torch.device(args.accelerator)
    dtype = torch.bfloat16 if args.precision == "bf16-true" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint_dir, dtype=dtype).to(device)
    if args.mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=args.dropout, target_modules=TARGETS,
                                                 task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # fused, as build_optimizer and as transformers' Trainer by default (optim "adamw_torch_fused")
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    bf16 = args.precision == "bf16-mixed"

    def step(batch: dict) -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=batch["input_ids"].to(device), labels=batch["labels"].to(device)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def peak_memory_gb(accelerator: str) -> float:
    """This process's peak RSS on CPU (model loading included); on a GPU, the peak CUDA memory allocated."""
    if accelerator == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def print_profile(args, step, batch) -> None:
    """One optimizer step under torch.profiler: the operators taking the most time (on a GPU: the GPU's time) and how
    many operator calls and GPU kernels the step makes, to stderr."""
    from torch.profiler import ProfilerActivity, profile

    cuda = args.accelerator == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        step(batch)
    events = prof.key_averages()
    kernels = sum(e.count for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    aten_calls = sum(e.count for e in events if e.key.startswith("aten::"))
    print(f"{args.worker} {args.mode} {args.precision} profile: {aten_calls} aten calls, {kernels} GPU kernels\n"
          + events.table(sort_by="self_cpu_time_total", row_limit=20), file=sys.stderr)
    if cuda:  # where the host's time goes (above) and where the GPU's does: a host-bound step shows in their totals
        print(events.table(sort_by="self_cuda_time_total", row_limit=20), file=sys.stderr)


def worker(args) -> None:
    """Load one side, run warm-up then timed steps, print one JSON line: tokens/s, peak memory, mean timed loss."""
    torch.manual_seed(0)
    batches = torch.load(args.batches, weights_only=True)
    step = (litllm_step if args.worker == "litllm" else transformers_step)(args)
    seconds, losses = 0.0, []
    for i, batch in enumerate(batches):
        if args.profile and i == len(batches) - 1:  # the last step, untimed: the profiler's own cost would count
            print_profile(args, step, batch)
            break
        start = time.perf_counter()
        loss = step(batch)
        if i >= args.warmup:
            seconds += time.perf_counter() - start
            losses.append(loss)
        print(f"{args.worker} {args.mode} {args.precision} step {i}: loss {loss:.4f}", file=sys.stderr)
    tokens = sum(batch["input_ids"].numel() for batch in batches[args.warmup:len(batches) - args.profile])
    nonfinite = [i for i, loss in enumerate(losses, args.warmup) if not math.isfinite(loss)]
    print(json.dumps({"tokens_per_sec": tokens / seconds, "loss": sum(losses) / len(losses),
                      "first_nonfinite_step": nonfinite[0] if nonfinite else None,
                      "peak_rss_gb": peak_memory_gb(args.accelerator)}))


def run_worker(args, side: str, mode: str, precision: str, dropout: float, batches: Path, compile: bool = False,
               kept_memory: bool = False) -> dict:
    """One side's run in its own process; `kept_memory`: under litllm's allocator settings from the start."""
    command = [sys.executable, __file__, "--worker", side, "--mode", mode, "--precision", precision,
               "--batches", str(batches), "--checkpoint_dir", str(args.checkpoint_dir),
               "--warmup", str(args.warmup), "--lr", str(args.lr), "--dropout", str(dropout),
               "--accelerator", args.accelerator]
    command += ["--profile"] if args.profile else []
    command += ["--loss_chunk_size", str(args.loss_chunk_size)] if args.loss_chunk_size else []
    command += ["--compile"] if compile else []
    env = {**os.environ, **KEEP_FREED_MEMORY_ENV} if kept_memory else None
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env)  # stderr (progress) to the terminal
    if done.returncode:
        raise SystemExit(f"the {side} worker failed ({mode}, {precision}): exit status {done.returncode}")
    result = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    # each run as it ends: a benchmark stopped at a time limit (a GPU session's) still leaves the runs it finished
    print(f"{side}{' compiled' if compile else ''}{' (litllm allocator)' if kept_memory else ''}, {mode}, "
          f"{precision}, dropout {dropout:g}: {result['tokens_per_sec']:.1f} tok/s, {result['peak_rss_gb']:.2f} GB, "
          f"loss {result['loss']:.4f}", file=sys.stderr)
    return result


def best_of(runs: list[dict]) -> dict:
    """One side's repeated runs as one: the best tokens/s, the largest peak RSS, the loss (equal in every run)."""
    return {"tokens_per_sec": max(run["tokens_per_sec"] for run in runs), "loss": runs[0]["loss"],
            "first_nonfinite_step": runs[0]["first_nonfinite_step"],
            "peak_rss_gb": max(run["peak_rss_gb"] for run in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint_dir", type=Path, default=Path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"))
    parser.add_argument("--data", type=Path, default=Path("data/alpaca_demo.json"))
    parser.add_argument("--modes", default="lora,full")
    parser.add_argument("--precisions", default="32-true,bf16-mixed")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--lora_dropouts", default="0,0.05", help="LoRA runs at each of these dropouts")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run each side this many times, taking turns; best tokens/s, largest peak RSS")
    parser.add_argument("--compile", action="store_true",
                        help="also run litllm with its blocks under torch.compile (--train.compile)")
    parser.add_argument("--same_allocator", action="store_true",
                        help="also run transformers(+PEFT) under litllm's allocator settings (see above)")
    parser.add_argument("--accelerator", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile", action="store_true",
                        help="each side profiles one more step (untimed): its costliest operators, to stderr")
    parser.add_argument("--loss_chunk_size", type=int,
                        help="litllm's --train.loss_chunk_size (default: the scripts' default)")
    parser.add_argument("--no_append", action="store_true", help="print the table, leave RESULTS.md alone")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)  # internal: one side in this process
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--batches", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dropout", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    rows, skipped = [], []
    with tempfile.TemporaryDirectory() as tmp:
        batches = Path(tmp) / "batches.pt"
        data = build_batches(args.checkpoint_dir, args.data, args.warmup + args.steps + args.profile, args.batch_size,
                             args.seq_len)
        torch.save(data, batches)
        for mode in args.modes.split(","):
            for precision in args.precisions.split(","):
                if reason := too_slow_here(torch.bfloat16 if precision.startswith("bf16") else
                                           torch.float16 if precision.startswith("16") else torch.float32):
                    skipped.append(f"{mode}, {precision}: {reason}")
                    continue
                dropouts = [float(p) for p in args.lora_dropouts.split(",")] if mode == "lora" else [0.0]
                # (side, compiled, under litllm's allocator settings), in the order of `names` below
                columns = [("transformers", False, False), ("litllm", False, False)]
                columns += [("litllm", True, False)] if args.compile else []
                columns += [("transformers", False, True)] if args.same_allocator else []
                # the rows of one precision take turns too: the dropout rows then compare runs made at the same time
                repeats = [[[run_worker(args, side, mode, precision, dropout, batches, compile, kept_memory)
                             for side, compile, kept_memory in columns] for dropout in dropouts]
                            for _ in range(args.repeats)]
                for i, dropout in enumerate(dropouts):
                    runs = [best_of(list(side_runs)) for side_runs in zip(*(repeat[i] for repeat in repeats))]
                    rows.append((mode if mode == "full" else f"lora, dropout {dropout:g}", precision, *runs))
                    print(rows[-1], file=sys.stderr)

    memory, short = ("peak RSS", "RSS") if args.accelerator == "cpu" else ("peak CUDA memory", "memory")
    names = ["transformers(+PEFT)", "litllm"] + (["litllm compiled"] if args.compile else [])
    same = ["transformers(+PEFT), litllm's allocator"] if args.same_allocator else []
    header = ["mode", "precision", *(f"{side} tok/s" for side in names + same), "speed-up",
              *(["speed-up compiled"] if args.compile else []), *(["speed-up, same allocator"] if same else []),
              *(f"{side} {memory} GB" for side in names + same),
              f"{short} litllm/transformers", *([f"{short} compiled/transformers"] if args.compile else []),
              *(f"{side} loss" for side in names), f"litllm against the first dropout: tok/s, {short} GB"]
    lines = [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}"]
    first = {}  # (mode, precision) -> litllm's run at the first dropout listed
    for mode, precision, hf, *runs in rows:
        ours, kept = runs[:len(names) - 1], runs[len(names) - 1:]  # litllm's runs; the reference's under its allocator
        base = first.setdefault((mode.split(",")[0], precision), ours[0])
        cells = [mode, precision, *(f"{run['tokens_per_sec']:.1f}" for run in (hf, *ours, *kept)),
                 *(f"{run['tokens_per_sec'] / hf['tokens_per_sec']:.2f}x" for run in ours),
                 *(f"{ours[0]['tokens_per_sec'] / run['tokens_per_sec']:.2f}x" for run in kept),
                 *(f"{run['peak_rss_gb']:.2f}" for run in (hf, *ours, *kept)),
                 *(f"{run['peak_rss_gb'] / hf['peak_rss_gb']:.2f}" for run in ours),
                 *(f"{run['loss']:.4f}" if run["first_nonfinite_step"] is None else
                   f"{run['loss']} (from step {run['first_nonfinite_step']})" for run in (hf, *ours)),
                 "" if base is ours[0] else f"{ours[0]['tokens_per_sec'] / base['tokens_per_sec'] - 1:+.1%}, "
                                            f"{ours[0]['peak_rss_gb'] - base['peak_rss_gb']:+.2f}"]
        lines.append(f"| {' | '.join(cells)} |")
    lines += [""] + skipped if skipped else []
    table = "\n".join(lines)
    print(table)
    if args.no_append:
        return
    append_results(
        title=f"Fine-tuning, {args.checkpoint_dir.name}, batch {args.batch_size} x {args.seq_len} tokens",
        command="python " + " ".join(sys.argv),
        table=table,
        notes=f"{machine()}; each side in its own process (" + ("peak RSS: that process's ru_maxrss, model loading "
              "included" if args.accelerator == "cpu" else "peak CUDA memory: torch.cuda.max_memory_allocated") + "); "
              f"{args.warmup} untimed then {args.steps} timed optimizer steps per side, "
              f"{args.repeats} run(s) per side taking turns (best tokens/s, largest peak memory), loss the mean "
              f"over the timed steps; rows of {args.data.name} concatenated, every token a target, identical "
              f"batches on both sides; LoRA r=8 alpha=16 on {', '.join(TARGETS)}; AdamW lr {args.lr} "
              "betas (0.9, 0.95), fused, no weight decay, no gradient clipping; bf16-mixed: fp32 weights, bf16 "
              "autocast; bf16-true: bf16 weights; "
              + (f"litllm's loss in chunks of {args.loss_chunk_size} tokens; " if args.loss_chunk_size else "")
              + (f"both sides under {' '.join(f'{k}={os.environ[k]}' for k in GLIBC_MALLOC_ENV if k in os.environ)}"
                 if any(k in os.environ for k in GLIBC_MALLOC_ENV) else
                 "litllm keeping freed memory (keep_freed_memory), transformers with glibc's defaults")
              + (", and in the column 'litllm's allocator' under "
                 + " ".join(f"{k}={v}" for k, v in KEEP_FREED_MEMORY_ENV.items()) if args.same_allocator else "")
              + ".",
    )


if __name__ == "__main__":
    main()
