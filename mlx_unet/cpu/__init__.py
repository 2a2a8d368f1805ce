"""The CPU fast path, a layer over the plain MLX models: OpenBLAS, per-tap and Winograd
convolution (and the upsampler fused with the per-tap one), padded Linear products,
arithmetic-only activations, GroupNorm fused with SiLU, chunked attention, and reuse of freed
memory (``heap``: a VAE forward, a pipeline call).

``accelerate(model)`` swaps the kernels in, and a half-precision model then computes in float32
from its half weights (``widen``). ``prepare(model)``, which ``from_pretrained`` calls,
does so by default on the CPU (``kernels_enabled``); ``MLX_UNET_CPU_KERNELS=0`` or
``cpu_kernels=False`` keeps the plain code path, the one Metal and CUDA run.
"""

from . import blas

# Before anything imports MLX: MLX binds its BLAS symbols when its library loads.
blas.preload()

from .swap import ENV_SWITCH, accelerate, computes_in, is_accelerated, kernels_enabled, on_cpu, prepare  # noqa: E402
from .widen import held_in_float32  # noqa: E402

__all__ = ["ENV_SWITCH", "accelerate", "blas", "computes_in", "held_in_float32", "is_accelerated",
           "kernels_enabled", "on_cpu", "prepare"]
