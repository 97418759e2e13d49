"""Peak memory per process of loading a checkpoint for FSDP training: whole then sharded, against each process reading
only its shards (litllm.training.fabric.load_for_training), on 2 CPU processes.

    python benchmarks/sharded_loading.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct

Each way runs in fresh processes (peak RSS only grows); the table goes to RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

from common import append_results, machine


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def measure(checkpoint_dir: Path, way: str) -> None:
    """In each of 2 processes: load `way` ("whole": load_model, then shard; "sharded": load_for_training), and print
    {rank, before, after} peak RSS in GB as a JSON line."""
    import lightning_fabric as L
    import torch

    from litllm.checkpoint import load_model
    from litllm.training.fabric import FullySharded, load_for_training

    fabric = L.Fabric(accelerator="cpu", devices=2, strategy=FullySharded(2), precision="32-true")
    fabric.launch()
    before = peak_gb()
    if way == "whole":
        model = fabric.setup_module(load_model(checkpoint_dir, dtype=torch.float32))
    else:
        model = fabric.setup_module(load_for_training(fabric, checkpoint_dir))
    fabric.barrier()
    weights = sum(p.to_local().numel() * p.element_size() for p in model.parameters()) / 1e9  # this process's
    print(json.dumps({"rank": fabric.global_rank, "before": before, "after": peak_gb(), "shard_gb": weights}),
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint_dir", type=Path, required=True)
    parser.add_argument("--way")
    args = parser.parse_args()
    if args.way:
        return measure(args.checkpoint_dir, args.way)
    rows = []
    for way in ("whole", "sharded"):
        result = subprocess.run([sys.executable, __file__, "--checkpoint_dir", str(args.checkpoint_dir), "--way", way],
                                capture_output=True, text=True, check=True)
        for line in result.stdout.splitlines():
            if line.startswith("{"):
                report = json.loads(line)
                rows.append(f"| {way} | {report['rank']} | {report['before']:.2f} | {report['after']:.2f} | "
                            f"+{report['after'] - report['before']:.2f} | {report['shard_gb']:.2f} |")
                print(rows[-1])
    from litllm.config import Config

    config = Config.from_hf(args.checkpoint_dir)
    table = ("| loading | rank | peak RSS before (GB) | after load + shard (GB) | added | its shards (GB) |\n"
             "|---|---|---|---|---|---|\n" + "\n".join(rows))
    append_results(f"Sharded loading for FSDP, {args.checkpoint_dir.name}, 2 processes (issue 16, item 2)",
                   "python benchmarks/sharded_loading.py --checkpoint_dir " + str(args.checkpoint_dir), table,
                   f"{machine()}; float32, {config.n_layers} layers. \"whole\": every process loads the full "
                   "checkpoint, then FSDP keeps its half. \"sharded\": built on the meta device, sharded, then each "
                   "process reads only its rows of each weight from the safetensors file.")


if __name__ == "__main__":
    main()
