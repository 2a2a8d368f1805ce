"""Tensors by key, read one at a time from safetensors files or (on request) torch pickles."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Sequence

import mlx.core as mx

from ..errors import ConversionError
from ..safetensors_io import SafetensorsReader

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")


class TensorSource:
    """Tensors by key, PyTorch layout: ``shapes`` up front, values read one at a time."""

    shapes: dict[str, tuple[int, ...]]

    def read(self, key: str) -> mx.array:
        raise NotImplementedError


class SafetensorsSource(TensorSource):
    def __init__(self, files: Sequence[Path]):
        self.readers: dict[str, SafetensorsReader] = {}
        self.shapes = {}
        for file in files:
            reader = SafetensorsReader(file)
            for key, info in reader.tensors.items():
                if key in self.readers:
                    raise ConversionError(f"tensor {key!r} appears in both {self.readers[key].path.name} and {file.name}.")
                self.readers[key] = reader
                self.shapes[key] = info.shape

    def read(self, key: str) -> mx.array:
        return self.readers[key].read(key)


class PickleSource(TensorSource):
    """A torch pickle, loaded with ``weights_only=True`` (no arbitrary code), only on request."""

    def __init__(self, files: Sequence[Path]):
        try:
            import torch
        except ImportError:
            raise ConversionError("reading a pickle checkpoint needs PyTorch: pip install torch.") from None
        self.tensors = {}
        for file in files:
            obj = _load_pickle(torch, file)
            if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
                obj = obj["state_dict"]  # Lightning .ckpt
            if not isinstance(obj, dict):
                raise ConversionError(f"{file} does not hold a state dict (it holds a {type(obj).__name__}); pass "
                                      "a checkpoint of named tensors.")
            self.tensors.update({k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)})
        self.shapes = {k: tuple(v.shape) for k, v in self.tensors.items()}

    def read(self, key: str) -> mx.array:
        import torch

        tensor = self.tensors[key]
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
            return mx.array(tensor.float().numpy()).astype(mx.bfloat16)
        return mx.array(tensor.numpy())


def _load_pickle(torch, file: Path):
    """``torch.load(weights_only=True)`` of ``file``, its failures in our words: torch's own
    advise ``weights_only=False``, which would run whatever the file asks."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch refuses a callable or class it does not allow by naming the pickle's GLOBAL; its other
        # refusals ("Unsupported operand", ...) are bytes that are no pickle at all.
        if "GLOBAL" in str(e):
            raise ConversionError(
                f"{file} is not a plain weights pickle: it asks to run code or build objects other than "
                "tensors, so it was not loaded and nothing in it ran; convert it to safetensors with a tool "
                "you trust, or get a .safetensors version of it."
            ) from None
        raise _corrupt_pickle(file) from None
    except OSError as e:
        raise ConversionError(f"{file} cannot be read ({e.strerror or e}).") from None
    except Exception:  # torch fails on a damaged file with whatever its reader hits (EOFError, KeyError, ...)
        raise _corrupt_pickle(file) from None


def _corrupt_pickle(file: Path) -> ConversionError:
    return ConversionError(f"{file} is not a readable PyTorch pickle (it is corrupt or truncated); download or "
                           "copy it again.")


def open_tensors(files: Sequence[Path], allow_pickle: bool) -> TensorSource:
    pickles = [f for f in files if f.suffix.lower() in PICKLE_SUFFIXES]  # model.CKPT is a pickle too
    if not pickles:
        return SafetensorsSource(files)
    if not allow_pickle:
        raise ConversionError(
            f"{pickles[0]} is a PyTorch pickle, and loading a pickle can run code hidden in it; prefer a "
            ".safetensors file, or if you trust this one, pass --allow-pickle (it is then loaded with "
            "torch.load(weights_only=True))."
        )
    return PickleSource(files)
