"""PyTorch UNet checkpoints -> MLX weight folders (``config.json`` + ``model.safetensors``).

Sources: a Hub repo id, a diffusers folder (pipeline root or its ``unet/``), or an original
single-file checkpoint. Tensors stream one at a time from the source to the output file, and the
output folder appears only when complete (written beside it, then renamed into place).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import mlx.core as mx

from .config import ConfigError, UNetConfig
from .safetensors_io import SafetensorsError, SafetensorsReader, TensorSpec, write_safetensors
from .single_file import SingleFileError, describe_non_unet, ema_name, parse
from .unet import UNet2DConditionModel
from .weights import WeightsError, check_shapes, model_shapes, torch_to_mlx_layout, torch_to_mlx_shape

FORMAT_VERSION = "1"
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
WEIGHTS = "diffusion_pytorch_model"
OUTPUT_WEIGHTS = "model.safetensors"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ConversionError(ValueError):
    """A source that cannot be converted, with what to do about it."""


USER_ERRORS = (ConversionError, ConfigError, WeightsError, SafetensorsError, SingleFileError)


# ---------------------------------------------------------------------- tensor sources


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
            try:
                obj = torch.load(file, map_location="cpu", weights_only=True)
            except Exception as e:  # torch raises many kinds for corrupt or unsafe pickles
                raise ConversionError(f"{file} could not be loaded as a weights-only PyTorch pickle ({e}).") from None
            if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
                obj = obj["state_dict"]  # Lightning .ckpt
            if not isinstance(obj, dict):
                raise ConversionError(f"{file} does not hold a state dict (it holds {type(obj).__name__}).")
            self.tensors.update({k: v for k, v in obj.items() if isinstance(v, torch.Tensor)})
        self.shapes = {k: tuple(v.shape) for k, v in self.tensors.items()}

    def read(self, key: str) -> mx.array:
        import torch

        tensor = self.tensors[key]
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
            return mx.array(tensor.float().numpy()).astype(mx.bfloat16)
        return mx.array(tensor.numpy())


def _open_tensors(files: Sequence[Path], allow_pickle: bool) -> TensorSource:
    pickles = [f for f in files if f.suffix in PICKLE_SUFFIXES]
    if not pickles:
        return SafetensorsSource(files)
    if not allow_pickle:
        raise ConversionError(
            f"{pickles[0]} is a PyTorch pickle, and loading a pickle can run code hidden in it. Prefer a "
            ".safetensors file; if you trust this one, pass --allow-pickle (it is then loaded with "
            "torch.load(weights_only=True))."
        )
    return PickleSource(files)


# ---------------------------------------------------------------------- plans


@dataclass
class Plan:
    """What to write: the config, and each diffusers parameter name's key in the source."""

    config: UNetConfig
    source: TensorSource
    names: dict[str, str]
    description: str
    notes: list[str] = field(default_factory=list)


def _weight_candidates(variant: str | None, prefer_half: bool):
    """(weights file, shard pattern if it is an index) in order of preference.

    Without ``variant``, the fp16 variant is preferred when converting to half precision (half the
    bytes to read, nothing lost) and the full-precision weights otherwise; any safetensors file
    comes before any pickle.
    """
    variants = [variant] if variant else (["fp16", None] if prefer_half else [None, "fp16"])
    for ext in ("safetensors", "bin"):
        for v in variants:
            tag = f".{v}" if v else ""
            yield f"{WEIGHTS}{tag}.{ext}", None
            yield f"{WEIGHTS}.{ext}.index{tag}.json", f"{WEIGHTS}{tag}-*-of-*.{ext}"


def _weight_files(folder: Path, variant: str | None, prefer_half: bool) -> list[Path]:
    """The weight files of a diffusers model folder: one file, or an index's shards."""
    for name, shard_pattern in _weight_candidates(variant, prefer_half):
        path = folder / name
        if not path.is_file():
            continue
        if shard_pattern is None:
            return [path]
        try:
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
            raise ConversionError(f"{path} is not a valid shard index (no weight_map).") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ConversionError(
                f"{folder} is missing {len(missing)} of the {len(shards)} shards listed in {name} "
                f"({', '.join(missing[:3])}); download them again."
            )
        return [folder / s for s in shards]
    wanted = f"{WEIGHTS}.{variant}.safetensors" if variant else f"{WEIGHTS}.safetensors (or .fp16.safetensors, sharded, .bin)"
    raise ConversionError(f"no UNet weights in {folder}: expected {wanted}.")


def _unet_folder(folder: Path) -> Path:
    if (folder / "unet" / "config.json").is_file():
        return folder / "unet"  # a pipeline root
    if (folder / "config.json").is_file():
        return folder
    raise ConversionError(
        f"{folder} is not a diffusers model: expected unet/config.json (pipeline folder) or config.json (UNet folder)."
    )


def plan_diffusers_folder(folder: Path, variant: str | None, prefer_half: bool, allow_pickle: bool,
                          config: UNetConfig | None = None) -> Plan:
    unet = _unet_folder(folder)
    config = config or UNetConfig.from_json(unet / "config.json")
    files = _weight_files(unet, variant, prefer_half)
    source = _open_tensors(files, allow_pickle)
    names = {k: k for k in source.shapes}
    shown = files[0].name if len(files) == 1 else f"{len(files)} shards"
    return Plan(config, source, names, f"diffusers folder {unet} ({shown})")


def plan_single_file(path: Path, allow_pickle: bool, ema: bool, config: UNetConfig | None = None) -> Plan:
    source = _open_tensors([path], allow_pickle)
    if describe_non_unet(list(source.shapes)) == "a UNet in diffusers' layout":
        # A lone diffusers weights file: its config sits beside it, or comes from --config.
        if config is None:
            if not (path.parent / "config.json").is_file():
                raise ConversionError(
                    f"{path} is a UNet in diffusers' layout without a config.json beside it; pass the folder, or --config."
                )
            config = UNetConfig.from_json(path.parent / "config.json")
        return Plan(config, source, {k: k for k in source.shapes}, f"diffusers weights {path}")

    parsed = parse(source.shapes)
    if config is not None and config != parsed.config:
        notes = [f"using the given config instead of the inferred {parsed.family} one"]
    else:
        notes = []
    names = parsed.names
    left = ", ".join(f"{what} ({n} tensors)" for what, n in parsed.ignored.items())
    if left:
        notes.append(f"left alone: {left}")
    if ema:
        ema_names = {d: ema_name(k) for d, k in names.items()}
        present = sum(k in source.shapes for k in ema_names.values())
        if present == len(ema_names):
            names = ema_names
            notes.append("using the EMA weights")
        elif present == 0:
            notes.append("warning: --ema given but the file has no EMA weights; converting the regular weights")
        else:
            raise ConversionError(f"the file's EMA weights are incomplete ({present} of {len(ema_names)} tensors).")
    return Plan(config or parsed.config, source, names, f"{parsed.family} single-file checkpoint {path}", notes)


def fetch_from_hub(repo_id: str, revision: str | None, variant: str | None, prefer_half: bool) -> Path:
    """Download (or, with HF_HUB_OFFLINE=1, find in the cache) only a repo's UNet config and weights."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    unet_patterns = ["config.json", f"{WEIGHTS}*", "unet/config.json", f"unet/{WEIGHTS}*"]
    if constants.HF_HUB_OFFLINE:
        try:
            folder = huggingface_hub.snapshot_download(
                repo_id, revision=revision, local_files_only=True, allow_patterns=unet_patterns
            )
        except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
            raise ConversionError(
                f"HF_HUB_OFFLINE=1 and {repo_id} (revision {revision or 'main'}) is not in the Hugging Face "
                f"cache ({constants.HF_HUB_CACHE}); run once online or unset HF_HUB_OFFLINE."
            ) from None
        folder = Path(folder)
        try:
            unet = _unet_folder(folder)
            _weight_files(unet, variant, prefer_half)
        except ConversionError as e:
            raise ConversionError(f"HF_HUB_OFFLINE=1 and the cached snapshot of {repo_id} is incomplete: {e}") from None
        return unet

    try:
        files = set(huggingface_hub.list_repo_files(repo_id, revision=revision))
    except RepositoryNotFoundError:
        raise ConversionError(f"{repo_id} is not a Hub repo you can access (check the name, or log in).") from None
    except Exception as e:  # HTTP errors, and whatever the HTTP client raises when offline
        raise ConversionError(
            f"could not list {repo_id} on the Hub ({type(e).__name__}: {e}); with a cached copy, set HF_HUB_OFFLINE=1."
        ) from None
    sub = "unet/" if "unet/config.json" in files else "" if "config.json" in files else None
    if sub is None:
        raise ConversionError(f"{repo_id} has no unet/config.json or config.json: not a diffusers UNet or pipeline.")
    available = {f[len(sub):] for f in files if f.startswith(sub) and "/" not in f[len(sub):]}
    chosen = _choose_from_listing(available, variant, prefer_half, repo_id)
    patterns = [sub + "config.json"] + [sub + p for p in chosen]
    try:
        folder = huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except Exception as e:
        raise ConversionError(f"downloading {repo_id} failed ({type(e).__name__}: {e}).") from None
    return Path(folder) / sub


def _choose_from_listing(available: set[str], variant: str | None, prefer_half: bool, repo_id: str) -> list[str]:
    """Download patterns for the weights ``_weight_files`` would pick, from a repo file listing."""
    for name, shard_pattern in _weight_candidates(variant, prefer_half):
        if name in available:
            return [name] if shard_pattern is None else [name, shard_pattern]
    raise ConversionError(f"{repo_id} has no UNet weights ({WEIGHTS}[.fp16].safetensors).")


# ---------------------------------------------------------------------- writing


class _Progress:
    """One line, redrawn in place on a terminal; every 10% as a new line otherwise."""

    def __init__(self, total: int, enabled: bool, stream=sys.stderr):
        self.total, self.done, self.enabled, self.stream = max(total, 1), 0, enabled, stream
        self.tty = stream.isatty()
        self.last_decile = -1

    def __call__(self, nbytes: int) -> None:
        if not self.enabled:
            return
        self.done += nbytes
        pct = 100 * self.done // self.total
        text = f"converting: {pct:3d}% ({self.done / 1e9:.2f} / {self.total / 1e9:.2f} GB)"
        if self.tty:
            self.stream.write("\r" + text + ("\n" if self.done >= self.total else ""))
            self.stream.flush()
        elif pct // 10 > self.last_decile:
            self.last_decile = pct // 10
            print(text, file=self.stream, flush=True)


@dataclass
class ConversionResult:
    out_dir: Path
    config: UNetConfig
    tensors: int
    bytes: int
    nonfinite: list[str]
    notes: list[str]


def _check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ConversionError(f"{out_dir} exists and is not a folder.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ConversionError(f"{out_dir} exists and is not empty; pass --force to replace it.")


def _replace_dir_atomically(out_dir: Path, write: Callable[[Path], None], force: bool) -> None:
    """Run ``write`` on a fresh folder beside ``out_dir``, then rename it into place.

    On any failure the partial folder is removed and an existing ``out_dir`` is left untouched.
    """
    _check_out_dir(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    old = None
    try:
        write(partial)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(partial, 0o777 & ~umask)  # mkdtemp made it private; the result is an ordinary folder
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
            os.rename(out_dir, old / "previous")
        os.rename(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        if old is not None and (old / "previous").exists() and not out_dir.exists():
            os.rename(old / "previous", out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _resolve(source: str, out_dir: Path, variant, revision, allow_pickle, ema, prefer_half, config) -> Plan:
    path = Path(source).expanduser()
    if path.exists():
        resolved = path.resolve()
        out = out_dir.resolve()
        if out == resolved or out in resolved.parents:
            raise ConversionError(f"OUT_DIR {out_dir} would replace the source {source}; choose another folder.")
        if path.is_dir():
            return plan_diffusers_folder(path, variant, prefer_half, allow_pickle, config)
        return plan_single_file(path, allow_pickle, ema, config)
    if _REPO_ID.match(source) and not source.startswith((".", "/", "~")):
        folder = fetch_from_hub(source, revision, variant, prefer_half)
        plan = plan_diffusers_folder(folder, variant, prefer_half, allow_pickle, config)
        plan.description = f"Hub repo {source}" + (f"@{revision}" if revision else "")
        return plan
    raise ConversionError(f"{source} is neither a file, a folder nor a Hub repo id (owner/name).")


def convert(
    source: str | Path,
    out_dir: str | Path,
    dtype: str = "float16",
    variant: str | None = None,
    revision: str | None = None,
    force: bool = False,
    ema: bool = False,
    allow_pickle: bool = False,
    config: str | Path | None = None,
    progress: bool = True,
) -> ConversionResult:
    """Convert a UNet checkpoint to an MLX folder that ``UNet2DConditionModel.from_pretrained`` loads.

    ``source``: a Hub repo id, a diffusers folder, or an original single-file checkpoint.
    ``config``: a diffusers config.json (or folder) to use instead of the source's or the inferred one.
    Raises one of ``USER_ERRORS`` for unusable input; nothing is written then.
    """
    if dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
    target = DTYPES[dtype]
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, force)  # before any download or reading
    override = UNetConfig.from_json(config) if config is not None else None
    plan = _resolve(str(source), out_dir, variant, revision, allow_pickle, ema, target != mx.float32, override)

    expected = model_shapes(UNet2DConditionModel(plan.config))  # shapes only: nothing is allocated
    given = {d: torch_to_mlx_shape(plan.source.shapes[k]) for d, k in plan.names.items()}
    try:
        check_shapes(expected, given)
    except WeightsError as e:
        raise WeightsError(f"{plan.description}: {e}") from None

    log = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)
    log(f"source: {plan.description}, {len(plan.names)} UNet tensors")
    for note in plan.notes:
        log(f"  {note}")

    names = sorted(plan.names)
    nonfinite: list[str] = []

    def produce(name: str) -> Callable[[], mx.array]:
        def read() -> mx.array:
            array = torch_to_mlx_layout(plan.source.read(plan.names[name])).astype(target)
            if not bool(mx.all(mx.isfinite(array))):
                nonfinite.append(name)
            return array

        return read

    specs = [TensorSpec(n, expected[n], target, produce(n)) for n in names]
    total = sum(spec.nbytes for spec in specs)
    show = _Progress(total, progress)
    metadata = {
        "format": "mlx",
        "mlx_unet_format_version": FORMAT_VERSION,
        "source": plan.description,
        "dtype": dtype,
    }

    def write(folder: Path) -> None:
        write_safetensors(folder / OUTPUT_WEIGHTS, specs, metadata,
                          on_tensor=lambda spec: show(spec.nbytes))
        (folder / "config.json").write_text(json.dumps(plan.config.to_diffusers_dict(), indent=2) + "\n")

    _replace_dir_atomically(out_dir, write, force)
    if nonfinite:
        shown = ", ".join(nonfinite[:5]) + (f", ... ({len(nonfinite) - 5} more)" if len(nonfinite) > 5 else "")
        log(f"warning: {len(nonfinite)} tensors hold NaN or inf values after conversion to {dtype} ({shown}); "
            "the model will likely produce NaN.")
    log(f"wrote {out_dir} ({total / 1e9:.2f} GB, {dtype})")
    return ConversionResult(out_dir, plan.config, len(names), total, nonfinite, plan.notes)


# ---------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert.py",
        description="Convert a Stable Diffusion / SDXL UNet checkpoint to an MLX weights folder "
        "(config.json + model.safetensors) for mlx_unet.UNet2DConditionModel.from_pretrained.",
        epilog="SOURCE is a Hub repo id (stabilityai/stable-diffusion-xl-base-1.0), a diffusers folder "
        "(the pipeline root or its unet/), or an original single-file checkpoint (sd_xl_base_1.0.safetensors). "
        "Set HF_HUB_OFFLINE=1 to use only the Hugging Face cache.",
    )
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("out_dir", metavar="OUT_DIR", type=Path)
    p.add_argument("--dtype", choices=list(DTYPES), default="float16", help="output dtype (default: float16)")
    p.add_argument("--variant", help="diffusers weights variant to read, e.g. fp16 (default: fp16 when "
                   "converting to half precision and the source has it)")
    p.add_argument("--revision", help="Hub branch, tag or commit (default: main)")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    p.add_argument("--ema", action="store_true", help="single files: use the EMA weights when the file has them")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept .ckpt/.bin/.pt pickles (loaded with torch.load(weights_only=True); needs torch)")
    p.add_argument("--config", type=Path, help="a diffusers UNet config.json to use instead of the source's or the inferred one")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        convert(args.source, args.out_dir, dtype=args.dtype, variant=args.variant, revision=args.revision,
                force=args.force, ema=args.ema, allow_pickle=args.allow_pickle, config=args.config,
                progress=not args.quiet)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.strerror or e} ({e.filename or ''})".replace(" ()", ""), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; nothing was written.", file=sys.stderr)
        return 130
    return 0
