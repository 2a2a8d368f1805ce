import os

# Exact float32 matmuls on MLX's CUDA backend too (TF32 would make the 1e-4 bound meaningless).
os.environ.setdefault("MLX_ENABLE_TF32", "0")

import mlx_unet  # noqa: E402,F401  (first, so the optimised BLAS is loaded before mlx)
import pytest  # noqa: E402
import torch  # noqa: E402
from reference import release_memory  # noqa: E402

torch.set_num_threads(os.cpu_count() or 1)


@pytest.fixture(autouse=True)
def _release_memory_after_each_test():
    """Full-size tests hold 10 GB models: hand freed memory back before the next test."""
    yield
    release_memory()
