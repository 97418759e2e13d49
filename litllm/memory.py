"""The process's memory: glibc's malloc keeping what a CPU run frees for its next tensors (training, evaluation), and
an inference model's weights on huge pages."""
from __future__ import annotations

import ctypes
import mmap
import os
import platform

import torch

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


HUGE_PAGE = 2 << 20  # bytes: x86-64's and arm64's transparent huge page


def weights_on_huge_pages(model: torch.nn.Module) -> int:
    """Move `model`'s CPU parameters into one anonymous memory map that Linux backs with transparent huge pages (2 MiB
    pages: advised MADV_HUGEPAGE, which the kernel's default THP setting, madvise, honours), in place: the same
    Parameter objects with the same values, dtypes, shapes and strides (tied weights stay tied). Returns the bytes
    moved: 0 where the platform has no such advice.

    A one-token decode step streams every weight from memory once, and with 4 KiB pages the CPU's address translation
    misses every 4 KiB: a 2-core AMD EPYC ran SmolLM2's 121 float16 one-row products in 8.6-9.0 ms on huge pages
    against 10.8-11.2 on 4 KiB ones (benchmarks/RESULTS.md). PyTorch's CPU allocator advises huge pages only under
    THP_MEM_ALLOC_ENABLE=1, read from the environment when torch is imported, and then for every large tensor. For an
    inference model only (LLM.load, evaluate): call it after the layers are final and before anything keeps views of
    the weights; parameters of other layouts (oneDNN's packed weights) stay where they are."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return 0
    params = [param for param in model.parameters() if param.device.type == "cpu" and param.layout == torch.strided
              and (param.is_contiguous() or param.dim() == 2 and param.t().is_contiguous())]
    sizes = [-(-param.numel() * param.element_size() // 64) * 64 for param in params]  # 64-byte aligned each
    if not params:
        return 0
    memory = mmap.mmap(-1, sum(sizes) + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory.madvise(mmap.MADV_HUGEPAGE)
    arena = torch.frombuffer(memory, dtype=torch.uint8)  # keeps the map alive while any parameter views it
    offset = -arena.data_ptr() % HUGE_PAGE  # the first parameter at a huge page's start
    start = offset
    for param, size in zip(params, sizes):
        moved = arena[offset:offset + param.numel() * param.element_size()].view(param.dtype)
        moved = moved.as_strided(param.shape, param.stride())
        param.data = moved.copy_(param.detach())  # one parameter at a time: its old memory is freed as it goes
        offset += size
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        ctypes.CDLL(None).malloc_trim(0)  # give back the old weights' memory, freed among the heap's other chunks
    return offset - start
