"""How a run calls the UNet: compiled or not, in low-memory mode or not, with its half-precision
weights widened for the run or not. These are settings of the run, not of the model: the UNet
comes out of a run as it went in (widened weights are narrowed back, bit for bit, unless the
caller frees the UNet next), and the process-wide MLX buffer cache limit that low-memory mode
lowers is restored when the run ends (by an exception too).
"""

from __future__ import annotations

import weakref
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator

import mlx.core as mx
from mlx.utils import tree_flatten

from ..cpu import is_accelerated, on_cpu
from ..cpu.widen import widened, widening_bytes
from ..models.unet import UNet2DConditionModel
from .memory import widening_fits

# A run widens a half-precision UNet's weights by itself from this many forwards on, and from
# NARROW_BACK_FORWARDS more where it narrows them back after it: where that pays. Measured in
# one process on a guided SDXL run at 256 px (README: "Half precision on the CPU"): widening
# them once cost 7.5 s, most of it faulting in fresh memory in this VM, narrowing them back
# 5 s, and each step then took 0.9 s less (1.2 s and 1.5 s less a forward at 32x32 and 64x64).
WIDEN_FROM_FORWARDS = 12
NARROW_BACK_FORWARDS = 6

Forward = Callable[..., mx.array]  # called as the UNet is: (sample, timestep, context, **conditioning)


class CompiledForward:
    """The UNet's forward through ``mx.compile``, made once per UNet by :func:`compiled_forward`.

    The graph is traced once per input shape and dtype: a new resolution, batch size or dtype
    traces again; new timesteps, prompts or weights of the same shapes do not (the weights are
    read at each call, so loading new ones, or fusing a LoRA, needs no recompile). Layers put
    in or taken out (a live LoRA's wrappers) make a new structure, traced apart: a trace maps
    the weights it reads by position, and a different tree of the same shapes would be read
    wrongly. Elementwise chains (norms, SiLU,
    residual adds) become one kernel each. On Metal and CUDA that saves memory traffic and
    launches. On the CPU MLX builds each fused kernel with g++ on the first call (kept on disk
    for later processes, README: "Compiled kernels") and later calls are no faster, so runs
    compile by default only off the CPU. ``benchmarks/bench_unet.py --compile`` measures both.
    """

    def __init__(self, unet: UNet2DConditionModel):
        # mx.compile keeps what it is given as ``inputs`` (the weights it reads at each call).
        # Given the UNet, the cache of compiled forwards would keep every UNet alive; so it
        # gets a dict that holds the UNet only during a call.
        self._unet = weakref.ref(unet)
        self._weights: dict[str, UNet2DConditionModel] = {}
        self._compiled: dict[tuple[str, ...], Callable] = {}  # by the UNet's parameter names

    def _denoise(self, *inputs: mx.array) -> mx.array:
        return self._unet().denoise(*inputs)

    def __call__(self, sample, timestep, encoder_hidden_states, **conditioning) -> mx.array:
        unet = self._unet()
        inputs = unet.checked_inputs(sample, timestep, encoder_hidden_states, **conditioning)
        structure = tuple(name for name, _ in tree_flatten(unet.parameters()))
        compiled = self._compiled.get(structure)
        if compiled is None:
            compiled = self._compiled[structure] = mx.compile(self._denoise, inputs=self._weights)
        self._weights["unet"] = unet
        try:
            return compiled(*inputs)
        finally:
            self._weights.clear()


# By id: modules are dicts, so not hashable (nor weak keys). An entry goes with its UNet.
_COMPILED: dict[int, CompiledForward] = {}


def compiled_forward(unet: UNet2DConditionModel) -> CompiledForward:
    """The compiled forward of ``unet``, the same one for every run on it: a new ``mx.compile``
    wrapper would trace again, and each Sampler (each image) asks for one."""
    forward = _COMPILED.get(id(unet))
    if forward is None:
        forward = _COMPILED[id(unet)] = CompiledForward(unet)
        weakref.finalize(unet, _COMPILED.pop, id(unet), None)
    return forward


@contextmanager
def cache_limit(limit_bytes: int) -> Iterator[None]:
    """MLX's buffer cache (freed buffers kept for reuse) limited to ``limit_bytes`` inside the
    ``with`` block; the previous limit is restored after it."""
    previous = mx.set_cache_limit(limit_bytes)
    try:
        yield
    finally:
        mx.set_cache_limit(previous)


@dataclass(frozen=True)
class RunSettings:
    """``compile``: run the UNet through ``mx.compile`` (:class:`CompiledForward`); None: on
    Metal and CUDA, where it pays, and not on the CPU, where it does not.
    ``low_memory``: for 8-16 GB machines, a lower peak at some cost in speed: the UNet is
    evaluated block by block (so no lazy graph of the whole forward is built and held, and none
    is compiled: this overrides ``compile``) and MLX's buffer cache is limited to
    ``cache_limit_gb`` during the run. ``benchmarks/bench_unet.py --low-memory`` measures it.
    ``widen_weights``: on the CPU kernels, hold a half-precision UNet's weights in float32 for the
    run (``cpu.widen``), and the UNet comes back as it was after it. The run computes the same
    values either way (in float32, from the half-precision weights); widened, a step skips
    widening each weight as it is used (measured in README: "Half precision on the CPU") at
    float32's memory for the weights during the run, and the run first pays for widening them
    once (and narrowing them back after it). None: widened where that pays, a run of
    ``WIDEN_FROM_FORWARDS`` forwards or more (``NARROW_BACK_FORWARDS`` more where it narrows
    them back; not in low-memory mode), and fits in the memory this process may use
    (``memory.widening_fits``).
    ``narrow_back``: False leaves widened weights in float32 after the run, for a caller that
    frees the UNet next (a pipeline's ``release_unet``).
    """

    compile: bool | None = None
    low_memory: bool = False
    cache_limit_gb: float = 0.25
    widen_weights: bool | None = None
    narrow_back: bool = True

    @property
    def compiles(self) -> bool:
        if self.low_memory:
            return False
        return not on_cpu() if self.compile is None else self.compile

    def forward(self, unet: UNet2DConditionModel) -> Forward:
        """What to call in place of ``unet(...)`` in a run with these settings."""
        if self.low_memory:
            return partial(unet, after_block=mx.eval)
        return compiled_forward(unet) if self.compiles else unet

    def widens(self, unet: UNet2DConditionModel, forwards: int = 0, sample: tuple[int, ...] = (1, 1, 1, 1)) -> bool:
        """Whether a run of ``forwards`` forwards of ``sample``'s shape (B, h, w, C) on ``unet``
        widens its half-precision weights: where asked or where it pays (``widen_weights``), on
        the CPU kernels (not on MLX's own layers, the code path of Metal and CUDA, where half
        precision pays), and where something is half."""
        if self.widen_weights is False or not (any(is_accelerated(module) for _, module in unet.named_modules())
                                               and widening_bytes(unet) > 0):
            return False
        enough = WIDEN_FROM_FORWARDS + (NARROW_BACK_FORWARDS if self.narrow_back else 0)
        return self.widen_weights or (not self.low_memory and forwards >= enough and widening_fits(unet, sample))

    def applied(self, unet: UNet2DConditionModel | None = None, forwards: int = 0,
                sample: tuple[int, ...] = (1, 1, 1, 1)) -> AbstractContextManager:
        """The settings that hold for a run of ``forwards`` forwards of ``sample``'s shape, for a
        ``with`` block: the cache limit, and ``unet``'s weights widened where ``widens`` says so."""
        stack = ExitStack()
        if self.low_memory:
            stack.enter_context(cache_limit(int(self.cache_limit_gb * 2**30)))
        if unet is not None and self.widens(unet, forwards, sample):
            stack.enter_context(widened(unet, self.narrow_back))
        return stack
