"""The process's memory: glibc's malloc keeping what a CPU run frees for its next tensors (training, evaluation)."""
from __future__ import annotations

import ctypes
import os
import platform

GLIBC_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
MMAP_THRESHOLD, TRIM_THRESHOLD = 1 << 30, 2**31 - 1  # keep_freed_memory's settings (bytes)
KEEP_FREED_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}
"""The same settings for another process, as glibc reads them from its environment at start-up."""


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory a process frees for its next allocations, as PyTorch's caching allocator
    does on a GPU; returns whether it did. A CPU training step frees and allocates the same large tensors each time,
    and by default glibc maps each allocation above 32 MB anew and gives freed memory at the top of its heap back, so
    that every step writes to fresh pages, a page fault each 4 KiB, and by how much varies from step to step: SmolLM2
    full fine-tuning in bf16-mixed took ~200 thousand a step, and a step ~1.8-3.1 s against ~1.55-1.65 s this way
    once the heap has settled (a step or two), at the same peak RSS (benchmarks/RESULTS.md). Process-wide from the
    call on: allocations up to 1 GiB come from the heap, which is given back only when 2 GiB of it are free. Not where
    glibc's own settings are in the environment (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, GLIBC_TUNABLES), nor
    with another C library."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or any(map(os.environ.get, GLIBC_MALLOC_ENV)):
        return False
    mallopt = ctypes.CDLL(None).mallopt  # int mallopt(int param, int value); malloc.h's M_TRIM_THRESHOLD is -1,
    return bool(mallopt(-3, MMAP_THRESHOLD) and mallopt(-1, TRIM_THRESHOLD))  # M_MMAP_THRESHOLD -3
