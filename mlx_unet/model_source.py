"""What the user passed as a model: which kind of source a path or name is (``locate``), and what
identifies its content (``source_identity``), for the cache's key."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import jsonfile
from .configs.base import FORMAT_KEY, SECTION
from .convert.hub import is_offline, is_repo_id, looks_local, missing_path, snapshot
from .convert.layout import MODEL_INDEX
from .errors import ConversionError


@dataclass(frozen=True)
class Source:
    """What a source the user passed (``text``) names. ``kind``: "converted" (a pipeline folder
    mlx-unet wrote), "converted UNet" (a UNet alone that it wrote), "file" (a checkpoint),
    "folder" (a diffusers folder), or "hub" (a repo id; ``path`` None)."""

    text: str
    kind: str
    path: Path | None = None


def locate(source: str | Path) -> Source:
    """What ``source`` is, from its name and small files alone; one sentence when it is none of
    the kinds above."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_file():
        return Source(text, "file", path)
    if path.is_dir():
        index = path / MODEL_INDEX
        if index.is_file():
            converted = FORMAT_KEY in jsonfile.read_json(index, MODEL_INDEX, ConversionError)
            return Source(text, "converted" if converted else "folder", path)
        config = path / "config.json"
        if config.is_file() and SECTION in jsonfile.read_json(config, "config.json", ConversionError):
            return Source(text, "converted UNet", path)
        if config.is_file() or (path / "unet" / "config.json").is_file():
            return Source(text, "folder", path)
        raise ConversionError(f"{text} is a folder that holds no model (no {MODEL_INDEX}, unet/config.json or "
                              "config.json); pass a diffusers or converted pipeline folder, a checkpoint file or a "
                              "Hub repo id.")
    if looks_local(text):
        raise ConversionError(f"{missing_path(text, 'the model')}; check the path.")
    if is_repo_id(text):
        return Source(text, "hub")
    raise ConversionError(f"{text} is neither a file, a folder nor a Hub repo id (owner/name); pass one of these.")


def _hub_commit(repo_id: str, revision: str | None) -> str:
    """The commit ``revision`` of a Hub repo is at: from the Hugging Face cache when offline."""
    if is_offline():
        return snapshot(repo_id, revision, [MODEL_INDEX], offline=True).name  # snapshots/<commit>
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        return huggingface_hub.model_info(repo_id, revision=revision).sha
    except RevisionNotFoundError:
        raise ConversionError(f"{repo_id} has no revision {revision!r} on the Hub; check the branch, tag or commit.") \
            from None
    except RepositoryNotFoundError:
        raise ConversionError(f"{repo_id} is not a Hub repo you can access (check the name, or log in).") from None
    except Exception as e:  # HTTP errors, and whatever the HTTP client raises when offline
        raise ConversionError(f"could not look {repo_id} up on the Hub ({type(e).__name__}: {e}); with a cached "
                              "copy, set HF_HUB_OFFLINE=1.") from None


def _folder_digest(folder: Path) -> str:
    """A hash of every file's path, size and modification time under ``folder`` (links followed)."""
    lines = []
    for parent, _, files in os.walk(folder):
        for name in files:
            path = Path(parent) / name
            try:
                stat = path.stat()
                lines.append(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}")
            except OSError:  # a dangling link: its absence is part of the state
                lines.append(f"{path.relative_to(folder)}\0missing")
    return hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()


def source_identity(source: Source, revision: str | None) -> dict[str, Any]:
    """What identifies the source's content: anything that changes it changes this."""
    if source.kind == "hub":
        return {"hub": source.text, "commit": _hub_commit(source.text, revision)}
    path = source.path.resolve()
    if source.kind == "file":
        stat = path.stat()
        return {"file": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return {"folder": str(path), "files": _folder_digest(path)}
