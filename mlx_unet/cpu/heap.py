"""Reuse freed memory for large buffers on Linux, where glibc's malloc serves MLX's and numpy's.

MLX's CPU allocator keeps no cache: each buffer is malloc'ed when an operation runs and freed when
its last reader is done. glibc serves requests above its mmap threshold (which adapts, up to
32 MiB) with a fresh mapping and unmaps it on free, so a buffer that large is faulted in page
by page, and zero-filled by the kernel, as it is first written. The VAE's activations at 512 px
and more are 100 MiB to 1 GiB each, so without reuse a decode spent a large share of its time in
page faults (system time), more than some of its convolutions. A whole run frees gigabytes that
its next stage needs again: the text encoders' weights before the UNet loads, the UNet's before
the decode. In a virtual machine whose host takes back the memory a guest frees, touching fresh
memory again can cost seconds per GB (README: "Fresh memory").

``reused_heap()`` raises malloc's mmap threshold and stops its trimming for the duration of a
block: large buffers then come from the heap and go back to it when freed, and later buffers
reuse them.
The VAE's forward runs in one, and so does a pipeline call, from the prompt to the image. On
leaving the outermost block the thresholds go back to the values glibc's own adaptation
settles at, and ``malloc_trim`` returns the freed memory to the system, so the process holds no
more afterwards than it did before. ``MLX_UNET_NO_HEAP_REUSE=1`` turns it off.

Inside a block, ``prefault(nbytes)`` takes the memory that is about to be needed and touches it
on every core at once before handing it back to the heap: loading a model's weights does, whose
copies would otherwise fault their pages in one at a time on one thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import platform
import sys
import threading
from contextlib import contextmanager

import numpy as np

DISABLE_ENV = "MLX_UNET_NO_HEAP_REUSE"

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Within a block: every request below 2 GiB (mallopt takes an int) from the heap, and no freed
# top of it handed back. That needs the trim threshold at -1, which mallopt(3) documents as "no
# trimming at all": any int threshold is below 2 GiB, and a larger freed top went back to the
# system in mid-block (a 1024 px encode freed over 2 GiB after each of its first downsampling's
# buffers and faulted it all in again on the next call: 1.98 s against 1.04 s for that layer).
_MMAP_IN_BLOCK = 2**31 - 1
_TRIM_IN_BLOCK = -1
# Afterwards: where glibc's dynamic thresholds end once a buffer of 32 MiB or more was freed
# (DEFAULT_MMAP_THRESHOLD_MAX, and the trim threshold twice the mmap threshold).
_MMAP_AFTER = 32 << 20
_TRIM_AFTER = 64 << 20
# ``prefault`` takes the heap in parts of this size: under the mmap threshold, so from the heap.
_PREFAULT_PART = 1 << 30
_PAGE = mmap.PAGESIZE


def _glibc():
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return None
    if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    return libc


_libc = _glibc()
_lock = threading.Lock()
_depth = 0


def available() -> bool:
    """Whether ``reused_heap`` changes anything here (glibc, and not turned off)."""
    return _libc is not None and os.environ.get(DISABLE_ENV) != "1"


def _set(mmap_threshold: int, trim_threshold: int) -> None:
    _libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
    _libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)


@contextmanager
def reused_heap():
    """Serve and keep large buffers from the heap inside the block (see the module docstring)."""
    global _depth
    if not available():
        yield
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            _set(_MMAP_IN_BLOCK, _TRIM_IN_BLOCK)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _set(_MMAP_AFTER, _TRIM_AFTER)
                _libc.malloc_trim(0)


def prefault(nbytes: int) -> None:
    """Inside a block: fault in ``nbytes`` of heap memory on every core at once and free it back to
    the heap, where the allocations that follow (a model's weights, loading) find it touched
    already. Outside a block, or where the reuse is off, nothing: the memory would go back to the
    system.

    A page's first touch is a page fault, which in a virtual machine costs more than copying the
    page's data (README: "Fresh memory"). One thread copying weights in takes its faults one after
    another; several threads fault theirs in at once. Memory the heap holds already is only
    written."""
    if _depth == 0 or not available() or nbytes <= 0:
        return
    parts = []
    try:
        while nbytes > 0:
            size = min(nbytes, _PREFAULT_PART)
            address = _libc.malloc(size)
            if not address:
                break  # what is not there now is faulted in by the allocations themselves
            parts.append(np.ctypeslib.as_array((ctypes.c_uint8 * size).from_address(address)))
            nbytes -= size
        # A byte of each page, each thread writing a contiguous share of every part (threads
        # faulting in the same page table would wait on its lock); numpy lets go of the GIL to write.
        pages = [part[::_PAGE] for part in parts]
        count = len(os.sched_getaffinity(0))
        shares = [[p[len(p) * t // count:len(p) * (t + 1) // count] for p in pages] for t in range(count)]
        workers = [threading.Thread(target=_touch, args=(share,)) for share in shares[1:]]
        for worker in workers:
            worker.start()
        _touch(shares[0])
        for worker in workers:
            worker.join()
    finally:
        for part in parts:
            _libc.free(part.ctypes.data)


def _touch(pages: list[np.ndarray]) -> None:
    for page_starts in pages:
        page_starts[:] = 0
