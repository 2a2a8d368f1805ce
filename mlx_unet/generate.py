"""``python -m mlx_unet.generate ...``: the same command as ``mlx-unet generate ...``."""

import sys

from .cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
