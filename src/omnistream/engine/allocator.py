"""glibc's malloc set up for inference on a CPU (``Engine.load`` calls ``tune_malloc``).

PyTorch allocates every CPU tensor with ``malloc`` and frees it when the last reference goes.
glibc serves a block of more than ``M_MMAP_THRESHOLD`` bytes (128 KiB, raised as such blocks are
freed, to at most 32 MiB) with a fresh ``mmap`` and gives it back to the kernel when it is freed,
and it returns the top of its heap once more than ``M_TRIM_THRESHOLD`` bytes are free there. Each
such block is then paid for again on its next use: one page fault and a page of zeroes per 4 KiB.
Code2wav is where it shows: BigVGAN's last stages hold 24 kHz signals of a few dozen channels
(about 8 MiB per second of a chunk, times the streams decoded together), allocated and freed once
per layer. A thread other than the main one (the server's model thread) has its own arena, whose
heaps are at most 64 MiB, so a larger block is mapped afresh whatever the thresholds say.

Measured on this project's 2-core CPU (omni-mini's vocoder, 184 mel frames, in a thread as the
server runs it, milliseconds per chunk; the README has the server figures):

    glibc's defaults         1 chunk 160-186    8 chunks in one call 265-278 per chunk
    tuned (below)            1 chunk  90-117    8 chunks in one call  77-80  per chunk

so the defaults made a batch of chunks dearer per chunk than one chunk alone. ``tune_malloc``
keeps freed memory for reuse instead: blocks up to 1 GiB come from the heap, the heap keeps up to
1 GiB of free memory at its top, and every thread shares the main arena (whose heap grows without
the 64 MiB bound). The cost is that the process's resident memory stays near its high-water mark,
as with jemalloc or tcmalloc, which servers preload for the same reason.

Nothing is changed where a user chose otherwise: another C library, or any of glibc's malloc
environment variables (``MALLOC_ARENA_MAX``, ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``,
``GLIBC_TUNABLES``) set. An allocator preloaded in glibc's place (jemalloc, tcmalloc) ignores the
settings. Threads that already allocated keep their arenas, so the engine calls it before the
server starts its model thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc's <malloc.h>
KEEP_BYTES = 1 << 30
USER_SETTINGS = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                 "GLIBC_TUNABLES")

_tuned: bool | None = None


def tune_malloc() -> bool:
    """Keep freed memory for reuse in glibc's malloc (see the module docstring); once per
    process. Returns whether the settings are in force."""
    global _tuned
    if _tuned is None:
        _tuned = _apply()
    return _tuned


def _apply() -> bool:
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(k in os.environ for k in USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success; the order matters little, each setting stands alone
    return all(mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, KEEP_BYTES), (M_TRIM_THRESHOLD, KEEP_BYTES), (M_ARENA_MAX, 1)))
