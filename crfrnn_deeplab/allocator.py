"""Process-level tuning for CPU runs: keep freed memory instead of returning it to the kernel.

glibc's allocator serves every tensor larger than its mmap threshold (128 KiB, raised dynamically to at most
32 MiB) with a fresh ``mmap`` and unmaps it on free, so a loop that allocates a few large tensors per step
(mean-field iterations on a megapixel image: ~100 MiB each) pays a page fault for every 4 KiB it touches, every
step. On the 2-core VM this project is developed on, that is half of the CRF's time at 1024×1024 (see
``benchmarks/bench_crf.py --only scaling``). Intel's PyTorch CPU guide recommends jemalloc/tcmalloc for the
same reason; this helper gets most of the benefit from glibc itself with ``mallopt``.

The scripts (``train.py``, the benchmarks) call :func:`retain_freed_memory`; the library never changes the
process on import. The price is that the process keeps its peak heap size instead of shrinking after a peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

__all__ = ["retain_freed_memory"]

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def retain_freed_memory(*, mmap_threshold: int = 2**30, trim_threshold: int = 2**36) -> bool:
    """Serve allocations below ``mmap_threshold`` bytes from the heap and keep up to ``trim_threshold`` free.

    Equivalent to ``MALLOC_MMAP_THRESHOLD_=… MALLOC_TRIM_THRESHOLD_=…`` in the environment. Both values are capped
    at ``2**31 - 1`` (mallopt takes an int), so the default ``trim_threshold`` keeps up to 2 GiB free. Only glibc
    (Linux) is tuned; elsewhere nothing changes.

    Returns:
        True if the allocator accepted both settings.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt, Windows)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mmap_threshold = min(mmap_threshold, 2**31 - 1)  # an int; glibc caps it at HEAP_MAX anyway
    trim_threshold = min(trim_threshold, 2**31 - 1)
    ok = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    logger.debug("mallopt(mmap_threshold=%d, trim_threshold=%d): %s", mmap_threshold, trim_threshold, ok)
    return ok
