"""Make MLX's Linux CPU backend use an optimised BLAS when the machine has one.

MLX's Linux wheel bundles a reference BLAS whose sgemm is about 30x slower than OpenBLAS. The
BLAS symbols MLX calls are resolved when its library loads, so loading OpenBLAS globally *before*
``import mlx`` makes MLX use it. Set ``MLX_UNET_NO_OPENBLAS=1`` to keep the bundled BLAS.

OpenBLAS picks its kernels by CPU model, and a model it does not know (a virtual machine's
"Intel Xeon Processor") gets its oldest, SSE3 kernels: on such a 2-core AVX-512 host its sgemm
ran at 63 GFLOP/s against 315 with the AVX-512 ones. So where ``OPENBLAS_CORETYPE`` is not set,
it is set from the CPU's instruction-set flags before OpenBLAS loads (``core_type``).
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

# OpenBLAS core types by the instruction sets their kernels need, best first.
CORE_TYPES = (
    ("SkylakeX", {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"}),
    ("Haswell", {"avx2", "fma"}),
)


def core_type(cpuinfo: str) -> str | None:
    """The OpenBLAS core type for an x86 CPU with the ``flags`` of ``cpuinfo`` (/proc/cpuinfo's
    text), or None where no listed kernel set fits (OpenBLAS's own choice then stands)."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return next((name for name, needed in CORE_TYPES if needed <= flags), None)
    return None


def _set_core_type() -> None:
    if "OPENBLAS_CORETYPE" in os.environ:
        return  # the user's choice
    try:
        with open("/proc/cpuinfo") as f:
            chosen = core_type(f.read())
    except OSError:
        return
    if chosen is not None:
        os.environ["OPENBLAS_CORETYPE"] = chosen


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
            if "x86_64" in path:
                _set_core_type()  # read by OpenBLAS as it loads
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            loaded = path
            break
    return loaded


def set_threads(count: int) -> None:
    """Run the loaded OpenBLAS (so MLX's matmuls) on ``count`` threads; nothing where none was
    loaded (MLX's bundled BLAS has no threads to set)."""
    if loaded:
        ctypes.CDLL(loaded).openblas_set_num_threads(count)


def threads() -> int | None:
    """The loaded OpenBLAS's thread count; None where none was loaded."""
    return ctypes.CDLL(loaded).openblas_get_num_threads() if loaded else None
