import gc
import os

# Exact float32 matmuls on MLX's CUDA backend too (TF32 would make the 1e-4 bound meaningless).
os.environ.setdefault("MLX_ENABLE_TF32", "0")

import mlx_unet  # noqa: E402,F401  (first, so the optimised BLAS is loaded before mlx)
import mlx.core as mx  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from reference import release_memory  # noqa: E402

torch.set_num_threads(os.cpu_count() or 1)

# torch, diffusers and transformers create millions of long-lived objects at import; frozen, they
# are no longer scanned by every gc.collect() (0.25 s each otherwise, after every test).
gc.freeze()

_RELEASE_ABOVE_BYTES = 2 * 2**30

CODE_PATHS = {"cpu-kernels": "1", "mlx": "0"}


@pytest.fixture(params=list(CODE_PATHS))
def code_path(request, monkeypatch):
    """Run the test on both code paths: with the CPU kernels swapped in, and as plain MLX (the
    code Metal and CUDA run, executed here on the CPU), through ``MLX_UNET_CPU_KERNELS``, which
    every loader (``cpu.prepare``) reads. Off the CPU only the plain path exists by default."""
    monkeypatch.setenv(mlx_unet.cpu.ENV_SWITCH, CODE_PATHS[request.param])
    return request.param


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cpu_only`` assert what only the CPU backend does: skipped elsewhere."""
    if mx.default_device() != mx.cpu:
        skip = pytest.mark.skip(reason="asserts the CPU backend's behaviour; this device is not the CPU")
        for item in items:
            if "cpu_only" in item.keywords:
                item.add_marker(skip)


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
