"""The one image loader used by the CLI, the Python API and the datasets.

Whatever the source (a path, bytes, a binary file object or a PIL image), the result is an RGB image:
EXIF orientation applied, the first frame of an animated file, transparency composited on white, and
high-bit-depth pixels scaled to 8 bits. Anything that cannot be decoded, and any file whose header
declares more than the pixel limit (checked before decoding), is a one-line `VLMError` naming the source.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from vlm.errors import VLMError

ImageLike = str | os.PathLike | bytes | bytearray | BinaryIO | Image.Image

MAX_PIXELS = 12_000 * 12_000
"""Default pixel limit (width x height); the environment variable VLM_MAX_PIXELS or `max_pixels` overrides it."""
MAX_PIXELS_ENV = "VLM_MAX_PIXELS"


def is_single_image(obj: object) -> bool:
    """True for one image (a path, bytes, a file object or a PIL image); False for a sequence of them."""
    return isinstance(obj, (str, os.PathLike, bytes, bytearray, Image.Image)) or hasattr(obj, "read")


def pixel_limit(max_pixels: int | None = None) -> int:
    """The pixel limit in force: ``max_pixels`` if given, else $VLM_MAX_PIXELS, else `MAX_PIXELS`."""
    if max_pixels is not None:
        value, source = max_pixels, "max_pixels"
    elif os.environ.get(MAX_PIXELS_ENV):
        value, source = os.environ[MAX_PIXELS_ENV], MAX_PIXELS_ENV
    else:
        return MAX_PIXELS
    try:
        limit = int(value)
    except (TypeError, ValueError):
        limit = 0
    if limit < 1:
        raise VLMError(f"{source}: expected a positive number of pixels, got {value!r}")
    return limit


def load_image(image: ImageLike, max_pixels: int | None = None, name: str | None = None) -> Image.Image:
    """An RGB PIL image from a path, bytes, a binary file object or a PIL image.

    ``max_pixels`` caps width x height of decoded files (default: `pixel_limit()`); ``name`` is how errors
    refer to bytes or a file object (default: the object's ``name`` attribute, else "<bytes>"/"<stream>").
    """
    if isinstance(image, Image.Image):
        return to_rgb(ImageOps.exif_transpose(image), name or "<PIL image>")
    limit = pixel_limit(max_pixels)
    raising = "raise max_pixels" if max_pixels is not None else f"set {MAX_PIXELS_ENV}"  # what sets the limit
    if isinstance(image, (bytes, bytearray)):
        return _decode(io.BytesIO(image), name or "<bytes>", limit, raising)
    if hasattr(image, "read"):
        return _decode(image, name or str(getattr(image, "name", "<stream>")), limit, raising)
    path = os.fspath(image)
    if os.path.isdir(path):
        raise VLMError(f"{path}: is a directory, not an image file")
    if not os.path.exists(path):
        raise VLMError(f"{path}: no such image file")
    return _decode(path, name or path, limit, raising)


def _decode(source: str | BinaryIO, name: str, limit: int, raising: str) -> Image.Image:
    try:
        with warnings.catch_warnings():  # the limit below is ours; PIL's own remark on large images is noise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                width, height = im.size
                if width * height > limit:
                    raise VLMError(f"{name}: {width} x {height} = {width * height} pixels exceeds the limit of "
                                   f"{limit} ({raising} to allow it)")
                im.seek(0)  # the first frame of an animation
                im.load()
                return to_rgb(ImageOps.exif_transpose(im), name)
    except VLMError:
        raise
    except Image.DecompressionBombError:  # PIL checks its own hard ceiling before ours
        ceiling = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        hint = f"{raising} to allow it" if limit < ceiling else "raise PIL.Image.MAX_IMAGE_PIXELS too"
        raise VLMError(f"{name}: more than {ceiling} pixels exceeds the limit of {min(limit, ceiling)} ({hint})"
                       ) from None
    except Exception as e:  # not an image, truncated, corrupt: decoders raise many kinds of error
        detail = " ".join(str(e).split()) or "corrupt data"
        raise VLMError(f"{name}: cannot read image ({e.__class__.__name__}: {detail})") from None


def to_rgb(im: Image.Image, name: str = "<PIL image>") -> Image.Image:
    """Any PIL mode as RGB: transparency composited on white; 16-bit, 32-bit and float pixels scaled to 8 bits.

    16-bit images, and 32-bit integer ones (as 16-bit PNGs and TIFFs are often read), are scaled from
    0..65535; float images from 0..1. Values outside those ranges are clipped.
    """
    if im.mode == "RGB" and "transparency" not in im.info:  # an RGB PNG's tRNS colour key is transparency too
        return im
    if im.mode in ("RGBA", "RGBa", "LA", "La", "PA") or (im.mode in ("P", "L", "RGB") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if im.mode.startswith("I") or im.mode.startswith("F"):
        values = np.asarray(im, dtype=np.float64)
        scale = 255.0 if im.mode.startswith("F") else 255.0 / 65535.0
        gray = np.clip(np.rint(np.nan_to_num(values) * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    try:
        return im.convert("RGB")
    except ValueError as e:  # a mode PIL cannot convert, e.g. LAB
        raise VLMError(f"{name}: cannot convert image mode {im.mode} to RGB ({e})") from None
