"""A converted pipeline folder, read and checked whole before any weights are loaded.

``mlx-unet convert`` writes ``model_index.json`` (diffusers' layout plus our format marker), one
folder per model (``config.json`` + ``*.safetensors``), the tokenizer folders and the scheduler
config. Everything a run needs from the folder is checked here, from the small files alone: that
each listed part is there, that the configs parse and that the models fit together; so a broken
folder is refused in one sentence at once, not after the UNet has loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..configs.base import FORMAT_KEY, FORMAT_VERSION, newer_format
from ..configs.clip import CLIPTextConfig
from ..configs.families import unet_family
from ..configs.pipeline import check_components_fit
from ..configs.quantization import Quantization, read_quantization
from ..configs.unet import UNetConfig
from ..configs.vae import VAEConfig
from ..errors import InputError, MlxUnetError, PipelineError
from ..jsonfile import read_json
from ..schedulers import Scheduler, make_scheduler, read_config, shipped_sampler
from ..schedulers.names import sampler_name
from ..weights import has_weights
from .arguments import check_int

MODEL_INDEX = "model_index.json"
SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"
# (tokenizer, text encoder) pairs in the order SDXL concatenates their states. SD 1.x / 2.x have
# the first only, an SDXL refiner the second only.
TEXT_PARTS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
REQUIRED = ("unet", "vae")


@dataclass(frozen=True)
class PipelineFolder:
    """What a converted folder holds, checked: its parts' folders and configs."""

    path: Path
    index: dict[str, Any]
    unet: UNetConfig
    vae: VAEConfig
    encoders: tuple[CLIPTextConfig | None, CLIPTextConfig | None]  # by TEXT_PARTS; None where absent
    scheduler: dict[str, Any] | None  # the shipped scheduler config, if any
    quantized: dict[str, Quantization] = field(default_factory=dict)  # the parts stored quantized
    unet_folder: Path | None = None  # a UNet run in place of the pipeline's own (``with_unet``)

    def quantization(self, part: str, requested: Quantization | None) -> Quantization | None:
        """How part ``part`` will be quantized: as stored, else as ``requested`` at load."""
        return self.quantized.get(part, requested)

    @property
    def family(self) -> str:
        """"an SD 1.x", "an SDXL base (6 time ids)", ... for messages."""
        name = unet_family(self.unet)
        return f"{'an' if name.startswith('S') else 'a'} {name}"

    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        # diffusers' SDXL pipelines default it to true; SD 1.x / 2.x pipelines have no such
        # setting and always encode the (empty) negative prompt.
        return bool(self.index.get("force_zeros_for_empty_prompt", self.unet.has_text_time_embedding))

    @property
    def text_encoder_names(self) -> list[str]:
        """The text encoders the pipeline has, by TEXT_PARTS: quantized alike, so any one tells."""
        return [encoder for _, encoder in TEXT_PARTS if self.part(encoder) is not None]

    def part(self, name: str) -> Path | None:
        """The folder of part ``name`` ("unet", "tokenizer_2", ...), None where the pipeline has none."""
        if name == "unet" and self.unet_folder is not None:
            return self.unet_folder
        return _part(self.path, self.index, name)

    def with_unet(self, folder: str | Path) -> "PipelineFolder":
        """This pipeline with the UNet mlx-unet converted into ``folder`` in place of its own (a
        distilled UNet on its base model: SDXL-Lightning's, Hyper-SD's); checked to fit the
        pipeline's text encoders and VAE."""
        folder = Path(folder).expanduser()
        if not (folder / "config.json").is_file():
            raise PipelineError(f"{folder} holds no converted UNet (no config.json); convert it with mlx-unet convert "
                                "--unet-only.")
        try:
            unet = UNetConfig.from_json(folder)
            check_components_fit(unet, [e for e in self.encoders if e is not None], self.vae)
            stored = read_quantization(folder, "unet")
        except MlxUnetError as e:
            raise PipelineError(f"the UNet in {folder} does not fit {self.path}: {e}") from None
        if not has_weights(folder):
            raise PipelineError(f"{folder} holds no .safetensors weights; convert the UNet again.")
        quantized = {k: q for k, q in self.quantized.items() if k != "unet"}
        if stored is not None:
            quantized["unet"] = stored
        return replace(self, unet=unet, quantized=quantized, unet_folder=folder)

    def sampler_name(self, name: str | None = None) -> str:
        """``name`` (in any known spelling) as ours, or the sampler the model ships with (Euler
        where we have none of its kind)."""
        if name is None:
            return shipped_sampler(self.scheduler)
        try:
            return sampler_name(name)[0]
        except InputError as e:
            raise PipelineError(str(e)) from None

    def make_scheduler(self, name: str | Scheduler | None = None, sigmas: str | None = None, **overrides):
        """The named sampler (see ``schedulers.make_scheduler``) on the shipped scheduler config,
        by default the one the model ships with; ``sigmas`` a sigma schedule (Align-Your-Steps
        takes this model's family's). A scheduler made already is used as it is."""
        if isinstance(name, Scheduler):
            if sigmas is not None or overrides:
                raise InputError("sigmas go with a sampler's name; a scheduler object carries its own.")
            return name
        family = "sdxl" if self.unet.has_text_time_embedding else "sd"
        return make_scheduler(name or self.sampler_name(), self.scheduler, sigmas=sigmas, family=family, **overrides)

    def check_clip_skip(self, clip_skip: int | None, flag: str | None = None) -> None:
        """Refuse a clip_skip that leaves a text encoder no layer (``flag``: the option's name)."""
        if clip_skip is not None:
            layers = min(c.num_hidden_layers for c in self.encoders if c is not None)
            check_int("clip_skip", clip_skip, 0, layers - 1, flag)

    @classmethod
    def read(cls, folder: str | Path) -> "PipelineFolder":
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            what = "is a file, not a folder" if folder.exists() else "does not exist"
            raise PipelineError(f"{folder} {what}; pass a pipeline folder written by mlx-unet convert.")
        index_path = folder / MODEL_INDEX
        if not index_path.is_file():
            hint = " (mlx-unet convert --unet-only writes a UNet, not a pipeline)" if (folder / "config.json").is_file() else ""
            raise PipelineError(f"{folder} has no {MODEL_INDEX}{hint}; convert a whole pipeline with mlx-unet convert first.")
        index = read_json(index_path, MODEL_INDEX, PipelineError, "convert the pipeline again")
        _check_format(folder, index)
        _check_entries(index_path, index)
        def part(name: str) -> Path | None:
            return _part(folder, index, name)

        missing = [name for name in REQUIRED if part(name) is None]
        if all(part(encoder) is None for _, encoder in TEXT_PARTS):
            missing.append("text_encoder")
        if missing:
            raise PipelineError(f"{folder} has no {', '.join(missing)} in {MODEL_INDEX}; convert the whole "
                                "pipeline with mlx-unet convert (without --unet-only).")
        for tokenizer, encoder in TEXT_PARTS:
            if (part(tokenizer) is None) != (part(encoder) is None):
                raise PipelineError(f"{folder} lists only one of {tokenizer} and {encoder} in {MODEL_INDEX}; "
                                    "each text encoder needs its tokenizer: convert the pipeline again.")
        for name in index:
            if not name.startswith("_") and part(name) is not None and not part(name).is_dir():
                raise PipelineError(f"{folder} lists {name} in {MODEL_INDEX} but has no {name}/ folder; "
                                    "copy the converted folder whole, or convert it again.")
        try:
            unet = UNetConfig.from_json(folder / "unet")
            vae = VAEConfig.from_json(folder / "vae")
            encoders = tuple(None if part(e) is None else CLIPTextConfig.from_json(part(e))
                             for _, e in TEXT_PARTS)
            scheduler = read_config(folder / SCHEDULER_CONFIG) if (folder / SCHEDULER_CONFIG).is_file() else None
            check_components_fit(unet, [e for e in encoders if e is not None], vae)
            stored = {name: read_quantization(part(name), name) for name in ("unet", *(e for _, e in TEXT_PARTS))
                      if part(name) is not None}
        except MlxUnetError as e:
            raise PipelineError(f"{folder}: {e}") from None
        for name in ("unet", "vae", *(e for _, e in TEXT_PARTS)):
            weights = part(name)
            if weights is not None and not has_weights(weights):
                raise PipelineError(f"{weights} holds no .safetensors weights; copy the converted folder whole, "
                                    "or convert it again.")
        return cls(folder, index, unet, vae, encoders, scheduler, {k: q for k, q in stored.items() if q is not None})


def _part(folder: Path, index: dict[str, Any], name: str) -> Path | None:
    entry = index.get(name)
    return folder / name if isinstance(entry, list) and entry[0] is not None else None


def _check_format(folder: Path, index: dict[str, Any]) -> None:
    if FORMAT_KEY not in index:
        raise PipelineError(
            f"{folder} is a diffusers pipeline (PyTorch weights), not a converted one; convert it with "
            f"mlx-unet convert {folder} OUT_DIR and pass OUT_DIR."
        )
    if index[FORMAT_KEY] != FORMAT_VERSION:
        fix = ("upgrade mlx-unet (pip install -U mlx-unet) to read it" if newer_format(index[FORMAT_KEY])
               else "convert the model again with this version's mlx-unet convert")
        raise PipelineError(
            f"{folder} was converted in format {index[FORMAT_KEY]!r}, and this version reads {FORMAT_VERSION!r}; {fix}."
        )


def _check_entries(path: Path, index: dict[str, Any]) -> None:
    """Each part is listed as diffusers writes it: [library, class], or [null, null] where absent."""
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list):
            continue  # metadata, and settings such as force_zeros_for_empty_prompt
        listed = len(entry) == 2 and all(isinstance(x, str) for x in entry)
        absent = len(entry) == 2 and entry[0] is None and entry[1] is None
        if not (listed or absent):
            raise PipelineError(f"{path} lists {name} as {entry!r}, not [library, class] or [null, null] as "
                                "diffusers writes it; convert the pipeline again.")
    zeros = index.get("force_zeros_for_empty_prompt", True)
    if not isinstance(zeros, bool):
        raise PipelineError(f"{path} sets force_zeros_for_empty_prompt to {zeros!r}, not true or false; "
                            "convert the pipeline again.")
    for name in REQUIRED:
        if name in index and not isinstance(index[name], list):
            raise PipelineError(f"{path} lists {name} as {index[name]!r}, not [library, class]; convert the pipeline again.")
