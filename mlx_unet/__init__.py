"""mlx_unet: Stable Diffusion XL in MLX (UNet, text encoders, VAE, sampling), exact against diffusers."""

from . import linux_blas

linux_blas.preload()

from .config import PRESETS, ConfigError, UNetConfig  # noqa: E402
from .pipeline import Sampler  # noqa: E402
from .schedulers import make_scheduler  # noqa: E402
from .text_encoder import CLIPTextConfig, CLIPTextModel  # noqa: E402
from .text_to_image import PipelineError, SDXLPipeline  # noqa: E402
from .tokenizer import CLIPTokenizer  # noqa: E402
from .unet import InputError, UNet2DConditionModel  # noqa: E402
from .vae import AutoencoderKL, VAEConfig  # noqa: E402
from .weights import WeightsError  # noqa: E402

__all__ = [
    "PRESETS",
    "AutoencoderKL",
    "CLIPTextConfig",
    "CLIPTextModel",
    "CLIPTokenizer",
    "ConfigError",
    "InputError",
    "PipelineError",
    "SDXLPipeline",
    "Sampler",
    "UNet2DConditionModel",
    "UNetConfig",
    "VAEConfig",
    "WeightsError",
    "make_scheduler",
]
