"""``cpu.heap``: malloc's thresholds raised inside the outermost ``reused_heap`` block only,
restored and the freed memory trimmed after it, nothing at all where it is off; ``prefault``
inside a block, and what loading weights asks of it."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from mlx_unet import UNet2DConditionModel, UNetConfig
from mlx_unet.cpu import heap


class FakeLibc:
    """glibc's malloc controls as ``cpu.heap`` calls them, recorded in ``calls`` (also what
    test_generate_memory records a command's heap blocks with)."""

    def __init__(self):
        self.calls = []

    def mallopt(self, parameter, value):
        self.calls.append(("mallopt", parameter, value))
        return 1

    def malloc(self, size):  # ``heap.prefault``'s: none to give, so it does nothing
        return 0

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


# What ``reused_heap`` sets on entering its outermost block, and on leaving it.
RAISED = [("mallopt", heap._M_MMAP_THRESHOLD, heap._MMAP_IN_BLOCK),
          ("mallopt", heap._M_TRIM_THRESHOLD, heap._TRIM_IN_BLOCK)]
GIVEN_BACK = [("mallopt", heap._M_MMAP_THRESHOLD, heap._MMAP_AFTER),
              ("mallopt", heap._M_TRIM_THRESHOLD, heap._TRIM_AFTER), ("malloc_trim", 0)]


@pytest.fixture
def libc(monkeypatch):
    fake = FakeLibc()
    monkeypatch.setattr(heap, "_libc", fake)
    monkeypatch.delenv(heap.DISABLE_ENV, raising=False)
    return fake


def test_thresholds_are_raised_in_the_outermost_block_and_restored_after(libc):
    with heap.reused_heap():
        raised = list(libc.calls)
        with heap.reused_heap():  # a tile's decode inside a decode, say
            pass
        assert libc.calls == raised
    assert raised == RAISED
    assert libc.calls[2:] == GIVEN_BACK


def test_restored_when_the_block_raises(libc):
    with pytest.raises(ValueError), heap.reused_heap():
        raise ValueError
    assert libc.calls[-1] == ("malloc_trim", 0) and heap._depth == 0


def test_switched_off_by_the_environment(libc, monkeypatch):
    monkeypatch.setenv(heap.DISABLE_ENV, "1")
    assert not heap.available()
    with heap.reused_heap():
        pass
    assert libc.calls == []


@pytest.mark.cpu_only
def test_results_are_unchanged_on_this_machine():
    x = mx.random.normal((1 << 22,), key=mx.random.key(0))
    expected = mx.cumsum(x)
    mx.eval(expected)
    with heap.reused_heap():
        got = mx.cumsum(x)
        mx.eval(got)
    assert mx.array_equal(got, expected).item()


# In a fresh process (whose heap holds no large free chunks), with glibc's own malloc: two
# untouched 1.1 GB buffers freed at the top of the heap, under the thresholds given as ints
# (the trim threshold at most 2 GiB) and inside ``reused_heap``. The heap's size from
# mallinfo2 (glibc 2.33 and later) tells whether the freed top went back to the system.
_FREED_TOP = """
import ctypes, importlib.util, sys
spec = importlib.util.spec_from_file_location("heap", sys.argv[1])
heap = importlib.util.module_from_spec(spec); spec.loader.exec_module(heap)
libc = heap._libc
class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Mallinfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def heap_after_freeing_the_top():
    buffers = [libc.malloc(1_100_000_000) for _ in range(2)]
    for buffer in buffers:
        libc.free(buffer)
    return libc.mallinfo2().arena
heap._set(2**31 - 1, 2**31 - 1)
under_int_thresholds = heap_after_freeing_the_top()
heap._set(heap._MMAP_AFTER, heap._TRIM_AFTER)
with heap.reused_heap():
    in_block = heap_after_freeing_the_top()
print(under_int_thresholds, in_block)
"""


@pytest.mark.cpu_only
def test_a_freed_top_over_2_gib_stays_with_the_process_inside_the_block():
    """The trim threshold is set to -1 (no trimming): any int threshold let glibc give a freed top
    of more than 2 GiB back in mid-block, to be faulted in again by the next large buffer."""
    if not heap.available():
        pytest.skip("glibc's malloc is not in use here")
    path = Path(heap.__file__)
    out = subprocess.run([sys.executable, "-c", _FREED_TOP, str(path)], capture_output=True, text=True, check=True)
    under_int_thresholds, in_block = map(int, out.stdout.split())
    assert under_int_thresholds < 1_000_000_000  # the case the -1 is for: trimmed
    assert in_block >= 2_200_000_000  # kept for the next buffers


# In a fresh process: the page faults of writing a 64 MiB malloc'ed buffer, in a block of its own
# and in one that prefaulted that much first (the first block's memory went back to the system
# when it ended), and ``prefault`` outside a block.
_PREFAULTED = """
import ctypes, importlib.util, mmap, resource, sys
import numpy as np
spec = importlib.util.spec_from_file_location("heap", sys.argv[1])
heap = importlib.util.module_from_spec(spec); spec.loader.exec_module(heap)
libc, size = heap._libc, 64 << 20
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def faulted_by_a_buffer():
    address = libc.malloc(size)
    before = faults()
    np.ctypeslib.as_array((ctypes.c_uint8 * size).from_address(address))[::mmap.PAGESIZE] = 1
    after = faults()
    libc.free(address)
    return after - before
with heap.reused_heap():
    alone = faulted_by_a_buffer()
with heap.reused_heap():
    heap.prefault(size)
    prefaulted = faulted_by_a_buffer()
before = faults()
heap.prefault(size)
print(alone, prefaulted, faults() - before, size // mmap.PAGESIZE)
"""


@pytest.mark.cpu_only
def test_prefaulted_memory_is_where_the_next_buffers_come_from():
    if not heap.available():
        pytest.skip("glibc's malloc is not in use here")
    out = subprocess.run([sys.executable, "-c", _PREFAULTED, str(Path(heap.__file__))], capture_output=True, text=True,
                         check=True)
    alone, prefaulted, outside_a_block, pages = map(int, out.stdout.split())
    assert alone >= pages * 0.9  # a fault per page
    assert prefaulted < pages * 0.05
    assert outside_a_block < 100  # nothing touched


@pytest.mark.parametrize("cpu_kernels", [False, True])
def test_loading_prefaults_the_bytes_the_weights_take_on_the_cpu(tmp_path, monkeypatch, cpu_kernels):
    """float32 weights loaded as float16 take about half their file's bytes (with the CPU kernels
    in, all but the kernels' weights load in float32); on the GPU MLX's buffers are not malloc's,
    so nothing is prefaulted there."""
    asked = []
    monkeypatch.setattr(heap, "prefault", asked.append)
    config = UNetConfig.from_preset("tiny")
    model = UNet2DConditionModel(config)
    mx.save_safetensors(str(tmp_path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    loaded = UNet2DConditionModel.from_pretrained(tmp_path, dtype=mx.float16, cpu_kernels=cpu_kernels)
    taken = sum(v.nbytes for _, v in tree_flatten(loaded.parameters()))
    assert taken < (tmp_path / "model.safetensors").stat().st_size / 1.8
    assert asked == ([taken] if mx.default_device() == mx.cpu else [])
