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
