"""PyTorch Stable Diffusion checkpoints -> MLX model folders: ``convert()``.

By default a whole pipeline (SD 1.x, 2.x or SDXL; text-to-image, img2img, inpainting, SDXL's
refiner), laid out as diffusers lays one out: ``unet/``, ``vae/``, ``text_encoder/`` (SD, SDXL
base) and ``text_encoder_2/`` (SDXL), each ``config.json`` + ``model.safetensors`` in MLX layout,
``tokenizer/`` / ``tokenizer_2/`` and ``scheduler/`` (copied, or for single files written as the
family publishes them), and ``model_index.json``. With ``unet_only``, and for a source that holds
nothing but a UNet, the UNet alone: ``config.json`` + ``model.safetensors``.

Sources: a Hub repo id (``hub``), a diffusers folder (``plan``), or an original single-file
checkpoint (``single_file``: configs from ``infer`` and ``published``, names from
``mlx_unet.naming``). Tensors stream one at a time from the source (``sources``) to the output
files (``writer``).
"""

from .hub import fetch_tokenizers
from .writer import ConversionResult, convert

__all__ = ["ConversionResult", "convert", "fetch_tokenizers"]
