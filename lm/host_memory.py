"""Host memory settings for XLA's CPU backend."""

from __future__ import annotations


def keep_freed_memory() -> bool:
    """On glibc, keep freed host memory in one malloc arena instead of handing it back to the kernel.

    XLA's CPU backend allocates and frees its buffers on every step. With glibc's defaults the large ones
    are fresh mmaps (and freed heap tops are trimmed), so every step page-faults its buffers in again:
    ~100k minor faults and about a quarter of the CPU time as system time for the paper's MQAR cell, 28 %
    for a 2048-token Hyena LM. One arena without mmap or trimming keeps the pages resident.

    "No trimming" means never: the threshold is SIZE_MAX (mallopt's -1), not INT_MAX. A step's one large
    temporary buffer (~0.7 GB for the MQAR Hyena cell) leaves holes that small allocations split, so the heap
    grows past 2 GB within a few steps; with a 2 GB threshold glibc then trimmed it back and the growth (175k
    faults, ~1.3 s) recurred every 10-40 steps, a fifth of the step time. Without a threshold the heap settles
    at its peak (about 2.2 GB there) after the first few steps. Returns False where this is not glibc. Call
    it once, before the first step (`longconv train` and `longconv mqar` do).
    """
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # <malloc.h>
    never = -1  # mallopt's int -1 is glibc's size_t SIZE_MAX: the heap is never trimmed
    settings = ((m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, never))
    return all(mallopt(option, value) == 1 for option, value in settings)
