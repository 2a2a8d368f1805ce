"""Make MLX's Linux CPU backend use an optimised BLAS when the machine has one.

MLX's Linux wheel bundles a reference BLAS whose sgemm is about 30x slower than OpenBLAS. The
BLAS symbols MLX calls are resolved when its library loads, so loading OpenBLAS globally *before*
``import mlx`` makes MLX use it. Set ``MLX_UNET_NO_OPENBLAS=1`` to keep the bundled BLAS.
"""

import ctypes
import os
import sys

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
)

loaded: str | None = None


def preload() -> str | None:
    """Load OpenBLAS with RTLD_GLOBAL if possible; returns its path, or None.

    Does nothing off Linux, when disabled, or when MLX was already imported (too late to matter).
    """
    global loaded
    if loaded or not sys.platform.startswith("linux") or os.environ.get("MLX_UNET_NO_OPENBLAS") == "1":
        return loaded
    if "mlx.core" in sys.modules:
        return None
    for path in CANDIDATES:
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            loaded = path
            break
    return loaded
