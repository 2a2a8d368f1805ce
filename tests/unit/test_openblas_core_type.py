"""OpenBLAS's kernels chosen from the CPU's instruction sets where it does not know the CPU model
(a virtual machine's): the flags of /proc/cpuinfo -> OPENBLAS_CORETYPE; and its thread count."""

import ctypes

from mlx_unet.cpu import blas
from mlx_unet.cpu.blas import core_type

AVX512 = "fpu sse sse2 avx avx2 fma avx512f avx512dq avx512cd avx512bw avx512vl avx512_bf16"


def cpuinfo(flags: str) -> str:
    return f"processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: {flags}\n\nprocessor\t: 1\n"


def test_the_best_kernel_set_the_flags_allow():
    assert core_type(cpuinfo(AVX512)) == "SkylakeX"
    assert core_type(cpuinfo("fpu sse sse2 avx avx2 fma avx512f")) == "Haswell"  # AVX-512 in part: not SkylakeX
    assert core_type(cpuinfo("fpu sse sse2 avx avx2 fma")) == "Haswell"
    assert core_type(cpuinfo("fpu sse sse2 avx")) is None  # OpenBLAS's own choice stands
    assert core_type("processor\t: 0\nFeatures\t: fp asimd\n") is None  # no x86 flags line


def test_set_threads_sets_the_loaded_openblas_threads():
    if blas.loaded is None:
        blas.set_threads(1)  # MLX's bundled BLAS: nothing to set, and no error
        return
    get = ctypes.CDLL(blas.loaded).openblas_get_num_threads
    before = get()
    try:
        blas.set_threads(1)
        assert get() == 1
        blas.set_threads(2)
        assert get() == 2
    finally:
        blas.set_threads(before)
