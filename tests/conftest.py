"""Shared by both tiers. tests/unit/ needs MLX only (it runs without torch installed);
tests/parity/ compares against diffusers / transformers computed in the same run."""

import os

# Exact float32 matmuls on MLX's CUDA backend too (TF32 would make the 1e-4 bound meaningless).
os.environ.setdefault("MLX_ENABLE_TF32", "0")

import mlx_unet  # noqa: E402  (first, so the optimised BLAS is loaded before mlx)
import mlx.core as mx  # noqa: E402
import pytest  # noqa: E402

CODE_PATHS = {"cpu-kernels": "1", "mlx": "0"}


@pytest.fixture(params=list(CODE_PATHS))
def code_path(request, monkeypatch):
    """Run the test on both code paths: with the CPU kernels swapped in, and as plain MLX (the
    code Metal and CUDA run, executed here on the CPU), through ``MLX_UNET_CPU_KERNELS``, which
    every loader (``cpu.prepare``) reads. Off the CPU only the plain path exists by default."""
    monkeypatch.setenv(mlx_unet.cpu.ENV_SWITCH, CODE_PATHS[request.param])
    return request.param


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Each test's own conversion cache (``$MLX_UNET_CACHE``): no test reads or fills the user's."""
    root = tmp_path / "cache"
    monkeypatch.setenv("MLX_UNET_CACHE", str(root))
    return root


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cpu_only`` assert what only the CPU backend does: skipped elsewhere."""
    if mx.default_device() != mx.cpu:
        skip = pytest.mark.skip(reason="asserts the CPU backend's behaviour; this device is not the CPU")
        for item in items:
            if "cpu_only" in item.keywords:
                item.add_marker(skip)
