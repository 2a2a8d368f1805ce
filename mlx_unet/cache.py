"""Start from what the user has: a Hub repo id, a diffusers folder or an original single file is
converted once, into a cache, and reused; a converted folder is used where it is.

    from mlx_unet.cache import cached_pipeline, converted_pipeline
    folder = cached_pipeline("stabilityai/stable-diffusion-xl-base-1.0")      # cached, kept
    with converted_pipeline("model.safetensors", use_cache=False) as folder:  # a temporary folder
        ...

The cache is ``$MLX_UNET_CACHE``, by default ``mlx-unet`` in the user's cache folder
(``$XDG_CACHE_HOME``, else ``~/.cache``). Each entry is a converted pipeline folder named
``<source name>-<dtype>[-q<bits>]-<key>``, holding ``mlx_unet_cache.json``, the record of what it
was made from. The key is a hash of the source (a local file's resolved path, size and mtime; a
local folder's files likewise; a Hub repo's id and the commit its revision resolves to) and of the
options that change the output (dtypes, quantization, the folder format).

A local source's models that converting would leave value for value as they are (safetensors
weights in the model's dtype, or in half precision for a float32 one) are linked rather than
copied (``mlx_unet.linked``): the entry records where each tensor lies in the source, a few
hundred KB, and loading reads the source itself: a first run does not wait for gigabytes to be
written, nor does the disk hold the model twice.

An entry is complete once its record is in it: ``convert()`` renames a finished folder into place
and the record is written after it, so an interrupted or killed conversion leaves no entry that a
later call takes as done. Conversions of one entry are serialised by a lock file beside it (the
second process waits, then reuses the first one's result); the partial folders of a killed
process are removed by the next conversion.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from . import jsonfile
from .configs.base import DTYPES, FORMAT_VERSION
from .configs.quantization import Quantization
from .convert import convert
from .convert.layout import MODEL_INDEX, Options
from .convert.plan import PipelinePlan
from .convert.quantized import QuantizationChoice, choose_quantization
from .convert.resolve import plan_source
from .convert.writer import check_output_options, linkable
from .errors import ConversionError
from .model_source import Source, locate, source_identity
from .pipelines.model_sizes import text_encoder_bytes, unet_bytes
from .version import package_version

CACHE_ENV = "MLX_UNET_CACHE"
RECORD = "mlx_unet_cache.json"
# Besides the weights: tokenizer files, configs, safetensors headers, and the file system's blocks.
SPACE_ALLOWANCE = 32 * 2**20
# The quantized models' sizes, from their configs (the dense ones are counted from the source's tensors).
_QUANTIZED_BYTES = {"unet": unet_bytes, "text_encoder": text_encoder_bytes, "text_encoder_2": text_encoder_bytes}
# convert()'s folders beside its output while it writes: ".<entry>.<random>.partial" / ".old".
_LEFTOVER = re.compile(r"\.(?P<entry>.+)\.[^.]+\.(partial|old)")


def cache_dir() -> Path:
    """Where converted pipelines are kept: ``$MLX_UNET_CACHE``, else ``mlx-unet`` in
    ``$XDG_CACHE_HOME`` or ``~/.cache``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base).expanduser() if base else Path.home() / ".cache") / "mlx-unet"


# ---------------------------------------------------------------------- what is written


@dataclass(frozen=True)
class _Settings:
    """The conversion's options that change its output, checked."""

    dtype: str
    vae_dtype: str | None
    prediction_type: str | None
    quantization: QuantizationChoice
    allow_pickle: bool

    def key_fields(self) -> dict[str, Any]:
        q = self.quantization
        return {"dtype": self.dtype, "vae_dtype": self.vae_dtype, "prediction_type": self.prediction_type,
                "format_version": FORMAT_VERSION,
                "unet_quantization": q.unet.to_dict() if q.unet else None,
                "text_encoder_quantization": q.text_encoders.to_dict() if q.text_encoders else None}

    def convert(self, source: str, out_dir: Path, revision: str | None, progress: bool, link: bool) -> None:
        q = self.quantization
        # Dense text encoders beside a quantized UNet are asked for as such (convert's default would quantize them).
        text = q.text_encoders if q.text_encoders is not None else False if q.unet is not None else None
        convert(source, out_dir, dtype=self.dtype, vae_dtype=self.vae_dtype, revision=revision,
                allow_pickle=self.allow_pickle, progress=progress, quantize=q.unet, quantize_text_encoders=text,
                prediction_type=self.prediction_type, link=link)


def _settings(dtype: str, vae_dtype: str | None, prediction_type: str | None, quantize: Quantization | int | None,
              quantize_text_encoders: Any, allow_pickle: bool) -> _Settings:
    check_output_options(dtype, vae_dtype, prediction_type)
    choice = choose_quantization(quantize, None, None, quantize_text_encoders, unet_only=False)
    return _Settings(dtype, vae_dtype, prediction_type, choice, allow_pickle)


def _options(settings: _Settings, revision: str | None) -> Options:
    return Options(settings.dtype, settings.vae_dtype, revision=revision, allow_pickle=settings.allow_pickle,
                   prediction_type=settings.prediction_type)


def _entry_name(source: Source, settings: _Settings, key: str) -> str:
    """``<source name>-<dtype>[-q<bits>]-<key>``: readable in a listing, unique by the key."""
    base = source.text.replace("/", "--") if source.kind == "hub" else source.path.resolve().name
    if source.kind == "file":
        base = Path(base).stem
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._-")[:64] or "model"
    unet = settings.quantization.unet
    return f"{base}-{settings.dtype}{f'-q{unet.bits}' if unet else ''}-{key[:12]}"


def _links_source(found: Source) -> bool:
    """Whether a cache entry of ``found`` links the models it would leave unchanged: a local source
    is passed again on every run, so its files are there (a Hub snapshot could be pruned; a
    temporary conversion links any source, which outlives it)."""
    return found.kind in ("file", "folder")


def _written_bytes(plan: PipelinePlan, quantization: QuantizationChoice, link: bool) -> int:
    """The size of the converted weights: each tensor in its output dtype, the quantized models
    as the quantization policy leaves them, the linked ones nothing."""
    total = 0
    for name, model in plan.models.items():
        size = DTYPES[model.dtype].size
        wanted = quantization.for_model(name)
        if wanted is not None and name in _QUANTIZED_BYTES:
            total += _QUANTIZED_BYTES[name](model.config, size, wanted)
        elif link and linkable(model):
            continue
        else:
            total += size * sum(math.prod(take.shape(model.source.shapes[take.key])) for take in model.names.values())
    return total


def _checked_plan(source: Source, settings: _Settings, revision: str | None, where: Path, fix: str,
                  link: bool) -> None:
    """Refuse, before anything is written, a source that is not a whole pipeline, and a file
    system without room for the converted one (``fix``: where else to write it)."""
    plan = plan_source(source.text, _options(settings, revision), False, None)
    if not isinstance(plan, PipelinePlan):
        raise ConversionError(f"{source.text} holds only a UNet (no text encoders or VAE), which cannot make an "
                              "image alone; pass the whole pipeline (a diffusers folder with model_index.json, a "
                              "full single-file checkpoint, or its Hub repo id).")
    needed = _written_bytes(plan, settings.quantization, link) + SPACE_ALLOWANCE
    free = shutil.disk_usage(where).free
    if free < needed:
        raise ConversionError(f"converting {source.text} needs about {_size(needed)} but the file system of "
                              f"{where} has {_size(free)} free; free some space or {fix}.")


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.0f} MB"


# ---------------------------------------------------------------------- the cache itself


_CACHE_FIX = f"set {CACHE_ENV} to a folder you can write, or pass --no-cache"


def _writable_base(root: Path) -> Path:
    """The cache folder, or where it will be made: the nearest folder that exists; one sentence
    on why the cache cannot be used, before anything is read or written."""
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        problem = "is a file, not a folder" if existing == root else f"cannot be made: {existing} is a file"
        raise ConversionError(f"the mlx-unet cache {root} {problem}; {_CACHE_FIX}.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConversionError(f"the mlx-unet cache {root} cannot be written ({existing} is not writable); "
                              f"{_CACHE_FIX}.")
    return existing


def _make(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConversionError(f"the mlx-unet cache {root} cannot be made ({e.strerror or e}); {_CACHE_FIX}.") from None


@contextmanager
def _locked(lock: Path, waiting: Callable[[], None], blocking: bool = True) -> Iterator[bool]:
    """An exclusive lock on the file ``lock`` while inside (released when the process ends, however
    it ends); yields False if ``blocking`` is off and another process holds it."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConversionError(f"the mlx-unet cache {lock.parent} cannot be written ({e.strerror or e}); "
                              f"{_CACHE_FIX}.") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not blocking:
                yield False
                return
            waiting()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(fd)


def _lock_file(root: Path, entry_name: str) -> Path:
    return root / f".{entry_name}.lock"


def _remove_leftovers(root: Path, own: str) -> None:
    """Remove the partial folders that killed conversions left (``own``: the entry whose lock this
    process holds; others' only where no process holds their lock)."""
    for leftover in root.iterdir():
        match = _LEFTOVER.fullmatch(leftover.name)
        if match is None or not leftover.is_dir():
            continue
        if match["entry"] == own:
            shutil.rmtree(leftover, ignore_errors=True)
            continue
        with _locked(_lock_file(root, match["entry"]), lambda: None, blocking=False) as free:
            if free:
                shutil.rmtree(leftover, ignore_errors=True)


def _record(entry: Path) -> dict[str, Any] | None:
    """The entry's record, if it is complete (None: absent, unreadable, or no pipeline beside it)."""
    try:
        record = jsonfile.read_json(entry / RECORD, "cache record", ConversionError)
    except ConversionError:
        return None
    return record if (entry / MODEL_INDEX).is_file() else None


def _write_record(entry: Path, record: dict[str, Any]) -> None:
    """Written beside the converted files and renamed into place: the entry is complete at once."""
    partial = entry / f".{RECORD}.partial"
    partial.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(partial, entry / RECORD)


def _logger(progress: bool, log: Callable[[str], None] | None) -> Callable[[str], None]:
    if log is not None:
        return log
    return (lambda message: print(message, file=sys.stderr)) if progress else (lambda message: None)


def _cached(found: Source, settings: _Settings, revision: str | None, progress: bool,
            say: Callable[[str], None]) -> Path:
    """The cache entry of ``found``, converted now if it is not complete."""
    root = cache_dir()
    identity = source_identity(found, revision)
    fields = {"source": identity, "options": settings.key_fields()}
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    entry = root / _entry_name(found, settings, key)
    if (_record(entry) or {}).get("key") == key:  # (a cache shared read-only serves too)
        say(f"using {found.text} as converted before: {entry}")
        return entry
    base = _writable_base(root)
    commit = identity.get("commit", revision)
    link = _links_source(found)
    _checked_plan(found, settings, commit, base, f"set {CACHE_ENV} to a folder on a larger disk", link)
    _make(root)
    with _locked(_lock_file(root, entry.name), lambda: say(f"waiting for another mlx-unet converting {found.text}")):
        if (_record(entry) or {}).get("key") == key:  # converted by the process this one waited for
            say(f"using {found.text} as converted before: {entry}")
            return entry
        _remove_leftovers(root, entry.name)
        shutil.rmtree(entry, ignore_errors=True)  # an entry without its record is incomplete
        say(f"converting {found.text} once, into the mlx-unet cache: {entry}")
        settings.convert(found.text, entry, commit, progress, link)
        _write_record(entry, {"key": key, **fields, "requested_revision": revision, "mlx_unet": package_version(),
                              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return entry


@contextmanager
def converted_pipeline(source: str | Path, *, use_cache: bool = True, dtype: str = "float16",
                       vae_dtype: str | None = None, revision: str | None = None,
                       prediction_type: str | None = None, quantize: Quantization | int | None = None,
                       quantize_text_encoders: Quantization | int | str | bool | None = None,
                       allow_pickle: bool = False, progress: bool = True,
                       log: Callable[[str], None] | None = None) -> Iterator[Path]:
    """``with converted_pipeline(source) as folder:``, the converted pipeline folder of ``source``.

    ``source``: a converted pipeline folder (used as it is, the options ignored), a diffusers
    folder, an original single-file checkpoint, or a Hub repo id (at ``revision``).
    ``use_cache``: converted into the cache the first time and reused after (kept when the block
    ends); without, converted into a temporary folder (under ``$TMPDIR``) that is removed when the
    block ends, however it ends. The options are ``mlx_unet.convert.convert``'s, and each
    combination is its own cache entry. The models that converting would leave unchanged are
    linked, not copied (``convert(link=True)``), in a temporary folder and in the entries of local
    files and folders: they read the source, which the next run passes again. ``progress``: the
    conversion's progress and this module's messages (which conversion was reused or made) on stderr; ``log``: where the messages go instead.
    Raises an ``MlxUnetError`` (one sentence) before anything is written for a source that is none of
    these or not a whole pipeline, a cache folder that cannot be written, or too little free space.
    """
    settings = _settings(dtype, vae_dtype, prediction_type, quantize, quantize_text_encoders, allow_pickle)
    found = locate(source)
    if found.kind == "converted":
        yield found.path
        return
    if found.kind == "converted UNet":
        raise ConversionError(f"{found.text} is a UNet alone converted by mlx-unet (convert --unet-only); a pipeline "
                              "needs its text encoders and VAE too: pass the whole checkpoint, or convert it without "
                              "--unet-only.")
    say = _logger(progress, log)
    if use_cache:
        yield _cached(found, settings, revision, progress, say)
        return
    temporary = Path(tempfile.mkdtemp(prefix="mlx-unet-"))
    try:
        _checked_plan(found, settings, revision, temporary, "set TMPDIR to a folder on a larger disk", True)
        say(f"converting {found.text} into a temporary folder, removed after this run: {temporary}")
        settings.convert(found.text, temporary / "pipeline", revision, progress, True)
        yield temporary / "pipeline"
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def cached_pipeline(source: str | Path, **options: Any) -> Path:
    """The cached converted pipeline folder of ``source`` (``converted_pipeline``'s options), for
    code that keeps it beyond a ``with`` block."""
    with converted_pipeline(source, use_cache=True, **options) as folder:
        return folder
