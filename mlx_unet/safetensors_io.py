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
from typing import Callable, Iterable

import mlx.core as mx
import numpy as np

from .errors import WeightsError


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
    "U8": (np.uint8, mx.uint8),
    "BOOL": (np.bool_, mx.bool_),
}
_NAMES = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16"}
_BITS = {mx.float32: mx.uint32, mx.float16: mx.uint16, mx.bfloat16: mx.uint16}
_MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors name, e.g. "F16"
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


class SafetensorsReader:
    """The header of a safetensors file, validated; ``read(name)`` loads one tensor."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightsError(f"{self.path} is not a safetensors file (only {size} bytes).")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(_MAX_HEADER, size - 8):
                raise WeightsError(
                    f"{self.path} is not a safetensors file (its first 8 bytes do not give a header "
                    "length that fits the file)."
                )
            raw = f.read(header_len)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise WeightsError(f"{self.path} has a corrupt safetensors header (not valid JSON).") from None
        if not isinstance(header, dict):
            raise WeightsError(f"{self.path} has a corrupt safetensors header (not a JSON object).")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        data_start = 8 + header_len
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            info = self._parse_entry(name, entry, data_start)
            if info.end > size:
                raise WeightsError(
                    f"{self.path} is truncated: tensor {name!r} ends at byte {info.end} but the file has "
                    f"{size} bytes; download or copy it again."
                )
            self.tensors[name] = info

    def _parse_entry(self, name: str, entry, data_start: int) -> TensorInfo:
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            itemsize = np.dtype(_DTYPES[dtype][0]).itemsize
            valid = all(isinstance(d, int) and d >= 0 for d in shape) and 0 <= begin <= end
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            raise WeightsError(f"{self.path} has a corrupt safetensors header (entry {name!r}: {entry!r}).")
        if end - begin != math.prod(shape) * itemsize:
            raise WeightsError(
                f"{self.path} has a corrupt safetensors header ({name!r} is {dtype} {list(shape)} but "
                f"spans {end - begin} bytes)."
            )
        return TensorInfo(name, dtype, shape, data_start + begin, data_start + end)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def keys(self):
        return self.tensors.keys()

    def read_numpy(self, name: str) -> np.ndarray:
        """The stored values (bfloat16 comes back as its uint16 bits)."""
        info = self.tensors[name]
        out = np.empty(info.shape, dtype=_DTYPES[info.dtype][0])
        with open(self.path, "rb") as f:
            f.seek(info.begin)
            if f.readinto(memoryview(out.reshape(-1)).cast("B")) != info.end - info.begin:
                raise WeightsError(f"{self.path} is truncated while reading {name!r}.")
        return out

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
