"""The CPU kernels of ``activations``, ``attention`` and ``linear`` against torch.

They replace MLX built-ins with arithmetic-only approximations, so they are checked over the
whole float range that matters, extremes included, and in half precision.
"""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mlx_unet.cpu import activations, attention, blas
from mlx_unet.cpu.linear import Linear

HALF = [mx.float16, mx.bfloat16]
HALF_TORCH = {mx.float16: torch.float16, mx.bfloat16: torch.bfloat16}


def _inputs() -> np.ndarray:
    rng = np.random.default_rng(0)
    dense = np.linspace(-12, 12, 48001, dtype=np.float32)  # every region of both approximations
    wide = rng.normal(0, 6, 20000).astype(np.float32)
    extremes = np.float32([-1e30, -1000, -200, -90, -88.8, -87, -5.657, -4, -1e-30, 0, 1e-30, 1e-8, 4,
                           5.657, 87, 88.8, 90, 200, 1000, 1e30])
    return np.concatenate([dense, wide, extremes])


# Worst error against float64, relative to max(|value|, 1). torch's own float32 gives 1.2e-7
# (SiLU) and 2.6e-7 (GELU). Ours: 1.2e-7 and 7e-7; the GELU worst case is near x = -5, where
# 1 + erf(x / sqrt 2) cancels to ~1e-7 and the 4e-7 erf error is all that is left of the value.
FLOAT32_BOUNDS = {"silu": 2e-7, "gelu": 1e-6}


@pytest.mark.parametrize("name,bound", list(FLOAT32_BOUNDS.items()))
def test_activation_matches_torch_in_float32(name, bound):
    x = _inputs()
    ours = np.array(getattr(activations, name)(mx.array(x)))
    expected = getattr(F, name)(torch.from_numpy(x).double()).numpy()
    assert np.isfinite(ours).all()
    err = np.abs(ours - expected) / np.maximum(np.abs(expected), 1.0)
    assert err.max() <= bound, float(err.max())


def test_geglu_is_value_times_gelu_of_gate():
    rng = np.random.default_rng(1)
    value = rng.normal(0, 2, (3, 7, 64)).astype(np.float32)
    gate = rng.normal(0, 3, (3, 7, 64)).astype(np.float32)
    ours = np.array(activations.geglu(mx.array(value), mx.array(gate)))
    expected = (torch.from_numpy(value).double() * F.gelu(torch.from_numpy(gate).double())).numpy()
    np.testing.assert_allclose(ours, expected, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", ["silu", "gelu"])
def test_activation_in_half_precision_rounds_the_float32_result_once(name, dtype):
    values = _inputs()
    x = mx.array(values[np.abs(values) < 6e4])  # +-1e30 is inf in float16
    x_half = x.astype(dtype)
    ours = getattr(activations, name)(x_half)
    assert ours.dtype == dtype
    # Computed in float32 from the half input, rounded once: what torch gives from float32.
    expected = getattr(F, name)(torch.from_numpy(np.array(x_half.astype(mx.float32)))).to(HALF_TORCH[dtype])
    got = torch.from_numpy(np.array(ours.astype(mx.float32)))
    assert torch.isfinite(got).all()
    # Element by element: one unit in the last place of the half type (both sides round a
    # float32 value), plus the float32 kernel's own error (relative to max(|value|, 1), as above),
    # which is all there is where the value is tiny (GELU near x = -5).
    ulp = 2.0 ** -7 if dtype == mx.bfloat16 else 2.0 ** -10
    reference = expected.float().abs()
    allowed = ulp * reference + FLOAT32_BOUNDS[name] * reference.clamp(min=1.0)
    excess = (got - expected.float()).abs() - allowed
    assert excess.max() <= 0, float(excess.max())


def _torch_attention(q, k, v):
    return F.scaled_dot_product_attention(*(torch.from_numpy(np.array(a.astype(mx.float32))).double() for a in (q, k, v))).numpy()


@pytest.mark.parametrize("chunk", [None, 1 << 10, 1 << 12])
@pytest.mark.parametrize("shape", [(2, 10, 256, 256, 64), (1, 5, 300, 77, 64), (2, 8, 33, 77, 40), (1, 2, 1, 9, 16), (1, 1, 1, 9, 16)])
def test_cpu_attention_matches_torch(shape, chunk, monkeypatch):
    """Whole heads per chunk, groups of heads, and chunks of query rows that do not divide the
    token count (chunk 1 << 10 with 300 x 77 scores)."""
    if chunk is not None:
        monkeypatch.setattr(attention, "_CHUNK_SCORES", chunk)
    b, h, n, nk, d = shape
    rng = np.random.default_rng(2)
    q, k, v = (mx.array(rng.normal(0, 1, (b, h, m, d)).astype(np.float32)) for m in (n, nk, nk))
    ours = np.array(attention.chunked_attention(q, k, v, d**-0.5))
    expected = _torch_attention(q, k, v)
    assert np.abs(ours - expected).max() <= 2e-6 * np.abs(expected).max()


def test_cpu_attention_chunks_hold_at_least_min_rows(monkeypatch):
    """Long key sequences get chunks of ``_MIN_ROWS`` query rows beyond the 2 MB of scores, up to
    ``_MAX_CHUNK_SCORES`` (scaled down here: 26-row chunks that do not divide 300 tokens)."""
    assert attention.chunk_rows(16384, 16384) == 128 and attention.chunk_rows(4096, 4096) == 128
    assert attention.chunk_rows(1024, 1024) == 512 and attention.chunk_rows(2**20, 2**20) == 2
    monkeypatch.setattr(attention, "_CHUNK_SCORES", 1 << 10)
    monkeypatch.setattr(attention, "_MIN_ROWS", 32)
    monkeypatch.setattr(attention, "_MAX_CHUNK_SCORES", 1 << 11)
    assert attention.chunk_rows(300, 77) == 26
    rng = np.random.default_rng(5)
    q, k, v = (mx.array(rng.normal(0, 1, (1, 3, m, 64)).astype(np.float32)) for m in (300, 77, 77))
    ours = np.array(attention.chunked_attention(q, k, v, 0.125))
    expected = _torch_attention(q, k, v)
    assert np.abs(ours - expected).max() <= 2e-6 * np.abs(expected).max()


def test_cpu_attention_groups_heads_evenly_for_the_two_pipelines():
    """Whole heads go into an even number of groups of nearly one size, none over a chunk's
    scores: SDXL's 16x16 level (40 heads of 256 x 256, 8 to a chunk) in 6 groups of 7 (the last
    5), not 5 of 8; its cross-attention (40 of 256 x 77, 26 to a chunk) in 2 of 20, not 26 + 14."""
    assert attention._chunking(40, 256, 256) == (256, 7)
    assert attention._chunking(40, 256, 77) == (256, 20)
    assert attention._chunking(40, 64, 64) == (64, 40)  # one chunk: nothing to share
    assert attention._chunking(40, 1024, 1024) == (512, 1)  # a head over two chunks of rows
    rng = np.random.default_rng(7)
    q, k, v = (mx.array(rng.normal(0, 1, (2, 20, m, 16)).astype(np.float32)) for m in (256, 256, 256))
    expected = _torch_attention(q, k, v)
    assert np.abs(np.array(attention.chunked_attention(q, k, v, 0.25)) - expected).max() <= 2e-6 * np.abs(expected).max()


def test_cpu_attention_over_many_scores_runs_in_two_pipelines(monkeypatch):
    """From ``PIPELINES_FROM_SCORES`` scores the chunks take turns on two streams, with half of
    BLAS's threads each while they run: the values of one pipeline, bit for bit, and BLAS's
    threads given back. Below it, and under ``mx.compile``, which cannot evaluate, one pipeline."""
    monkeypatch.setattr(attention, "_CHUNK_SCORES", 1 << 12)
    monkeypatch.setattr(attention, "_MIN_ROWS", 1)  # 12-row chunks: many of them
    rng = np.random.default_rng(6)
    q, k, v = (mx.array(rng.normal(0, 1, (2, 3, m, 32)).astype(np.float32)) for m in (300, 320, 320))
    threads = blas.threads()
    set_to = []
    monkeypatch.setattr(blas, "set_threads", lambda count, set_threads=blas.set_threads: (set_to.append(count),
                                                                                        set_threads(count)))
    scores = 2 * 3 * 300 * 320
    monkeypatch.setattr(attention, "PIPELINES_FROM_SCORES", scores + 1)
    one = np.array(attention.chunked_attention(q, k, v, 32**-0.5))
    assert set_to == []
    monkeypatch.setattr(attention, "PIPELINES_FROM_SCORES", scores)
    two = np.array(attention.chunked_attention(q, k, v, 32**-0.5))
    assert np.array_equal(two, one)
    # Without OpenBLAS (MLX_UNET_NO_OPENBLAS=1) there are no threads to share: one pipeline.
    assert set_to == ([] if threads is None else [max(1, threads // 2), threads]) and blas.threads() == threads
    compiled = mx.compile(lambda q, k, v: attention.chunked_attention(q, k, v, 32**-0.5))
    expected = _torch_attention(q, k, v)
    assert np.abs(np.array(compiled(q, k, v)) - expected).max() <= 2e-6 * np.abs(expected).max()
    assert np.abs(one - expected).max() <= 2e-6 * np.abs(expected).max()
    assert len(set_to) == (0 if threads is None else 2)  # the traced call did not share the threads


def test_cpu_attention_is_stable_for_large_and_peaked_logits():
    rng = np.random.default_rng(3)
    q = mx.array(rng.normal(0, 40, (1, 2, 64, 32)).astype(np.float32))  # logits in the thousands
    k = mx.array(rng.normal(0, 1, (1, 2, 64, 32)).astype(np.float32))
    v = mx.array(rng.normal(0, 1, (1, 2, 64, 32)).astype(np.float32))
    ours = np.array(attention.chunked_attention(q, k, v, 32**-0.5))
    expected = _torch_attention(q, k, v)
    assert np.isfinite(ours).all()
    assert np.abs(ours - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("dtype", HALF)
def test_cpu_attention_in_half_precision(dtype):
    rng = np.random.default_rng(4)
    q, k, v = (mx.array(rng.normal(0, 1, (2, 4, 96, 64)).astype(np.float32)).astype(dtype) for _ in range(3))
    ours = attention.chunked_attention(q, k, v, 0.125)
    expected = _torch_attention(q, k, v)
    got = np.array(ours.astype(mx.float32))
    assert ours.dtype == dtype and np.isfinite(got).all()
    assert np.abs(got - expected).max() <= 2 ** -7 * np.abs(expected).max()


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("bias", [True, False])
def test_half_precision_linear_is_the_float32_product_rounded_once(dtype, bias):
    rng = np.random.default_rng(5)
    layer = Linear.from_module(nn.Linear(96, 48, bias=bias))
    layer.set_dtype(dtype)
    x = mx.array(rng.normal(0, 1, (2, 5, 96)).astype(np.float32)).astype(dtype)
    params = {k: np.array(v.astype(mx.float32)) for k, v in layer.parameters().items()}
    expected = np.array(x.astype(mx.float32)) @ params["weight"].T + params.get("bias", 0.0)
    got = layer(x)
    assert got.dtype == dtype
    rounded = np.array(mx.array(expected).astype(dtype).astype(mx.float32))
    # Equal to the rounded float32 product up to one unit in the last place of the half type
    # (the float32 sums themselves may differ in their last bits between BLAS and numpy).
    ulp = 2.0 ** -7 if dtype == mx.bfloat16 else 2.0 ** -10
    np.testing.assert_allclose(np.array(got.astype(mx.float32)), rounded, rtol=ulp, atol=1e-6)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
@pytest.mark.parametrize("shape", [(1, 77, 96), (2, 77, 96), (3, 5, 96)])
def test_linear_pads_awkward_row_counts_without_changing_the_result(dtype, shape):
    # 77 rows (SDXL's text tokens) are padded to 80 for OpenBLAS, 154 to 160; 15 are left as they are.
    rng = np.random.default_rng(6)
    layer = Linear.from_module(nn.Linear(96, 48))
    layer.set_dtype(dtype)
    x = mx.array(rng.normal(0, 1, shape).astype(np.float32)).astype(dtype)
    params = {k: np.array(v.astype(mx.float32)) for k, v in layer.parameters().items()}
    expected = np.array(x.astype(mx.float32)) @ params["weight"].T + params["bias"]
    got = layer(x)
    assert got.shape == (*shape[:-1], 48) and got.dtype == dtype
    tolerance = 1e-5 if dtype == mx.float32 else 2.0 ** -10
    np.testing.assert_allclose(np.array(got.astype(mx.float32)), expected, rtol=tolerance, atol=tolerance)


def test_fitted_constants_are_what_the_fitting_script_prints():
    """The coefficients in activations.py are the output of tools/fit_approximations.py."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "tools" / "fit_approximations.py"
    spec = importlib.util.spec_from_file_location("fit_approximations", path)
    fit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fit)
    exp2 = [float(np.float32(c)) for c in fit.fit_exp2()]
    p, q = fit.fit_erf()
    assert np.allclose(exp2, activations._EXP2, rtol=1e-6, atol=0)
    assert np.allclose([float(np.float32(c)) for c in p], activations._ERF_P, rtol=1e-5, atol=1e-12)
    assert np.allclose([float(np.float32(c)) for c in q], activations._ERF_Q, rtol=1e-5, atol=1e-12)
    assert math.isclose(activations._EXP2[0], 1.0)
