"""Input images and masks read from files as diffusers reads them: ``load_image`` (EXIF orientation,
RGB), then the image and mask processors of StableDiffusion[XL]InpaintPipeline (sizes rounded down
to multiples of 8 and resized with Lanczos; the mask in grayscale, binarised at 0.5), computed here
on the same files. Ours hands the pipeline uint8 pixels (it scales them to [-1, 1] as diffusers
does) and a uint8 mask (binarised at 128 by the pipeline): the same numbers, exactly.

(Without a height and width, diffusers' inpainting pipelines resize the image to the UNet's
default size, whatever its shape; ours, as its img2img pipelines, keep the image's size: the
processors are compared here at the size each call asks for.)"""

from pathlib import Path

import numpy as np
import pytest
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import load_image
from PIL import Image

from mlx_unet.pipelines.images import read_inputs


def _inputs(tmp_path: Path, size: tuple[int, int], orientation: int | None) -> tuple[Path, Path]:
    """A photo (a JPEG, EXIF-oriented where ``orientation``) and a grayscale mask drawn on it."""
    rng = np.random.default_rng(size[0])
    pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    Image.fromarray(pixels).save(tmp_path / "photo.jpg", quality=92, exif=exif)
    shown = Image.open(tmp_path / "photo.jpg")
    width, height = (shown.size[::-1] if orientation in (5, 6, 7, 8) else shown.size)
    y, x = np.mgrid[:height, :width]
    mask = (((x - width / 2) ** 2 + (y - height / 3) ** 2) < (min(width, height) / 3) ** 2) * 255
    Image.fromarray(mask.astype(np.uint8)).save(tmp_path / "mask.png")
    return tmp_path / "photo.jpg", tmp_path / "mask.png"


@pytest.mark.parametrize("size, orientation, target", [
    ((61, 70), None, (None, None)),  # rounded down to 56x64 and resized
    ((48, 64), 6, (None, None)),  # a phone photo turned by its EXIF tag: 64x48 as shown
    ((61, 70), 3, (40, 48)),  # --height 40 --width 48
])
def test_images_and_masks_are_read_as_diffusers_reads_them(tmp_path, size, orientation, target):
    image_path, mask_path = _inputs(tmp_path, size, orientation)
    height, width = target
    ours = read_inputs(image_path, mask_path, height, width)

    # As StableDiffusionInpaintPipeline makes them (and the SDXL one alike).
    image_processor = VaeImageProcessor(vae_scale_factor=8)
    mask_processor = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True,
                                       do_convert_grayscale=True)
    theirs_image = image_processor.preprocess(load_image(str(image_path)), height=height, width=width)
    theirs_mask = mask_processor.preprocess(load_image(str(mask_path)), height=height, width=width)
    theirs_image = theirs_image.permute(0, 2, 3, 1).numpy()
    assert ours.image.shape == theirs_image.shape and ours.image.dtype == np.uint8
    # The pipeline's scaling of uint8 pixels to [-1, 1], as diffusers' pil_to_numpy and normalize.
    assert np.array_equal(2.0 * (ours.image.astype(np.float32) / 255.0) - 1.0, theirs_image)
    assert np.array_equal(ours.mask >= 128, theirs_mask[:, 0].numpy() == 1)
    assert 0 < (ours.mask >= 128).mean() < 1  # a mask with both parts


def test_an_image_alone_is_read_as_the_img2img_pipelines_read_it(tmp_path):
    image_path, _ = _inputs(tmp_path, (75, 91), None)
    ours = read_inputs(image_path)
    theirs = VaeImageProcessor(vae_scale_factor=8).preprocess(load_image(str(image_path)))
    assert np.array_equal(2.0 * (ours.image.astype(np.float32) / 255.0) - 1.0, theirs.permute(0, 2, 3, 1).numpy())
    assert ours.source_size == (75, 91) and ours.image.shape == (1, 72, 88, 3)
