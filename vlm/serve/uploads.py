"""Uploaded bytes -> an RGB image, through the CLI's image loader, within the server's limits."""

from __future__ import annotations

from PIL import Image

from vlm.data.images import load_image
from vlm.errors import VLMError


class UploadError(Exception):
    """A bad request, with the HTTP status to answer and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def decode_upload(data: bytes, name: str, max_bytes: int, max_pixels: int | None) -> Image.Image:
    """The uploaded image as RGB; UploadError 413 over ``max_bytes``, 400 for anything the loader refuses."""
    label = f"upload {name!r}"
    if not data:
        raise UploadError(400, f"{label}: empty file")
    if len(data) > max_bytes:
        raise UploadError(413, f"{label}: over the upload limit of {max_bytes} bytes")
    try:
        return load_image(data, max_pixels=max_pixels, name=label)
    except VLMError as e:  # not an image, truncated, too many pixels: the loader's message names the reason
        raise UploadError(400, str(e)) from None
