"""The one box convention, `PixelBox`, and the maps that carry a box along with its image.

A box is always ``(x, y, w, h)`` in pixels of the image it belongs to (COCO's layout): the data files' boxes (COCO
instances, JSONL "regions") and the built-in scenes' objects in pixels of the original image; a training batch's
boxes in pixels of the model's input image (the image resized, and flipped where it was); the grounding metrics and
``vlm ground`` in pixels of the image they score.
"""

from __future__ import annotations

PixelBox = tuple[float, float, float, float]
"""(x, y, w, h) in pixels of its image: the top-left corner, width and height (COCO's layout)."""


def resized_box(box: PixelBox, size: tuple[int, int], new_size: tuple[int, int]) -> PixelBox:
    """``box`` of an image of size (width, height) in that image resized (squashed) to ``new_size`` (width, height)."""
    (x, y, w, h), (W, H), (new_W, new_H) = box, size, new_size
    sx, sy = new_W / W, new_H / H
    return x * sx, y * sy, w * sx, h * sy


def mirrored_box(box: PixelBox, width: int) -> PixelBox:
    """``box`` of an image ``width`` pixels wide in that image flipped left to right."""
    x, y, w, h = box
    return width - x - w, y, w, h
