"""The one image loader used by the CLI, the Python API and the datasets."""

from __future__ import annotations

import os

from PIL import Image, ImageOps, UnidentifiedImageError

from vlm.errors import VLMError

ImageLike = str | os.PathLike | Image.Image


def load_image(image: ImageLike) -> Image.Image:
    """An RGB PIL image from a path or a PIL image: EXIF orientation applied, transparency on white."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    path = os.fspath(image)
    if not os.path.exists(path):
        raise VLMError(f"{path}: no such image file")
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(ImageOps.exif_transpose(im))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise VLMError(f"{path}: cannot read image ({e.__class__.__name__}: {e})") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """Palette, grayscale, 16-bit, CMYK and alpha images as RGB; transparency composited on white."""
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        return im.point(lambda v: v / 256).convert("L").convert("RGB")
    return im.convert("RGB")
