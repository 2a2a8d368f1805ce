"""``weights._transpose_into``: a convolution weight's (out, kh*kw*in) matrix transposed into the
CPU kernels' layout at load, in tiles, and for large ones in two halves on two threads."""

import numpy as np
import pytest

from mlx_unet import weights


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("shape", [(320, 4 * 2880 + 7), (1280, 1152), (64 * 3 + 5, 6000), (130, 40), (1, 9)])
def test_the_transpose_is_exact_whole_or_in_two_halves(shape, dtype):
    matrix = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    out = np.full(shape[::-1], np.nan, dtype)
    assert weights._transpose_into(matrix, out) is out
    assert np.array_equal(out, matrix.T)


def test_large_matrices_take_two_threads_and_small_ones_one(monkeypatch):
    monkeypatch.setattr(weights.os, "cpu_count", lambda: 2)
    halves = []
    tiles = weights._transpose_tiles
    monkeypatch.setattr(weights, "_transpose_tiles", lambda m, o: halves.append(m.shape) or tiles(m, o))
    large = np.ones((320, weights._TWO_THREADS_FROM // 320 + 1), np.float16)
    weights._transpose_into(large, np.empty(large.shape[::-1], large.dtype))
    assert sorted(halves) == [(128, large.shape[1]), (192, large.shape[1])]
    halves.clear()
    small = np.ones((320, 100), np.float16)
    weights._transpose_into(small, np.empty(small.shape[::-1], small.dtype))
    assert halves == [small.shape]
