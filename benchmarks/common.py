"""What every benchmark shares: the machine description and appending a table to RESULTS.md."""
from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "RESULTS.md"


def machine() -> str:
    cpu = platform.processor() or "cpu"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{cpu}, {os.cpu_count()} cores"
    return f"{device}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def append_results(title: str, command: str, table: str, notes: str) -> None:
    date = datetime.date.today().isoformat()
    with RESULTS.open("a") as f:
        f.write(f"\n## {title}\n\n{date} · `{command}`\n\n{table}\n\n{notes}\n")


def too_slow_here(dtype: torch.dtype) -> str | None:
    """Why a run in `dtype` is skipped on this machine: on a CPU without fast half-precision kernels (AVX2 only),
    bfloat16/float16 products run ~50-90x slower than float32 on both sides, so such a row would take hours."""
    from litllm.checkpoint import SLOW, cpu_matmul_slowdown

    if torch.cuda.is_available() or dtype not in (torch.bfloat16, torch.float16):
        return None
    slowdown = cpu_matmul_slowdown(dtype)
    name = str(dtype).removeprefix("torch.")
    return f"{name}: not run: its matrix products run {slowdown:.0f}x slower than float32 on this CPU" \
        if slowdown >= SLOW else None
