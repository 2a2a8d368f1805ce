"""``python -m mlx_unet generate ...``: the ``mlx-unet`` command."""

import sys

from .cli import main

sys.exit(main())
