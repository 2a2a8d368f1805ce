"""LoRAs on a whole pipeline: one file applied to the UNet and the text encoders at once.

Each part is checked at once (the text encoders' against their configs: a file that cannot
apply is refused before anything changes). The UNet's part is applied at once; the text
encoders are loaded for each prompt and released after it, and a UNet released before a decode
(``DiffusionPipeline.release_unet``) is loaded again for the next image, so their parts are
applied again to each freshly loaded model, in the order the LoRAs were loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..configs.clip import CLIPTextConfig
from ..lora import LoRAFile, read_lora
from ..lora.apply import AppliedLoRA, Update, checked_scale, model_layers, plan, report_unmatched, text_encoder_layers
from ..models.clip import CLIPTextModel
from ..naming.lora import PARTS, TEXT_ENCODER, TEXT_ENCODER_2, UNET

if TYPE_CHECKING:
    from .diffusion import DiffusionPipeline

_ENCODER_PARTS = (TEXT_ENCODER, TEXT_ENCODER_2)  # in the order of folder.TEXT_PARTS


class PipelineLoRA:
    """One LoRA on a pipeline, made by ``DiffusionPipeline.load_lora``. ``remove()`` takes it off
    every part (fused weights restored bit for bit); ``set_scale`` changes its strength."""

    def __init__(self, pipeline: "DiffusionPipeline", lora: LoRAFile, scales: dict[str, float], fuse: bool):
        self.lora, self.fuse = lora, fuse
        self._pipeline = pipeline
        configs: dict[str, CLIPTextConfig | None] = dict(zip(_ENCODER_PARTS, pipeline.parts.encoders))
        # Everything checked before anything changes.
        planned: dict[str, list[Update]] = {}
        unmatched: list[str] = []
        for part in lora.parts:
            if part == UNET:
                planned[part], left = plan(lora, model_layers(pipeline.unet))
            elif configs.get(part) is not None:
                planned[part], left = plan(lora, text_encoder_layers(configs[part], part))
            else:  # a part this pipeline has not (the refiner has no first text encoder)
                left = list(lora.modules[part])
            unmatched += left
        report_unmatched(lora, unmatched, sum(len(u) for u in planned.values()))
        self._planned = planned
        self.scales = dict(scales)
        self._unet: AppliedLoRA | None = None
        self.apply_to_unet(pipeline.unet)
        self._encoders: dict[str, AppliedLoRA] = {}
        if pipeline.loaded_text_encoders is not None:
            self.apply_to_encoders(pipeline.loaded_text_encoders)

    @property
    def parts(self) -> dict[str, int]:
        """How many layers of each part this LoRA updates."""
        return {part: len(updates) for part, updates in self._planned.items() if updates}

    def apply_to_unet(self, unet) -> None:
        """Apply the UNet part to the pipeline's (freshly loaded) UNet."""
        if self._planned.get(UNET):
            self._unet = AppliedLoRA(unet, self.lora, UNET, self._planned[UNET], self.scales[UNET], self.fuse)

    def unet_released(self) -> None:
        self._unet = None

    def apply_to_encoders(self, encoders: list[CLIPTextModel | None]) -> None:
        """Apply the text-encoder parts to freshly loaded encoders (in ``TEXT_PARTS`` order)."""
        self._encoders = {}
        for part, encoder in zip(_ENCODER_PARTS, encoders):
            if encoder is not None and self._planned.get(part):
                self._encoders[part] = AppliedLoRA(encoder, self.lora, part, self._planned[part],
                                                   self.scales[part], self.fuse)

    def encoders_released(self) -> None:
        self._encoders = {}

    def _applied(self) -> list[AppliedLoRA]:
        return [a for a in (self._unet, *self._encoders.values()) if a is not None]

    def set_scale(self, scale: float, *, unet_scale: float | None = None,
                  text_encoder_scale: float | None = None) -> None:
        """A new strength: ``scale`` for every part, or ``unet_scale`` / ``text_encoder_scale`` apart."""
        self.scales = part_scales(scale, unet_scale, text_encoder_scale)
        for applied in self._applied():
            applied.set_scale(self.scales[applied.part])

    def remove(self) -> None:
        """Take this LoRA off the pipeline (a no-op once removed)."""
        for applied in self._applied():
            applied.remove()
        self._unet, self._encoders = None, {}
        if self in self._pipeline.loras:
            self._pipeline.loras.remove(self)

    def __repr__(self) -> str:
        mode = "fused" if self.fuse else "live"
        return f"PipelineLoRA({self.lora.describe()}; {mode}, scales {self.scales})"


def part_scales(scale: float, unet_scale: float | None, text_encoder_scale: float | None) -> dict[str, float]:
    unet = checked_scale(scale if unet_scale is None else unet_scale)
    text = checked_scale(scale if text_encoder_scale is None else text_encoder_scale)
    return {part: unet if part == UNET else text for part in PARTS}


def load(pipeline: "DiffusionPipeline", source, scale: float, fuse: bool, unet_scale: float | None,
         text_encoder_scale: float | None, weight_name: str | None, revision: str | None,
         allow_pickle: bool) -> PipelineLoRA:
    lora = source if isinstance(source, LoRAFile) else \
        read_lora(source, weight_name=weight_name, revision=revision, allow_pickle=allow_pickle)
    return PipelineLoRA(pipeline, lora, part_scales(scale, unet_scale, text_encoder_scale), fuse)
