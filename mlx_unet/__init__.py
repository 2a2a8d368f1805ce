"""mlx_unet: Stable Diffusion XL in MLX (UNet, text encoders, VAE, sampling), exact against diffusers."""

# First: on Linux it loads OpenBLAS before MLX (cpu/blas.py).
from . import cpu

from .configs.clip import CLIPTextConfig  # noqa: E402
from .configs.quantization import Quantization  # noqa: E402
from .configs.unet import PRESETS, UNetConfig  # noqa: E402
from .configs.vae import TinyVAEConfig, VAEConfig  # noqa: E402
from .errors import (  # noqa: E402
    ConfigError,
    ConversionError,
    InputError,
    MlxUnetError,
    MlxUnetWarning,
    NonFiniteWarning,
    PipelineError,
    WeightsError,
)
from .models.clip import CLIPTextModel  # noqa: E402
from .models.tiny_vae import AutoencoderTiny  # noqa: E402
from .models.unet import UNet2DConditionModel  # noqa: E402
from .models.vae import AutoencoderKL  # noqa: E402
from .pipelines.sampler import Sampler  # noqa: E402
from .pipelines.diffusion import DiffusionPipeline, load_pipeline  # noqa: E402
from .pipelines.sd import SDPipeline  # noqa: E402
from .pipelines.sdxl import SDXLPipeline  # noqa: E402
from .schedulers import make_scheduler  # noqa: E402
from .tokenizer import CLIPTokenizer  # noqa: E402

__all__ = [
    "PRESETS",
    "AutoencoderKL",
    "AutoencoderTiny",
    "CLIPTextConfig",
    "CLIPTextModel",
    "CLIPTokenizer",
    "ConfigError",
    "ConversionError",
    "DiffusionPipeline",
    "InputError",
    "MlxUnetError",
    "MlxUnetWarning",
    "NonFiniteWarning",
    "PipelineError",
    "Quantization",
    "SDPipeline",
    "SDXLPipeline",
    "Sampler",
    "TinyVAEConfig",
    "UNet2DConditionModel",
    "UNetConfig",
    "VAEConfig",
    "WeightsError",
    "cpu",
    "load_pipeline",
    "make_scheduler",
]
