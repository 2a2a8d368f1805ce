#!/usr/bin/env python3
"""Convert a Stable Diffusion / SDXL UNet checkpoint to MLX weights: python convert.py --help.

Importable too: ``from convert import convert`` (the same as ``mlx_unet.conversion.convert``).
"""

import sys

from mlx_unet.conversion import convert, main  # noqa: F401  (convert re-exported for importers)

if __name__ == "__main__":
    sys.exit(main())
