"""``cpu.heap.reused_heap``: malloc's thresholds raised inside the outermost block only, restored
and the freed memory trimmed after it, nothing at all where it is off."""

import mlx.core as mx
import pytest

from mlx_unet.cpu import heap


class FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, parameter, value):
        self.calls.append(("mallopt", parameter, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


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
    assert raised == [("mallopt", heap._M_MMAP_THRESHOLD, heap._REUSE), ("mallopt", heap._M_TRIM_THRESHOLD, heap._REUSE)]
    assert libc.calls[2:] == [("mallopt", heap._M_MMAP_THRESHOLD, heap._MMAP_AFTER),
                              ("mallopt", heap._M_TRIM_THRESHOLD, heap._TRIM_AFTER), ("malloc_trim", 0)]


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
