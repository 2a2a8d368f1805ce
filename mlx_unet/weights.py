"""Weights: PyTorch <-> MLX layout, and loading an MLX weights folder into a model by key.

The only layout difference between a diffusers checkpoint and ours is the convolution kernel:
PyTorch stores (out, in, kh, kw), MLX (out, kh, kw, in). Names are identical. The CPU kernels lay
their weights out in memory for their products (``weight_layouts``); shapes and values stay those
of the file.
"""

from __future__ import annotations

import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Container, Mapping

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from . import cpu
from .cpu import heap
from .cpu.half import HALF, float32
from .configs.base import DTYPES
from .configs.quantization import Quantization, read_quantization
from .errors import NonFiniteWarning, WeightsError
from .finite import all_finite, stored_finite
from .linked import has_links, read_links
from .naming import Take
from .quantize import prepare_structure, quantize_as_loaded, quantized_paths
from .safetensors_io import SafetensorsReader

_RECONVERT = "convert the model again with mlx-unet convert"


# PyTorch holds a convolution kernel as (out, in, kh, kw), MLX as (out, kh, kw, in).
_CONV_TO_MLX = (0, 2, 3, 1)


def torch_to_mlx_layout(array):
    """A PyTorch-layout parameter (numpy or MLX array) in MLX layout: conv kernels OIHW -> OHWI.

    A numpy result is made contiguous here, while one tensor is in hand: ``mx.array`` keeps a
    transposed view's strides, and a strided parameter is copied by every product that reads
    it until ``load_weights`` lays it out."""
    if array.ndim != 4:
        return array
    moved = array.transpose(_CONV_TO_MLX)
    return np.ascontiguousarray(moved) if isinstance(moved, np.ndarray) else moved


def torch_to_mlx_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape ``torch_to_mlx_layout`` gives a tensor of ``shape``."""
    return tuple(shape[a] for a in _CONV_TO_MLX) if len(shape) == 4 else tuple(shape)


def _names(keys, limit: int = 5) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def model_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape. Reading shapes evaluates nothing, so this is free even for SDXL."""
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


def check_shapes(expected: Mapping[str, tuple[int, ...]], given: Mapping[str, tuple[int, ...]],
                 model: str = "model") -> None:
    """Raise WeightsError unless ``given`` has exactly the ``expected`` names and (MLX-layout) shapes.
    ``model`` names what the weights are for in the message ("UNet", "VAE", ...)."""
    missing = expected.keys() - given.keys()
    unexpected = given.keys() - expected.keys()
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({_names(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({_names(unexpected)})")
    misshaped = [k for k in expected.keys() & given.keys() if tuple(given[k]) != tuple(expected[k])]
    if misshaped:
        first = sorted(misshaped)[0]
        got, want = tuple(given[first]), tuple(expected[first])
        hint = ""
        if len(got) == 4 and torch_to_mlx_shape(got) == want:
            hint = "; the convolutions are in PyTorch's OIHW layout, convert the checkpoint with convert.py first"
        problems.append(
            f"{len(misshaped)} with the wrong shape ({_names(misshaped)}; {first} is {got}, expected {want}{hint})"
        )
    if problems:
        raise WeightsError(
            f"the weights do not match this {model}'s config: {'; '.join(problems)}. "
            "Check that config.json belongs to these weights."
        )


def check_weights(model: nn.Module, weights: Mapping[str, mx.array]) -> None:
    """Raise WeightsError unless ``weights`` has exactly the model's parameter names and shapes."""
    check_shapes(model_shapes(model), {k: tuple(v.shape) for k, v in weights.items()}, _model_name(model))


def _model_name(model: nn.Module) -> str:
    return {"UNet2DConditionModel": "UNet", "AutoencoderKL": "VAE", "CLIPTextModel": "text encoder"}.get(
        type(model).__name__, type(model).__name__)


def load_weights(model: nn.Module, weights: dict[str, mx.array | StoredTensor], dtype: mx.Dtype | None = None,
                 float32_if_half: Container[str] = ()) -> None:
    """Move ``weights`` (MLX layout, diffusers names; arrays, or tensors of a file that
    ``read_weights_folder`` listed) into ``model`` after checking every key and shape.
    ``weights`` is emptied: each tensor is taken out, evaluated and put into the model before
    the next, so that the caller's copy (a file being read, say) and the model's never coexist
    for more than one tensor. Floating-point values are cast to ``dtype`` where given, and the
    parameters named in ``float32_if_half`` to float32 where they would be in half precision (the
    CPU kernels' model holds them so: ``cpu.held_in_float32``)."""
    check_weights(model, weights)
    layouts = weight_layouts(model)
    orders = {name: kernel.memory_order for name, kernel in layouts.items()}
    buffers = ReadBuffers()
    nonfinite = []
    for name in list(weights):
        value = weights.pop(name)
        if isinstance(value, StoredTensor):
            values, finite = value.read(orders.get(name), buffers)
            value = value.to_mlx(values, orders.get(name), dtype, name in float32_if_half)
        else:
            value = cast_loaded(value, dtype, name in float32_if_half)
            # Parameters are row-major (a strided one, an mx.array of a transposed numpy view say,
            # would be copied by every product that reads it), except the weights that the CPU
            # kernels lay out for their products (cpu/conv.py).
            value = layouts[name].laid_out(value) if name in layouts else mx.contiguous(value)
            check = all_finite(value)
            mx.eval(check)  # with the value: the check costs no second read of the weights
            finite = check.item()
        mx.eval(value)
        if not finite:
            nonfinite.append(name)
        _set_parameter(model, name, value)
    if nonfinite:
        shown = ", ".join(nonfinite[:5]) + (f", ... ({len(nonfinite) - 5} more)" if len(nonfinite) > 5 else "")
        warnings.warn(NonFiniteWarning(
            f"the {_model_name(model)}'s weights hold NaN or inf values in {len(nonfinite)} tensors ({shown}); it will "
            "make black images: convert the model again from an intact download."), stacklevel=2)


def cast_loaded(array: mx.array, dtype: mx.Dtype | None, float32_if_half: bool) -> mx.array:
    """A parameter read as ``array``, cast to ``dtype`` where given (floats only: not a quantized
    layer's bits), then to float32 where ``float32_if_half`` and it is in half precision: the
    half-precision values, held exactly in float32."""
    if not mx.issubdtype(array.dtype, mx.floating):
        return array
    target = loaded_dtype(array.dtype, dtype, float32_if_half)
    if dtype is not None and dtype != array.dtype:
        array = float32(array) if dtype == mx.float32 else array.astype(dtype)
    return array if array.dtype == target else float32(array)


def loaded_dtype(read: mx.Dtype, dtype: mx.Dtype | None, float32_if_half: bool) -> mx.Dtype:
    """The dtype ``cast_loaded`` gives a parameter read as ``read``."""
    if not mx.issubdtype(read, mx.floating):
        return read
    return mx.float32 if float32_if_half and (dtype or read) in HALF else dtype or read


def taken_parameter(stored, take: Take, dtype: mx.Dtype) -> mx.array:
    """The parameter ``take`` cuts from ``stored`` (a PyTorch-layout MLX array, as a source holds
    it), in MLX's layout and ``dtype``: what a conversion writes, and what a linked folder's tensor
    gives read lazily."""
    return cast_loaded(torch_to_mlx_layout(take.apply(stored)), dtype, False)


def _set_parameter(model: nn.Module, name: str, value: mx.array) -> None:
    """``model``'s parameter ``name`` (a checked one) set to ``value``: 2 us, where building a
    one-entry tree for ``model.update`` took 27-34 us a tensor (the test suite loads 150 K)."""
    *path, leaf = name.split(".")
    node = model
    for part in path:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[leaf] = value


def weight_layouts(model: nn.Module) -> dict[str, nn.Module]:
    """Parameter name -> the module that lays that weight out in memory for its products (the
    modules that have a ``laid_out`` and a ``memory_order``: the CPU kernels)."""
    return {f"{path}.weight" if path else "weight": module
            for path, module in model.named_modules() if hasattr(module, "laid_out")}


# A matrix is transposed in tiles of this many rows and columns: numpy's transposing copy of a
# whole weight reads one element per cache line (0.16 G elements/s); a tile's rows stay in cache
# while they are written as columns (0.7-2 G elements/s, float32 and float16, SDXL's shapes).
_TILE_ROWS, _TILE_COLUMNS = 64, 1024
# From this many values on, the two halves of a matrix's rows are transposed on two threads at
# once (numpy lets go of the GIL to copy): a 1280 x 11520 float16 convolution weight took 13 ms
# against 21 on one thread. Below, starting a thread costs more than it saves.
_TWO_THREADS_FROM = 1 << 20


def _transpose_into(matrix: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``matrix.T`` written into ``out`` (contiguous, of the transposed shape)."""
    half = matrix.shape[0] // 2 // _TILE_ROWS * _TILE_ROWS
    if matrix.size < _TWO_THREADS_FROM or half == 0 or (os.cpu_count() or 1) < 2:
        return _transpose_tiles(matrix, out)
    with ThreadPoolExecutor(1) as worker:
        other_half = worker.submit(_transpose_tiles, matrix[half:], out[:, half:])
        _transpose_tiles(matrix[:half], out[:, :half])
        other_half.result()  # (its exception, if any, raised here)
    return out


def _transpose_tiles(matrix: np.ndarray, out: np.ndarray) -> np.ndarray:
    rows, columns = matrix.shape
    for row in range(0, rows, _TILE_ROWS):
        for column in range(0, columns, _TILE_COLUMNS):
            out[column:column + _TILE_COLUMNS, row:row + _TILE_ROWS] = \
                matrix[row:row + _TILE_ROWS, column:column + _TILE_COLUMNS].T
    return out


def _in_mlx_layout(values: np.ndarray, buffer: np.ndarray) -> np.ndarray:
    """A PyTorch-layout parameter (a view, as ``Take`` cuts it) in MLX's layout, contiguous,
    copied into ``buffer`` where it is not so already."""
    if values.ndim == 4:
        values = values.transpose(_CONV_TO_MLX)
    if values.flags.c_contiguous:
        return values
    out = buffer[:values.nbytes].view(values.dtype).reshape(values.shape)
    np.copyto(out, values)
    return out


class ReadBuffers:
    """Byte buffers that tensors are read, cut and transposed in, reused from one tensor to the
    next: fresh memory for each would cost a page fault per 4 KiB, about as much as the read."""

    def __init__(self):
        self._buffers = [np.empty(0, np.uint8) for _ in range(3)]

    def get(self, index: int, nbytes: int) -> np.ndarray:
        if self._buffers[index].size < nbytes:
            self._buffers[index] = np.empty(nbytes, np.uint8)
        return self._buffers[index]


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a checked safetensors file, read when ``load_weights`` takes it.

    Read with numpy rather than through ``mx.load``'s lazy arrays: MLX read SDXL's UNet at about
    0.4 GB/s, checked it for NaN and inf at about 1 GB/s and transposed its weights for the CPU
    kernels at about 0.1 G elements/s, each on one thread; numpy reads at the file's speed and
    does the rest several times faster."""

    reader: SafetensorsReader
    name: str
    # A tensor of a source that a linked folder reads (``linked.py``): PyTorch's layout, cut by
    # ``take``, and held in ``held_as`` where no dtype is asked for.
    take: Take | None = None
    held_as: mx.Dtype | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        stored = self.reader.tensors[self.name].shape
        return stored if self.take is None else torch_to_mlx_shape(self.take.shape(stored))

    def read(self, memory_order: tuple[int, ...] | None, buffers: ReadBuffers) -> tuple[np.ndarray, bool]:
        """The stored values in ``buffers``, laid out in ``memory_order`` where given (a CPU
        kernel's: the first axis last), and whether they are all finite."""
        info = self.reader.tensors[self.name]
        rows = None if self.take is None else self.take.rows
        values = self.reader.read_numpy(self.name, buffers.get(0, info.end - info.begin), rows)
        finite = stored_finite(values, info.dtype)
        if self.take is not None:
            values = _in_mlx_layout(replace(self.take, rows=None).apply(values), buffers.get(2, values.nbytes))
        if memory_order is not None:
            assert memory_order == (*range(1, values.ndim), 0), memory_order
            matrix = values.reshape(values.shape[0], -1)
            out = buffers.get(1, values.nbytes)[:values.nbytes].view(values.dtype).reshape(matrix.shape[::-1])
            values = _transpose_into(matrix, out).reshape([values.shape[a] for a in memory_order])
        return values, finite

    @property
    def offset(self) -> int:
        return self.reader.tensors[self.name].begin

    @property
    def mlx_dtype(self) -> mx.Dtype:
        """The dtype ``to_mlx`` gives it where no dtype is asked for."""
        return self.held_as or self.reader.tensors[self.name].mlx_dtype

    def loaded_nbytes(self, dtype: mx.Dtype | None, float32_if_half: bool) -> int:
        """The bytes of the MLX array ``to_mlx`` makes for these arguments."""
        return math.prod(self.shape) * loaded_dtype(self.mlx_dtype, dtype, float32_if_half).size

    def to_mlx(self, values: np.ndarray, memory_order: tuple[int, ...] | None, dtype: mx.Dtype | None,
               float32_if_half: bool) -> mx.array:
        """What ``read`` gave, copied into MLX and cast (``cast_loaded``), in the tensor's shape
        (laid out in ``memory_order`` in memory)."""
        array = mx.array(values)
        if self.reader.tensors[self.name].dtype == "BF16":
            array = array.view(mx.bfloat16)
        # float64 as float32 where no dtype is asked for: MLX has no float64 on every device.
        array = cast_loaded(array, dtype or self.mlx_dtype, float32_if_half)
        return array if memory_order is None else array.transpose(np.argsort(memory_order).tolist())


def read_weights_folder(model: nn.Module, folder: Path, lazy: bool = False) -> dict[str, mx.array | StoredTensor]:
    """Every tensor of every ``*.safetensors`` file in ``folder`` (a linked folder: each source
    tensor its table names, ``linked.py``), each file's header checked first: as ``StoredTensor``s, or (``lazy``) as MLX arrays that read their data when evaluated
    (what a computation over every weight, quantizing them say, takes)."""
    if has_links(folder):
        return _read_links(folder, lazy)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightsError(
            f"no .safetensors weights in {folder}; an MLX {_model_name(model)} folder holds config.json "
            "and the weights convert.py writes."
        )
    weights: dict[str, mx.array | StoredTensor] = {}
    for file in files:
        # The converter's validation first (it reads the header alone): mx.load takes some malformed
        # headers (overlapping tensors, say) and fails on others without naming the file.
        reader = SafetensorsReader(file, fix=_RECONVERT)
        if lazy:
            try:
                part = mx.load(str(file))
            except Exception as e:  # MLX raises RuntimeError/ValueError with a terse message
                raise WeightsError(f"{file} is not a readable safetensors file ({e}); {_RECONVERT}.") from None
        else:
            part = {name: StoredTensor(reader, name) for name in reader.keys()}
        duplicated = weights.keys() & part.keys()
        if duplicated:
            raise WeightsError(f"{file} repeats tensors already loaded from another file ({_names(duplicated)}).")
        weights.update(part)
    return weights


def _read_links(folder: Path, lazy: bool) -> dict[str, mx.array | StoredTensor]:
    """A linked folder's parameters, read from their sources (``read_weights_folder``'s result)."""
    links, dtype = read_links(folder)
    held = DTYPES[dtype]
    if not lazy:
        stored = {name: StoredTensor(reader, take.key, take, held) for name, (reader, take) in links.items()}
        # Loaded in the order the source holds them: one pass through each file, as a copy is read.
        return dict(sorted(stored.items(), key=lambda item: (str(item[1].reader.path), item[1].offset)))
    files = {path: mx.load(str(path)) for path in {reader.path for reader, _ in links.values()}}
    return {name: taken_parameter(files[reader.path][take.key], take, held) for name, (reader, take) in links.items()}


def has_weights(folder: Path) -> bool:
    """Whether ``folder`` holds a model's weights: safetensors files, or a table of links to them."""
    return has_links(folder) or any(folder.glob("*.safetensors"))


def load_weights_folder(model: nn.Module, folder: Path, dtype: mx.Dtype | None = None,
                        quantize: Quantization | None = None, cpu_kernels: bool | None = False) -> None:
    """Load every ``*.safetensors`` file in ``folder`` into ``model``: into quantized layers where
    the folder is quantized (its config's ``mlx_unet`` section), or quantizing the policy's layers
    as they load where ``quantize`` asks (never a dense copy of the model either way). The CPU
    kernels (``cpu_kernels``, as ``cpu.prepare`` takes it) go in before the weights, so that each
    weight is laid out for them as it loads, in the same pass; with them a half-precision model
    loads all but their weights in float32 (``cpu.held_in_float32``)."""
    stored = read_quantization(folder, _model_name(model))
    # Quantizing as it loads computes over each weight in MLX: lazy arrays, read as evaluated.
    lazy = stored is None and quantize is not None
    weights = read_weights_folder(model, folder, lazy=lazy)
    if stored is not None:
        if quantize is not None and quantize != stored:
            raise WeightsError(f"{folder} is quantized already ({stored.describe()}), so it cannot be quantized to "
                               f"{quantize.describe()}; convert the dense model with those settings instead.")
        prepare_structure(model, stored, quantized_paths(weights))
    elif quantize is not None:
        weights = quantize_as_loaded(model, weights, quantize, dtype)
    cpu.prepare(model, cpu_kernels, loaded=False)
    float32_if_half = cpu.held_in_float32(model) if cpu.kernels_enabled(cpu_kernels) else set()
    # A block of the reused heap of its own where no pipeline call holds one: the memory the weights
    # are about to take is faulted in on every core at once, and stays in the heap for their copies
    # (on the GPU MLX's buffers are not malloc's).
    with heap.reused_heap():
        if not lazy and mx.default_device() == mx.cpu:
            heap.prefault(sum(value.loaded_nbytes(dtype, name in float32_if_half) for name, value in weights.items()))
        load_weights(model, weights, dtype, float32_if_half)
    if dtype is not None:
        mx.clear_cache()  # the file-dtype copies just freed would otherwise stay in MLX's cache


def load_pretrained(model: nn.Module, folder: Path, dtype: mx.Dtype | None, cpu_kernels: bool | None,
                    quantize: Quantization | None = None) -> nn.Module:
    """``model`` (just built from its config) with ``folder``'s weights and, where
    ``cpu.kernels_enabled(cpu_kernels)``, the CPU kernels: config -> build -> quantize -> kernels
    -> load -> (half precision on the kernels) all but their weights held in float32."""
    load_weights_folder(model, folder, dtype, quantize, cpu_kernels)
    return model
