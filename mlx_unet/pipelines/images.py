"""Image files: the pipeline's uint8 images written as PNGs (with Pillow), checked before the
work and written in one piece."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..errors import InputError

# A PNG is at most its raw pixels plus a little (zlib's worst case adds 5 bytes per 16 KB block,
# the filter a byte per row); what a batch needs on disk is checked against this before running.
_PNG_OVERHEAD = 1.01


def output_paths(output: str | Path, count: int) -> list[Path]:
    """Where ``count`` images of ``output`` go: output.png, output-1.png, output-2.png, ..."""
    output = Path(output)
    return [output] + [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(1, count)]


def check_writable(paths: Sequence[Path], height: int, width: int) -> None:
    """Refuse, before any work, outputs that cannot be written: a folder that does not exist or
    is not writable, a path that is a folder, too little free space for the images. The folder is
    probed by creating (and removing) a file in it, which is what tells a read-only file system."""
    for path in paths:
        if path.suffix.lower() != ".png":
            raise InputError(f"the output {path} must be a .png file.")
        if path.is_dir():
            raise InputError(f"the output {path} is a folder; give a file name such as {path / 'image.png'}.")
        if path.exists() and not path.is_file():
            raise InputError(f"the output {path} exists and is not a regular file; choose another name.")
    for folder in sorted({p.parent for p in paths}):
        if not folder.is_dir():
            raise InputError(f"the folder of the output, {folder}, does not exist; create it first.")
        try:
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as e:
            raise InputError(f"cannot write into {folder} ({e.strerror}); choose a writable folder.") from None
        need = int(_PNG_OVERHEAD * height * width * 3) * sum(p.parent == folder for p in paths)
        free = shutil.disk_usage(folder).free
        if free < need:
            raise InputError(f"{folder} has {free / 2**20:.1f} MiB free and the images need up to "
                             f"{need / 2**20:.1f} MiB; free some space or choose another folder.")


def _encode(path: Path, image: np.ndarray) -> Path:
    """``image`` as a PNG in a temporary file beside ``path`` (mode 0644); its name."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise InputError(f"a PNG is written from an (H, W, 3) uint8 image, got {image.dtype} {image.shape}.")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(image).save(f, format="PNG")
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the image
        os.chmod(tmp, 0o644)  # mkstemp makes it private (0600); an image is for anyone to view
    except BaseException:
        os.unlink(tmp)
        raise
    return Path(tmp)


def write_png(path: str | Path, image: np.ndarray) -> None:
    """An (H, W, 3) uint8 image as an 8-bit RGB PNG, mode 0644. Written to a temporary file in
    the same folder and renamed over ``path``, so that an interrupted write never leaves a
    truncated PNG where a previous image was."""
    write_pngs([Path(path)], [image])


def write_pngs(paths: Sequence[Path], images: Sequence[np.ndarray]) -> None:
    """A batch of images, all or none: each is encoded into a temporary file first (where a full
    disk or any other write error shows), and only when all are, renamed into place. A rename
    that fails (rare: it needs no space) raises an OSError saying which images were written."""
    temporaries: list[Path] = []
    try:
        for path, image in zip(paths, images):
            temporaries.append(_encode(Path(path), image))
    except BaseException as e:
        for tmp in temporaries:
            tmp.unlink()
        if isinstance(e, OSError):  # named after the image, not the temporary file
            raise OSError(e.errno, f"{e.strerror}; none of the batch was written", str(path)) from None
        raise
    written = []
    for i, (tmp, path) in enumerate(zip(temporaries, paths)):
        try:
            os.replace(tmp, path)
        except OSError as e:
            for rest in temporaries[i:]:
                rest.unlink(missing_ok=True)
            done = ", ".join(map(str, written)) or "none"
            raise OSError(e.errno, f"{e.strerror}; of the batch these were written: {done}", str(path)) from None
        written.append(path)
