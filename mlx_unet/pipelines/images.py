"""Image files, with Pillow: inputs (img2img images and inpainting masks) read into the uint8
arrays the pipelines take, and outputs written as PNGs that carry text chunks (the generation
parameters), checked before the work and each written in one piece.

Inputs are read as diffusers' ``load_image`` reads them (EXIF orientation applied, then RGB),
with two differences, both as AUTOMATIC1111's web UI does it: transparent pixels are composited
on white (``convert("RGB")`` would drop the alpha and bring back whatever colour the transparent
pixels hold, often black), and 16-bit images are scaled to 8 bits (Pillow's conversion clips
them). A size that is not a multiple of 8 is resized down to one, as diffusers'
``VaeImageProcessor`` does (Lanczos, no crop); a height and width given resize the image to them.
Inpainting keeps the image's size too, as img2img does: diffusers' inpainting pipelines, given no
size, resize the image to the UNet's default size whatever its shape.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from ..errors import InputError
from .arguments import PIXELS_PER_LATENT

# A PNG is at most its raw pixels plus a little (zlib's worst case adds 5 bytes per 16 KB block,
# the filter a byte per row); what a batch needs on disk is checked against this before running.
_PNG_OVERHEAD = 1.01
_SIXTEEN_BIT = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # 16-bit grayscale, as Pillow opens it
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")
WHITE, BLACK = (255, 255, 255), (0, 0, 0)


# ---------------------------------------------------------------------------------- inputs

def _opened(path: Path) -> Image.Image:
    """The image at ``path``, decoded whole (so that a truncated file fails here), EXIF-oriented."""
    if not path.exists():
        raise InputError(f"{path} does not exist; check the path of the image.")
    if path.is_dir():
        raise InputError(f"{path} is a folder; pass an image file (PNG, JPEG, WebP).")
    try:
        with Image.open(path) as image:
            image.load()
            # exif_transpose returns a copy when it turns the image (and the image itself when
            # there is nothing to turn); either way the pixels are loaded before the file closes.
            return ImageOps.exif_transpose(image)
    except UnidentifiedImageError:
        raise InputError(f"{path} is not an image Pillow can read; pass a PNG, JPEG or WebP file.") from None
    except Image.DecompressionBombError as e:
        raise InputError(f"{path} is too large to read safely ({e}); make it smaller first.") from None
    except PermissionError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged file raises what its decoder happens to raise
        raise InputError(f"{path} is damaged or cut short ({e}); pass a complete image file.") from None


def _eight_bit(image: Image.Image, path: Path) -> Image.Image:
    """16-bit grayscale scaled to 8 bits (Pillow's conversion would clip everything above 255 to
    white); a floating-point image refused (no range to map from)."""
    if image.mode in _SIXTEEN_BIT:
        pixels = np.asarray(image).astype(np.float64)
        return Image.fromarray(np.clip(np.round(pixels / 257), 0, 255).astype(np.uint8), "L")
    if image.mode == "F":
        raise InputError(f"{path} holds floating-point pixels, which have no fixed range; save it as an 8- or "
                         "16-bit PNG.")
    return image


def _flattened(path: Path, background: tuple[int, int, int]) -> Image.Image:
    """The image at ``path`` in RGB: transparent pixels composited on ``background``."""
    image = _eight_bit(_opened(path), path)
    if image.mode in _ALPHA or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, background + (255,)), rgba).convert("RGB")
    return image.convert("RGB")


def read_image(path: str | Path) -> np.ndarray:
    """An image file (anything Pillow opens: PNG, JPEG, WebP, ...) as (H, W, 3) uint8 RGB: EXIF
    orientation applied, grayscale / palette / CMYK / 16-bit converted, transparency on white."""
    return np.asarray(_flattened(Path(path), WHITE))


def read_mask(path: str | Path) -> np.ndarray:
    """An inpainting mask file as (H, W) uint8 grayscale, white (255) where the image is
    repainted; colours count by their luma, transparent pixels as black (kept)."""
    return np.asarray(_flattened(Path(path), BLACK).convert("L"))


def input_size(size: tuple[int, int], height: int | None = None, width: int | None = None) -> tuple[int, int]:
    """(height, width) an input image of ``size`` (height, width) is used at: ``height`` /
    ``width`` where given, else its own, each rounded down to a multiple of 8 as diffusers'
    ``VaeImageProcessor.get_default_height_width`` rounds them."""
    h, w = height or size[0], width or size[1]
    return h - h % PIXELS_PER_LATENT, w - w % PIXELS_PER_LATENT


def resized(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """``pixels`` (H, W[, 3]) uint8 at (height, width), resized as diffusers resizes a PIL input
    (Lanczos); unchanged where the size is already that."""
    if pixels.shape[:2] == (height, width):
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((width, height), resample=Image.Resampling.LANCZOS))


@dataclass(frozen=True)
class InputImages:
    """What ``read_inputs`` gives the pipeline: ``image`` (1, H, W, 3) uint8, ``mask`` (1, H, W)
    uint8 or None; ``source_size`` the image file's (height, width) before any resize."""

    image: np.ndarray
    mask: np.ndarray | None
    source_size: tuple[int, int]

    @property
    def resized(self) -> bool:
        return self.image.shape[1:3] != self.source_size


def _size_text(size: tuple[int, int]) -> str:
    return f"{size[1]}x{size[0]}"


def read_inputs(image: str | Path, mask: str | Path | None = None, height: int | None = None,
                width: int | None = None) -> InputImages:
    """An img2img image and, for inpainting, its mask, read and sized for the pipeline: the mask
    must be the image's size (it is drawn on that image); both are resized to ``height`` x
    ``width`` (default: the image's size rounded down to multiples of 8) as diffusers resizes them."""
    pixels = read_image(image)
    source = pixels.shape[:2]
    h, w = input_size(source, height, width)
    if h == 0 or w == 0:
        raise InputError(f"the image {image} is {_size_text(source)} pixels (width x height); it needs at least "
                         f"{PIXELS_PER_LATENT} pixels each way.")
    mask_pixels = None
    if mask is not None:
        mask_pixels = read_mask(mask)
        if mask_pixels.shape != source:
            raise InputError(f"the mask {mask} is {_size_text(mask_pixels.shape)} pixels and the image {image} "
                             f"{_size_text(source)} (width x height); make the mask the image's size.")
        mask_pixels = resized(mask_pixels, h, w)[None]
    return InputImages(resized(pixels, h, w)[None], mask_pixels, source)


# ---------------------------------------------------------------------------------- outputs

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


def write_png(path: str | Path, image: np.ndarray, text: Mapping[str, str] | None = None) -> None:
    """An (H, W, 3) uint8 image as an 8-bit RGB PNG, mode 0644, with ``text`` as text chunks
    (keyword -> text; Latin-1 text as tEXt, other text as UTF-8 iTXt, as Pillow chooses).
    Encoded into a temporary file in the same folder (where a full disk or any other write error
    shows) and renamed over ``path``: an interrupted or failed write never leaves a truncated PNG,
    nor a temporary file."""
    path = Path(path)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise InputError(f"a PNG is written from an (H, W, 3) uint8 image, got {image.dtype} {image.shape}.")
    info = PngImagePlugin.PngInfo()
    for keyword, value in (text or {}).items():
        info.add_text(keyword, value)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(image).save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the image
        os.chmod(tmp, 0o644)  # mkstemp makes it private (0600); an image is for anyone to view
        os.replace(tmp, path)
    except BaseException as e:
        os.unlink(tmp)
        if isinstance(e, OSError):  # named after the image, not the temporary file
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


def read_png_text(path: str | Path) -> dict[str, str]:
    """The text chunks (tEXt, zTXt, iTXt) of a PNG file: keyword -> text."""
    path = Path(path)
    if not path.exists() or path.is_dir():
        raise InputError(f"{path} {'is a folder' if path.is_dir() else 'does not exist'}; pass a PNG file.")
    try:
        with Image.open(path) as image, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # only the text is read
            if image.format != "PNG":
                raise InputError(f"{path} is a {image.format} file, not a PNG; the generation parameters are "
                                 "read from the PNGs that carry them.")
            return {str(k): str(v) for k, v in image.text.items()}
    except UnidentifiedImageError:
        raise InputError(f"{path} is not an image Pillow can read; pass a PNG file.") from None
    except (InputError, PermissionError):
        raise
    except Exception as e:  # noqa: BLE001 - a damaged file raises what its decoder happens to raise
        raise InputError(f"{path} is damaged or cut short ({e}); pass a complete PNG file.") from None
