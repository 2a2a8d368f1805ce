"""Weight names of other layouts, each mapped to and from diffusers' (and transformers') names.

One module per layout: ``ldm_unet`` (Stability's ``model.diffusion_model.*``), ``ldm_vae``
(``first_stage_model.*``), ``clip`` (CLIP ViT-L as transformers names it, OpenCLIP ViT-bigG with
its fused attention projection). Each table is built from a model config, and maps single
module or parameter names as well as whole checkpoints, so that files naming only some modules
(LoRA, ControlNet) go through the same table. Working out a config from a file is not done
here (``mlx_unet.convert.infer``).
"""

from .table import NameTable, Take

__all__ = ["NameTable", "Take"]
