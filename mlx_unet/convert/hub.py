"""Hub sources: only the files a conversion reads are downloaded, or found in the cache offline."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable

from ..errors import ConversionError
from ..tokenizer_folder import FOLDER_FILES
from .layout import MODEL_INDEX, MODELS, SCHEDULER_CONFIG, TOKENIZERS, UNET, WEIGHTS, ModelKind, Options, listed, \
    read_json, unet_folder, weight_candidates, weight_files

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What people pass as files (weights, configs): a name ending so is a mistyped local path, never
# a repo id, and is reported missing at once instead of being looked up on the network.
_FILE_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".bin", ".pt", ".pth", ".json", ".yaml", ".yml")


def looks_local(text: str) -> bool:
    """Whether ``text`` names a local path: it exists (a link counts, even a dangling or
    looping one), starts like a path (``.``, ``/``, ``~``) or ends in a file suffix."""
    return (os.path.lexists(Path(text).expanduser()) or text.startswith((".", "/", "~", "\\"))
            or text.lower().endswith(_FILE_SUFFIXES))


def is_repo_id(text: str) -> bool:
    return bool(_REPO_ID.match(text)) and not looks_local(text)


def missing_path(text: str, what: str) -> str:
    """Why local path ``text`` cannot be read, as the start of a sentence about ``what``."""
    path = Path(text).expanduser()
    if path.is_symlink() and not path.exists():
        return (f"{what} {text} is a symbolic link to {os.readlink(path)}, which does not exist or loops back; "
                "fix the link or pass the file itself")
    return f"{what} {text} does not exist"


def is_offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE


def snapshot(repo_id: str, revision: str | None, patterns: list[str] | None, offline: bool) -> Path:
    """``patterns`` of a repo downloaded (or, offline, the cached snapshot) as a local folder."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    if offline:
        try:
            return Path(huggingface_hub.snapshot_download(
                repo_id, revision=revision, local_files_only=True, allow_patterns=patterns))
        except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
            raise ConversionError(
                f"HF_HUB_OFFLINE=1 and {repo_id} (revision {revision or 'main'}) is not in the Hugging Face "
                f"cache ({constants.HF_HUB_CACHE}); run once online or unset HF_HUB_OFFLINE."
            ) from None
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as e:
        raise ConversionError(f"downloading {repo_id} failed ({type(e).__name__}: {e}).") from None


def repo_files(repo_id: str, revision: str | None) -> set[str]:
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        return set(huggingface_hub.list_repo_files(repo_id, revision=revision))
    except RepositoryNotFoundError:
        raise ConversionError(f"{repo_id} is not a Hub repo you can access (check the name, or log in).") from None
    except Exception as e:  # HTTP errors, and whatever the HTTP client raises when offline
        raise ConversionError(
            f"could not list {repo_id} on the Hub ({type(e).__name__}: {e}); with a cached copy, set HF_HUB_OFFLINE=1."
        ) from None


def _choose_from_listing(kind: ModelKind, files: set[str], folder: str, variant: str | None, prefer_fp16: bool,
                         repo_id: str) -> list[str]:
    """Download patterns for the weights ``weight_files`` would pick in ``folder`` of a repo listing."""
    prefix = f"{folder}/" if folder else ""
    available = {f[len(prefix):] for f in files if f.startswith(prefix) and "/" not in f[len(prefix):]}
    for name, shard_pattern in weight_candidates(kind, variant, prefer_fp16):
        if name in available:
            return [prefix + name] if shard_pattern is None else [prefix + name, prefix + shard_pattern]
    raise ConversionError(f"{repo_id} has no {kind.what} weights in {folder or 'its root'} ({kind.weights}[.fp16].safetensors).")


def fetch_unet(repo_id: str, options: Options, files: set[str] | None = None) -> Path:
    """Download (or, with HF_HUB_OFFLINE=1, find in the cache) only the config and weights of a repo's UNet
    (or of the one model a repo without model_index.json holds: a UNet, a tiny VAE)."""
    prefer_fp16 = options.dtype == "float16"
    if is_offline():
        patterns = ["config.json", f"{WEIGHTS}*", "unet/config.json", f"unet/{WEIGHTS}*"]
        folder = snapshot(repo_id, options.revision, patterns, offline=True)
        try:
            unet = unet_folder(folder)
            weight_files(unet, UNET, options.variant, prefer_fp16)
        except ConversionError as e:
            raise ConversionError(f"HF_HUB_OFFLINE=1 and the cached snapshot of {repo_id} is incomplete: {e}") from None
        return unet
    files = repo_files(repo_id, options.revision) if files is None else files
    sub = "unet" if "unet/config.json" in files else "" if "config.json" in files else None
    if sub is None:
        raise ConversionError(f"{repo_id} has no unet/config.json or config.json: not a diffusers UNet or pipeline.")
    config = f"{sub}/config.json" if sub else "config.json"
    chosen = _choose_from_listing(UNET, files, sub, options.variant, prefer_fp16, repo_id)
    return snapshot(repo_id, options.revision, [config, *chosen], offline=False) / sub


def _small_files(names: Iterable[str]) -> list[str]:
    """A pipeline's configs and tokenizer files: what planning reads before any weights."""
    return [MODEL_INDEX, SCHEDULER_CONFIG, *(f"{n}/config.json" for n in names),
            *(f"{t}/{f}" for t in TOKENIZERS.values() for f in FOLDER_FILES)]


def fetch_pipeline(repo_id: str, options: Options, files: set[str]) -> Path:
    """Download a pipeline's configs, tokenizer files and one weights variant per model.

    Two steps: the configs first, since the VAE's says which dtype, so which variant, it needs.
    """
    small = [f for f in _small_files(MODELS) if f in files]
    folder = snapshot(repo_id, options.revision, small, offline=False)
    index = read_json(folder / MODEL_INDEX, "model_index.json")
    weights = []
    for name, kind in MODELS.items():
        if listed(index, name) and f"{name}/config.json" in files:  # planning names what is missing
            dtype = options.dtype_of(name, kind.parse_config(folder / name / "config.json"))
            weights += _choose_from_listing(kind, files, name, options.variant, dtype == "float16", repo_id)
    return snapshot(repo_id, options.revision, weights, offline=False) if weights else folder


def fetch_tokenizers(spec: str) -> Path:
    """The folder that --tokenizers names: a local one, or the tokenizer files of a Hub repo."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConversionError(f"--tokenizers {spec} is a file; pass a diffusers pipeline folder or a Hub repo id.")
    if looks_local(spec):
        raise ConversionError(f"{missing_path(spec, '--tokenizers')}; pass a diffusers pipeline folder or a Hub repo id.")
    if not is_repo_id(spec):
        raise ConversionError(f"--tokenizers {spec} is neither a folder nor a Hub repo id (owner/name).")
    names = [f"{t}/{f}" for t in TOKENIZERS.values() for f in FOLDER_FILES]
    if is_offline():
        return snapshot(spec, None, names, offline=True)
    files = repo_files(spec, None)
    return snapshot(spec, None, [f for f in names if f in files], offline=False)
