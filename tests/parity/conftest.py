"""The parity tier: torch's threads, and memory handed back after the full-size tests."""

import gc
import os

import mlx.core as mx
import pytest
import torch
from reference import release_memory

torch.set_num_threads(os.cpu_count() or 1)

# torch, diffusers and transformers create millions of long-lived objects at import; frozen, they
# are no longer scanned by every gc.collect() (0.25 s each otherwise, after every test).
gc.freeze()

_RELEASE_ABOVE_BYTES = 2 * 2**30


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None  # not Linux: always release


@pytest.fixture(autouse=True)
def _release_memory_after_each_test():
    """Full-size tests hold 10 GB models: hand freed memory back before the next test. Small
    tests leave little behind, and a collection after each would cost more than they do."""
    yield
    resident = _resident_bytes()
    held_by_mlx = mx.get_active_memory() + mx.get_cache_memory()
    if resident is None or max(resident, held_by_mlx) > _RELEASE_ABOVE_BYTES:
        release_memory()
