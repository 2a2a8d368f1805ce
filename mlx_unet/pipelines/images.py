"""Image files: the pipeline's uint8 images written as PNGs (with Pillow)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import InputError


def write_png(path: str | Path, image: np.ndarray) -> None:
    """An (H, W, 3) uint8 image as an 8-bit RGB PNG, mode 0644. Written to a temporary file in
    the same folder and renamed over ``path``, so that an interrupted write never leaves a
    truncated PNG where a previous image was."""
    path = Path(path)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise InputError(f"a PNG is written from an (H, W, 3) uint8 image, got {image.dtype} {image.shape}.")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(image).save(f, format="PNG")
        os.chmod(tmp, 0o644)  # mkstemp makes it private (0600); an image is for anyone to view
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
