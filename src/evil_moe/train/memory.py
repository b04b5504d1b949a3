"""Keep freed memory in the process: no page faults for the large tensors of every step.

glibc's ``malloc`` serves large blocks (the logits, their log-softmax and its gradient,
several MiB each) with ``mmap`` and gives freed heap space back to the kernel; the next
step then faults every page of the same buffers in again. On the CPU testbed that cost a
quarter of each training step's time in the kernel (about 14,000 minor page faults per
quick-preset step). :func:`keep_heap` raises glibc's mmap and trim thresholds once per
process, so freed blocks stay in the heap and are reused. It changes where memory comes
from, never a computed value; the process keeps its peak heap until it exits.

Called by the study's workers (:func:`evil_moe.study.worker.execute_run`),
``evil-moe train`` and the benchmarks; a library caller may call it too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["keep_heap"]

#: ``mallopt`` parameters (glibc ``malloc.h``)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: blocks up to this size come from the heap (glibc refuses more than its heap size / 2
#: on some builds; then its documented maximum, 32 MiB on 64-bit, is used)
_MMAP_THRESHOLD = 1 << 30
_MMAP_THRESHOLD_MAX = 32 << 20
#: freed heap space kept before any is returned to the kernel
_TRIM_THRESHOLD = (1 << 31) - 1

_done: bool | None = None


def keep_heap() -> bool:
    """Tune glibc ``malloc`` to keep freed memory; ``True`` if done (now or before).

    A no-op returning ``False`` off Linux or with another C library (musl, macOS).
    """
    global _done
    if _done is not None:
        return _done
    _done = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        try:
            libc = ctypes.CDLL("libc.so.6")
        except OSError:  # not glibc's name: ask the loader (slower: runs ldconfig)
            libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if not mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD):
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
    _done = bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return _done
