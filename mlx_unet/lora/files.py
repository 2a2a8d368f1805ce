"""Where a LoRA comes from: a local file (or a folder holding one), or a Hub repo.

Files are read with the converter's readers and rules: safetensors headers validated before any
tensor is read; a PyTorch pickle only with ``allow_pickle`` (``--allow-pickle``), and then with
``torch.load(weights_only=True)``. Anything that looks like a path (a file suffix, ``./``, ``/``,
``~``, or it exists) is a local path, never looked up on the Hub.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from ..convert.hub import is_offline, is_repo_id, missing_path, repo_files, snapshot
from ..convert.sources import PICKLE_SUFFIXES, SafetensorsSource, open_tensors
from ..errors import WeightsError
from .formats import LoRAFile, parse

# diffusers' save_lora_weights names its file so; a folder or repo with several files prefers it.
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


def _pick(files: list[str], where: str) -> str:
    """The LoRA file among ``files`` (names) of a folder or repo."""
    if DIFFUSERS_WEIGHTS in files:
        return DIFFUSERS_WEIGHTS
    weights = sorted(f for f in files if f.endswith(".safetensors")) or \
        sorted(f for f in files if f.lower().endswith(PICKLE_SUFFIXES))
    if len(weights) == 1:
        return weights[0]
    if not weights:
        raise WeightsError(f"{where} holds no .safetensors LoRA file.")
    shown = ", ".join(weights[:5]) + (", ..." if len(weights) > 5 else "")
    raise WeightsError(f"{where} holds {len(weights)} weight files ({shown}); name the one to load "
                       "(weight_name=..., or pass the file's path).")


def resolve(source: str | Path, weight_name: str | None = None, revision: str | None = None) -> Path:
    """The local LoRA file ``source`` names: a file, a folder holding one, or a Hub repo id (its
    file downloaded, or found in the cache with ``HF_HUB_OFFLINE=1``)."""
    text = str(source)
    if is_repo_id(text):
        return _from_hub(text, weight_name, revision)
    path = Path(text).expanduser()
    if path.is_dir():
        return path / (weight_name or _pick(sorted(p.name for p in path.iterdir() if p.is_file()), str(path)))
    if not path.exists():
        raise WeightsError(f"{missing_path(text, 'the LoRA')}; check the path.")
    return path


def _from_hub(repo_id: str, weight_name: str | None, revision: str | None) -> Path:
    offline = is_offline()
    if weight_name is None:
        if offline:
            cached = snapshot(repo_id, revision, ["*.safetensors"], offline=True)
            weight_name = _pick(sorted(p.name for p in cached.iterdir()), f"the cached {repo_id}")
        else:
            root = [f for f in repo_files(repo_id, revision) if "/" not in f]
            weight_name = _pick(root, f"the Hub repo {repo_id}")
    return snapshot(repo_id, revision, [weight_name], offline) / weight_name


def read_tensors(path: Path, allow_pickle: bool) -> tuple[dict[str, mx.array], dict[str, str]]:
    """Every tensor of the file by key, and its safetensors metadata (empty for a pickle)."""
    if path.suffix and path.suffix.lower() not in _SUFFIXES:
        raise WeightsError(f"{path} is not a LoRA file (.safetensors, or with --allow-pickle "
                           f"{', '.join(PICKLE_SUFFIXES)}).")
    source = open_tensors([path], allow_pickle)
    tensors = {key: source.read(key) for key in source.shapes}
    readers = list(source.readers.values()) if isinstance(source, SafetensorsSource) else []
    return tensors, readers[0].metadata if readers else {}


def read_lora(source: str | Path, *, weight_name: str | None = None, revision: str | None = None,
              allow_pickle: bool = False) -> LoRAFile:
    """Read a LoRA (a file, a folder holding one, or a Hub repo id) and group it by module; its
    ``format`` says what wrote it."""
    path = resolve(source, weight_name, revision)
    tensors, metadata = read_tensors(path, allow_pickle)
    return parse(path.name, tensors, metadata)
