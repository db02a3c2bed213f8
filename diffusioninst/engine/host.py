"""Process-level settings for the processes that run the model on CPU (training, evaluation, prediction) and
for the ones that preprocess images (``diffusioninst.data.preprocess``).

glibc's ``malloc`` serves every block above its mmap threshold (128 KiB, raised dynamically up to 32 MiB)
with a fresh ``mmap`` and returns it with ``munmap`` when freed, and it trims the top of the heap once more
than 128 KiB is free there. PyTorch's CPU allocator has no cache of its own, so every large tensor (an R50
activation at 800x1216 is 60-250 MB) is new memory to the kernel: one page fault per 4 KiB page, each
zero-filled, on every iteration. :func:`keep_freed_memory` raises both thresholds so that freed blocks
stay in the heap and are reused.

Measured on the 2-core reference box, one R50 training iteration at 800x1216 (6 iterations each way):
280k-860k minor page faults and 0.75-3.1 s of kernel CPU time per iteration before, 0-16k faults and
0.1 s after; median iteration 17.7 -> 16.8 s on that (slow) stretch of the host. The price is memory: the
heap keeps its high-water mark, and glibc (2.36) cannot place a 64-byte-aligned block (PyTorch's
alignment) in the exact hole its predecessor left, so the heap settles a little above the working set
once neighbouring holes have coalesced: peak RSS 5.23 -> 5.42 GB (+3.5%) over those 6 iterations, +3-6% in
the benchmark runs (benchmarks/results/model_speed_cpu_keep_freed_memory_ab.json).
``host.keep_freed_memory: false`` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform

__all__ = ["keep_freed_memory"]

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 1 << 30  # blocks up to 1 GiB come from the heap and are reused once freed
_TRIM_THRESHOLD = (1 << 31) - 1  # never give the top of the heap back to the OS


@functools.cache
def _glibc_mallopt():
    """glibc's ``mallopt``, or None on another C library. Looked up once per process (``find_library`` and
    ``platform.libc_ver`` take about a millisecond each call)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt


def keep_freed_memory(enabled: bool = True) -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the OS (see the module docstring).

    Affects allocations made after the call, in this process only. Returns True when applied; False when
    ``enabled`` is False or the C library is not glibc (musl, macOS, Windows), where nothing is changed.
    """
    mallopt = _glibc_mallopt() if enabled else None
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
