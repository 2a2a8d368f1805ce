"""mlx_unet: the Stable Diffusion / SDXL UNet in MLX, exact against diffusers."""

from . import linux_blas

linux_blas.preload()

from .config import PRESETS, ConfigError, UNetConfig  # noqa: E402
from .pipeline import Sampler  # noqa: E402
from .schedulers import make_scheduler  # noqa: E402
from .unet import InputError, UNet2DConditionModel  # noqa: E402
from .weights import WeightsError  # noqa: E402

__all__ = [
    "PRESETS",
    "ConfigError",
    "InputError",
    "Sampler",
    "UNet2DConditionModel",
    "UNetConfig",
    "WeightsError",
    "make_scheduler",
]
