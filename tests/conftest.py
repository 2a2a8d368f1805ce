import gc
import os

# Exact float32 matmuls on MLX's CUDA backend too (TF32 would make the 1e-4 bound meaningless).
os.environ.setdefault("MLX_ENABLE_TF32", "0")

import mlx_unet  # noqa: E402,F401  (first, so the optimised BLAS is loaded before mlx)
import mlx.core as mx  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(os.cpu_count() or 1)


@pytest.fixture(autouse=True)
def release_memory():
    """Full-size tests hold 10 GB models: hand freed memory back before the next test, including
    what MLX keeps in its buffer cache."""
    yield
    gc.collect()
    mx.clear_cache()
