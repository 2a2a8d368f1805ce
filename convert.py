#!/usr/bin/env python3
"""Convert an SDXL pipeline (or any Stable Diffusion UNet) to MLX: python convert.py --help.

Importable too: ``from convert import convert`` (the same as ``mlx_unet.convert.convert``).
"""

import sys

from mlx_unet.cli.convert import main
from mlx_unet.convert import convert

__all__ = ["convert", "main"]  # convert is re-exported for importers

if __name__ == "__main__":
    sys.exit(main())
