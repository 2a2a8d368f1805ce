"""UNet2DConditionModel: diffusers' conditional UNet in MLX, NHWC, driven by a UNetConfig."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..configs.quantization import Quantization, as_quantization
from ..configs.unet import UNetConfig
from ..errors import InputError
from .blocks import DownBlock, MidBlock, UpBlock
from .embeddings import TimestepEmbedding, Timesteps
from .norm import GroupNorm


def _shape(x) -> str:
    return str(tuple(x.shape)) if hasattr(x, "shape") else type(x).__name__


class UNet2DConditionModel(nn.Module):
    """The SD / SDXL UNet. Parameter names are diffusers' checkpoint names.

    Call: ``unet(sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None)`` with
    ``sample`` (B, H, W, C) NHWC; returns (B, H, W, out_channels) in the model's dtype.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        c = config
        channels = c.block_out_channels
        self.conv_in = nn.Conv2d(c.in_channels, channels[0], c.conv_in_kernel, padding=c.conv_in_kernel // 2)

        self.time_proj = Timesteps(channels[0], c.flip_sin_to_cos, c.freq_shift)
        self.time_embedding = TimestepEmbedding(channels[0], c.time_embed_dim, c.time_cond_proj_dim)
        self.add_time_proj = self.add_embedding = None
        if c.has_text_time_embedding:
            self.add_time_proj = Timesteps(c.addition_time_embed_dim, c.flip_sin_to_cos, c.freq_shift)
            self.add_embedding = TimestepEmbedding(c.projection_class_embeddings_input_dim, c.time_embed_dim)

        self.down_blocks = []
        for level, kind in enumerate(c.down_block_types):
            in_channels = channels[max(level - 1, 0)]
            self.down_blocks.append(DownBlock(c, level, in_channels, kind == "CrossAttnDownBlock2D"))
        self.mid_block = MidBlock(c) if c.mid_block_type is not None else None
        self.up_blocks = []
        prev = channels[-1]
        for index, kind in enumerate(c.up_block_types):
            self.up_blocks.append(UpBlock(c, index, prev, kind == "CrossAttnUpBlock2D"))
            prev = tuple(reversed(channels))[index]

        self.conv_norm_out = GroupNorm(c.norm_num_groups, channels[0], c.norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[0], c.out_channels, c.conv_out_kernel, padding=c.conv_out_kernel // 2)

    # ------------------------------------------------------------------ forward

    @property
    def dtype(self) -> mx.Dtype:
        # A norm's weight: LoRA wrappers and quantization replace Linear and Conv2d layers.
        return self.conv_norm_out.weight.dtype

    def __call__(
        self,
        sample: mx.array,
        timestep: mx.array | float | int,
        encoder_hidden_states: mx.array | None,
        text_embeds: mx.array | None = None,
        time_ids: mx.array | None = None,
        *,
        added_embedding: mx.array | None = None,
        cross_attention_kv: dict | None = None,
        timestep_cond: mx.array | None = None,
        after_block: Callable[..., None] | None = None,
    ) -> mx.array:
        """``added_embedding`` may replace ``text_embeds``/``time_ids``: it is what
        :meth:`added_embedding` returns for them, which a sampler computes once per run.
        ``cross_attention_kv`` may replace ``encoder_hidden_states`` (pass None for it): what
        :meth:`cross_attention_kv` returns for them, also computed once per run.
        ``timestep_cond``: an LCM distillation's (B, time_cond_proj_dim) guidance-scale
        embedding (``models.embeddings.guidance_scale_embedding``); without it such a UNet runs
        unconditioned on guidance, as in diffusers. ``after_block``: see :meth:`denoise`."""
        inputs = self.checked_inputs(sample, timestep, encoder_hidden_states, text_embeds, time_ids, added_embedding,
                                     timestep_cond, cross_attention_kv)
        return self.denoise(*inputs, after_block=after_block)

    def checked_inputs(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None,
                       added_embedding=None, timestep_cond=None, cross_attention_kv=None) -> tuple:
        """The arguments of :meth:`__call__` checked and made into those of :meth:`denoise`."""
        if (encoder_hidden_states is None) == (cross_attention_kv is None):
            raise InputError("give the UNet either encoder_hidden_states or cross_attention_kv (made from them by "
                             "unet.cross_attention_kv), not both or neither.")
        if cross_attention_kv is None:
            sample, timesteps, context = self._check_inputs(sample, timestep, encoder_hidden_states)
            text_kv = self.cross_attention_kv(context)
        else:
            sample, timesteps, _ = self._check_inputs(sample, timestep, None)
            text_kv = self._check_cross_attention_kv(cross_attention_kv, sample.shape[0])
        if timestep_cond is not None:
            width = self.config.time_cond_proj_dim
            if width is None:
                raise InputError("timestep_cond was given but this UNet takes no guidance-scale embedding (not an LCM).")
            if timestep_cond.shape != (sample.shape[0], width):
                raise InputError(f"timestep_cond must be ({sample.shape[0]}, {width}) for a batch of "
                                 f"{sample.shape[0]}, got {_shape(timestep_cond)}.")
            timestep_cond = timestep_cond.astype(self.dtype)
        if added_embedding is None:
            added_embedding = self.added_embedding(text_embeds, time_ids, batch=sample.shape[0])
        elif added_embedding.shape != (sample.shape[0], self.config.time_embed_dim):
            raise InputError(
                f"added_embedding must be ({sample.shape[0]}, {self.config.time_embed_dim}) for a batch of "
                f"{sample.shape[0]}, got {_shape(added_embedding)}; make it with unet.added_embedding()."
            )
        added = None if added_embedding is None else added_embedding.astype(self.dtype)
        return sample, timesteps, text_kv, added, timestep_cond

    def cross_attention_kv(self, encoder_hidden_states: mx.array) -> dict[str, list]:
        """Every cross-attention layer's keys and values of the text context (B, tokens, width),
        by block: ``{"down": [...], "mid": [...], "up": [...]}``, each a block's per-transformer,
        per-layer (keys, values). They do not depend on the timestep or the latents, so a
        sampling loop computes them once per run instead of in every step."""
        if not isinstance(encoder_hidden_states, mx.array) or encoder_hidden_states.ndim != 3 or \
                encoder_hidden_states.shape[-1] != self.config.cross_attention_dim:
            raise InputError(f"encoder_hidden_states must be (batch, tokens, {self.config.cross_attention_dim}), "
                             f"got {_shape(encoder_hidden_states)}.")
        context = encoder_hidden_states.astype(self.dtype)
        mid = [] if self.mid_block is None else self.mid_block.cross_attention_kv(context)
        return {"down": [block.cross_attention_kv(context) for block in self.down_blocks], "mid": mid,
                "up": [block.cross_attention_kv(context) for block in self.up_blocks]}

    def added_embedding(self, text_embeds: mx.array | None, time_ids, batch: int | None = None) -> mx.array | None:
        """SDXL's added conditioning, the pooled text embedding and the size/crop (or aesthetic)
        ids through ``add_embedding``: (batch, time_embed_dim), or None for UNets without it.
        It does not depend on the timestep, so a sampling loop needs it once, not every step."""
        if not self.config.has_text_time_embedding:
            if text_embeds is not None or time_ids is not None:
                raise InputError("text_embeds/time_ids were given but this UNet has no added conditioning (not SDXL).")
            return None
        if batch is None and isinstance(text_embeds, mx.array) and text_embeds.ndim == 2:
            batch = text_embeds.shape[0]
        text_embeds, time_ids = self._check_added_conditioning(batch, text_embeds, time_ids)
        time_embeds = self.add_time_proj(time_ids.reshape(-1)).reshape(batch, -1)
        return self.add_embedding(mx.concatenate([text_embeds, time_embeds.astype(self.dtype)], axis=-1))

    def denoise(self, sample: mx.array, timesteps: mx.array, text_kv: dict, added: mx.array | None = None,
                timestep_cond: mx.array | None = None, *, after_block: Callable[..., None] | None = None) -> mx.array:
        """The forward on checked inputs (:meth:`checked_inputs`): (B, H, W, C) sample in the model
        dtype, float32 (B,) timesteps, the text's :meth:`cross_attention_kv` and, for SDXL, the
        added embedding; for an LCM distillation, the guidance-scale embedding.

        ``after_block(*arrays)`` is called after each block with what the rest of the forward
        needs from it; ``mx.eval`` there evaluates the UNet block by block, so that no lazy graph
        of the whole forward is built and held (the low-memory mode of ``pipelines.run``).
        """
        c = self.config
        done = after_block or (lambda *arrays: None)
        # diffusers casts the float32 sinusoid to the activation dtype before the MLP.
        emb = self.time_embedding(self.time_proj(timesteps).astype(self.dtype), timestep_cond)
        if added is not None:
            emb = emb + added
        temb_silu = nn.silu(emb)

        if c.center_input_sample:
            sample = 2 * sample - 1.0
        x = self.conv_in(sample)

        skips = [x]
        for block, block_kv in zip(self.down_blocks, text_kv["down"], strict=True):
            x, block_skips = block(x, temb_silu, block_kv)
            skips.extend(block_skips)
            done(x, skips)

        if self.mid_block is not None:
            x = self.mid_block(x, temb_silu, text_kv["mid"])
            done(x)

        # When the latent is not a multiple of the total downsampling, the stride-2 convolutions
        # rounded up; each upsampler then targets the size of the skip it will be joined with
        # instead of doubling (diffusers' forward_upsample_size).
        f = c.downsample_factor
        forward_size = sample.shape[1] % f != 0 or sample.shape[2] % f != 0
        for block, block_kv in zip(self.up_blocks, text_kv["up"], strict=True):
            size = None
            if forward_size and block.upsamplers:
                remaining = len(block.resnets)
                size = tuple(skips[-remaining - 1].shape[1:3])
            x = block(x, temb_silu, block_kv, skips, size)
            done(x)

        x = self.conv_act(self.conv_norm_out(x))
        return self.conv_out(x)

    # ------------------------------------------------------------------ input checks

    def _check_inputs(self, sample, timestep, context):
        c = self.config
        dtype = self.dtype
        if not isinstance(sample, mx.array):
            raise InputError(f"sample must be an mlx array, got {type(sample).__name__}.")
        if sample.ndim != 4:
            raise InputError(f"sample must be (batch, height, width, {c.in_channels}) NHWC, got shape {_shape(sample)}.")
        batch, height, width, channels = sample.shape
        if channels != c.in_channels:
            hint = (
                "; it looks like NCHW, transpose it with sample.transpose(0, 2, 3, 1)"
                if sample.shape[1] == c.in_channels
                else ""
            )
            raise InputError(
                f"sample has {channels} channels in its last axis but this UNet takes {c.in_channels} "
                f"(NHWC, got shape {_shape(sample)}){hint}."
            )

        timesteps = (timestep if isinstance(timestep, mx.array) else mx.array(timestep)).astype(mx.float32)
        if timesteps.ndim == 0 or timesteps.shape == (1,):
            timesteps = mx.broadcast_to(timesteps.reshape(1), (batch,))
        elif timesteps.shape != (batch,):
            raise InputError(
                f"timestep must be a scalar, shape (1,) or shape ({batch},) for a batch of {batch}, "
                f"got shape {_shape(timesteps)}."
            )

        if context is None:  # (cross_attention_kv given instead: _check_cross_attention_kv)
            return sample.astype(dtype), timesteps, None
        if not isinstance(context, mx.array) or context.ndim != 3:
            got = _shape(context) if isinstance(context, mx.array) else type(context).__name__
            raise InputError(
                f"encoder_hidden_states must be (batch, tokens, {c.cross_attention_dim}), got {got}."
            )
        if context.shape[-1] != c.cross_attention_dim:
            raise InputError(
                f"encoder_hidden_states has width {context.shape[-1]} but this UNet's cross-attention "
                f"takes {c.cross_attention_dim}."
            )
        if context.shape[0] != batch:
            raise InputError(
                f"encoder_hidden_states has batch {context.shape[0]} but sample has batch {batch}."
            )
        return sample.astype(dtype), timesteps, context.astype(dtype)

    def _check_cross_attention_kv(self, text_kv, batch: int) -> dict:
        blocks = {"down": len(self.down_blocks), "mid": 0 if self.mid_block is None else 1, "up": len(self.up_blocks)}
        if not isinstance(text_kv, dict) or set(text_kv) != set(blocks) or \
                any(not isinstance(text_kv[k], list) or len(text_kv[k]) != n for k, n in blocks.items()):
            raise InputError("cross_attention_kv must be what this UNet's cross_attention_kv() returned.")
        if any(not isinstance(a, mx.array) or a.shape[0] != batch for _, a in tree_flatten(text_kv)):
            raise InputError(f"cross_attention_kv was made for another batch size than the sample's {batch}.")
        return text_kv

    def _check_added_conditioning(self, batch, text_embeds, time_ids):
        c = self.config
        if text_embeds is None or time_ids is None:
            missing = " and ".join(
                n for n, v in (("text_embeds", text_embeds), ("time_ids", time_ids)) if v is None
            )
            raise InputError(
                f"this SDXL-style UNet needs {missing}: the pooled text embedding (batch, width) "
                "and the micro-conditioning ids (batch, n), e.g. 6 for SDXL base, 5 for the refiner."
            )
        if not isinstance(time_ids, mx.array):
            time_ids = mx.array(time_ids)
        if not isinstance(text_embeds, mx.array) or text_embeds.ndim != 2 or text_embeds.shape[0] != batch:
            raise InputError(f"text_embeds must be ({batch}, width) for a batch of {batch}, got {_shape(text_embeds)}.")
        if time_ids.ndim == 1:
            time_ids = time_ids[None]
        if time_ids.ndim != 2 or time_ids.shape[0] not in (1, batch):
            raise InputError(f"time_ids must be ({batch}, n) for a batch of {batch}, got {_shape(time_ids)}.")
        time_ids = mx.broadcast_to(time_ids, (batch, time_ids.shape[1]))
        width = text_embeds.shape[1] + time_ids.shape[1] * c.addition_time_embed_dim
        if width != c.projection_class_embeddings_input_dim:
            raise InputError(
                f"text_embeds width {text_embeds.shape[1]} + {time_ids.shape[1]} time ids x "
                f"{c.addition_time_embed_dim} = {width}, but add_embedding takes "
                f"{c.projection_class_embeddings_input_dim} (projection_class_embeddings_input_dim)."
            )
        return text_embeds.astype(self.dtype), time_ids

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: mx.Dtype | None = None, cpu_kernels: bool | None = None,
                        quantize: Quantization | int | None = None) -> "UNet2DConditionModel":
        """Load ``config.json`` and the MLX ``*.safetensors`` weights of an MLX UNet folder.

        ``dtype`` casts the weights (default: as stored). ``cpu_kernels``: swap in the CPU
        kernels (None: on the CPU unless ``MLX_UNET_CPU_KERNELS=0``; see ``mlx_unet.cpu``).
        ``quantize``: quantize a dense folder as it loads (a ``Quantization``, or bits: 8 or 4);
        a quantized folder (``mlx-unet convert --quantize``) loads quantized by itself.
        """
        from ..weights import load_pretrained

        folder = Path(folder)
        config = UNetConfig.from_json(folder)
        model = cls(config)
        return load_pretrained(model, folder, dtype, cpu_kernels, as_quantization(quantize))
