#!/usr/bin/env python3
"""Convert an SDXL pipeline (or any Stable Diffusion UNet) to MLX: python convert.py --help.

Importable too: ``from convert import convert`` (the same as ``mlx_unet.conversion.convert``).
"""

import sys

from mlx_unet.conversion import convert, main

__all__ = ["convert", "main"]  # convert is re-exported for importers

if __name__ == "__main__":
    sys.exit(main())
