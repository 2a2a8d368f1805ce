"""Safetensors read and written one tensor at a time.

Converting an SDXL checkpoint must not hold it in memory: the reader parses and validates the
header, then reads each tensor's bytes on demand; the writer lays out the header from the tensor
specs first and then streams the data. (The ``safetensors`` package cannot hand bfloat16 to numpy,
and its writers take every tensor at once.)
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, NoReturn

import mlx.core as mx
import numpy as np

from .errors import WeightsError
from .jsonfile import InvalidJSON, json_type, parse_json


# safetensors dtype name -> (numpy dtype of the stored bytes, MLX dtype it reads as)
_DTYPES = {
    "F64": (np.float64, mx.float32),  # MLX has no float64 on every device; weights never need it
    "F32": (np.float32, mx.float32),
    "F16": (np.float16, mx.float16),
    "BF16": (np.uint16, mx.bfloat16),  # numpy has no bfloat16: read the bits, view them in MLX
    "I64": (np.int64, mx.int64),
    "I32": (np.int32, mx.int32),
    "I16": (np.int16, mx.int16),
    "I8": (np.int8, mx.int8),
    "U32": (np.uint32, mx.uint32),  # a quantized layer's packed weights
    "U8": (np.uint8, mx.uint8),  # the mx formats' shared exponents
    "BOOL": (np.bool_, mx.bool_),
}
_NAMES = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32", mx.uint8: "U8"}
_BITS = {mx.float32: mx.uint32, mx.float16: mx.uint16, mx.bfloat16: mx.uint16, mx.uint32: mx.uint32,
         mx.uint8: mx.uint8}
_MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors name, e.g. "F16"
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int

    @property
    def mlx_dtype(self) -> mx.Dtype:
        """The dtype the tensor has in MLX as read (F64 becomes float32)."""
        return _DTYPES[self.dtype][1]


def _short(value) -> str:
    # A hostile header can hold megabytes in one entry; the message shows its start.
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_count(value) -> bool:
    # JSON's true is a Python int and 2.0 compares equal to 2: the format's counts are integers only.
    return type(value) is int and value >= 0


class SafetensorsReader:
    """The header of a safetensors file, validated; ``read(name)`` loads one tensor.

    The header is held to the reference loader's rules (the ``safetensors`` package: integer
    counts, tensors that cover the data exactly, metadata of strings), and refused too where
    readers could disagree on its tensors (a name given twice, of which the reference keeps the
    last). A refusal is a ``WeightsError`` naming the file, its problem and ``fix`` (what to do).
    """

    def __init__(self, path: str | Path, fix: str = "download or copy it again"):
        self.path = Path(path)
        self.fix = fix
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                head = f.read(8)
                if len(head) < 8:
                    self._refuse(f"is not a safetensors file (only {size} bytes)")
                (header_len,) = struct.unpack("<Q", head)
                if header_len > min(_MAX_HEADER, size - 8):
                    self._refuse("is not a safetensors file (its first 8 bytes do not give a header length that "
                                 "fits the file)")
                raw = f.read(header_len)
        except FileNotFoundError:
            self._refuse("does not exist")
        except IsADirectoryError:
            self._refuse("is a folder, not a safetensors file")
        except PermissionError:
            self._refuse("cannot be read (permission denied)", "make it readable")
        except OSError as e:
            self._refuse(f"cannot be read ({e.strerror or e})")
        try:
            header = parse_json(raw)
        except InvalidJSON as e:
            self._corrupt(f"not valid JSON: {e.reason}")
        if not isinstance(header, dict):
            self._corrupt(f"a JSON {json_type(header)}, not an object")
        self.metadata: dict[str, str] = self._parse_metadata(header.pop("__metadata__", None))
        data_start = 8 + header_len
        self.tensors = {name: self._parse_entry(name, entry, data_start) for name, entry in header.items()}
        data_end = self._check_tiling(data_start)
        if data_end > size:
            last = max(self.tensors.values(), key=lambda t: t.end)
            self._refuse(f"is truncated: tensor {last.name!r} ends at byte {data_end} but the file has {size} bytes")
        if data_end < size:
            self._corrupt(f"the file has {size - data_end} bytes after its last tensor")

    def _refuse(self, problem: str, fix: str | None = None) -> NoReturn:
        raise WeightsError(f"{self.path} {problem}; {fix or self.fix}.")

    def _corrupt(self, problem: str) -> NoReturn:
        self._refuse(f"has a corrupt safetensors header ({problem})")

    def _parse_metadata(self, metadata) -> dict[str, str]:
        if metadata is None:
            return {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            self._corrupt("__metadata__ must map names to strings")
        return metadata

    def _parse_entry(self, name: str, entry, data_start: int) -> TensorInfo:
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            self._corrupt(f"entry {name!r} is {_short(entry)}, not a dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            self._corrupt(f"entry {name!r} has shape {_short(shape)}, not a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
            self._corrupt(f"entry {name!r} has data_offsets {_short(offsets)}, not two non-negative integers")
        if not isinstance(dtype, str):
            self._corrupt(f"entry {name!r} has dtype {_short(dtype)}, not a name")
        if dtype not in _DTYPES:
            self._refuse(f"holds tensor {name!r} of dtype {_short(dtype)}, which mlx-unet does not read (it reads "
                         f"{', '.join(_DTYPES)})", "convert the weights to float16, bfloat16 or float32")
        begin, end = offsets
        if end - begin != math.prod(shape) * np.dtype(_DTYPES[dtype][0]).itemsize:
            self._corrupt(f"{name!r} is {dtype} {shape} but its data_offsets span {end - begin} bytes")
        return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)

    def _check_tiling(self, data_start: int) -> int:
        """The end of the data: the tensors, in file order, must cover it with neither gaps nor
        overlaps (bytes that two tensors share, or that none owns, are the reference's refusal)."""
        end = data_start
        for info in sorted(self.tensors.values(), key=lambda t: (t.begin, t.end)):
            if info.begin != end:
                where = "overlaps the tensor before it" if info.begin < end else "leaves a gap before it"
                self._corrupt(f"tensor {info.name!r} at data bytes {info.begin - data_start} to "
                              f"{info.end - data_start} {where}")
            end = info.end
        return end

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def keys(self):
        return self.tensors.keys()

    def read_numpy(self, name: str, buffer: np.ndarray | None = None,
                   rows: tuple[int, int] | None = None) -> np.ndarray:
        """The stored values (bfloat16 comes back as its uint16 bits), read into the start of
        ``buffer`` (bytes, as large as the tensor) where given, else into a new array; ``rows=(i,
        n)``: the i-th of n equal blocks of rows alone (the first axis must divide by n)."""
        info = self.tensors[name]
        dtype = np.dtype(_DTYPES[info.dtype][0])
        begin, end = self.byte_range(name, rows)
        shape = info.shape if rows is None else (info.shape[0] // rows[1], *info.shape[1:])
        if buffer is None:
            out = np.empty(shape, dtype=dtype)
        else:
            out = buffer[:end - begin].view(dtype).reshape(shape)
        with open(self.path, "rb") as f:
            f.seek(begin)
            if f.readinto(memoryview(out.reshape(-1)).cast("B")) != end - begin:
                raise WeightsError(f"{self.path} is truncated while reading {name!r}.")
        return out

    def byte_range(self, name: str, rows: tuple[int, int] | None = None) -> tuple[int, int]:
        """Where tensor ``name`` lies in the file (absolute offsets, end excluded); ``rows``: its
        i-th of n equal blocks of rows, as ``read_numpy`` takes them."""
        info = self.tensors[name]
        if rows is None:
            return info.begin, info.end
        index, count = rows
        block = (info.end - info.begin) // count
        return info.begin + index * block, info.begin + (index + 1) * block

    def read(self, name: str) -> mx.array:
        info = self.tensors[name]
        array = mx.array(self.read_numpy(name))
        if info.dtype == "BF16":
            array = array.view(mx.bfloat16)
        elif info.dtype == "F64":
            array = array.astype(mx.float32)
        return array


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to write: its name, final shape and dtype, and how to produce it when its turn comes."""

    name: str
    shape: tuple[int, ...]
    dtype: mx.Dtype
    produce: Callable[[], mx.array]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.size


def write_safetensors(path: str | Path, specs: Iterable[TensorSpec], metadata: dict[str, str] | None = None,
                      on_tensor: Callable[[TensorSpec], None] | None = None) -> None:
    """Write ``specs`` to ``path``, producing and freeing one tensor at a time.

    The caller owns atomicity (write into a temporary folder, then rename).
    """
    specs = list(specs)
    header: dict[str, object] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": _NAMES[spec.dtype], "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format allows space padding; aligned data helps mmap readers
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for spec in specs:
            array = spec.produce()
            if tuple(array.shape) != tuple(spec.shape) or array.dtype != spec.dtype:
                # Not a user error: the header is already written from the specs, so a producer that
                # disagrees with its own spec is a bug in the writer's caller.
                raise ValueError(f"{spec.name}: produced {array.dtype} {array.shape}, declared {spec.dtype} {spec.shape}")
            f.write(memoryview(np.array(mx.contiguous(array).view(_BITS[spec.dtype]))).cast("B"))
            if on_tensor is not None:
                on_tensor(spec)
        f.flush()
        os.fsync(f.fileno())  # on disk before the caller renames the folder into place
