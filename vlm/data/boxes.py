"""The two box conventions, each named for what its numbers mean, and the conversion between them.

- `PixelBox`: ``(x, y, w, h)`` in pixels of the image, COCO's layout: what the data files hold (COCO instances,
  JSONL "regions"), the built-in scenes' objects, and what the grounding metrics and ``vlm ground`` use.
- `FractionBox`: ``(x0, y0, x1, y1)``, corners as fractions of the image's width and height: what a training
  batch carries for the grounding loss, independent of the image's size (the model sees a resized image).
"""

from __future__ import annotations

PixelBox = tuple[float, float, float, float]
"""(x, y, w, h) in pixels: the top-left corner, width and height (COCO's layout)."""
FractionBox = tuple[float, float, float, float]
"""(x0, y0, x1, y1): the top-left and bottom-right corners as fractions of the image's width and height."""


def fraction_box(box: PixelBox, size: tuple[int, int]) -> FractionBox:
    """A `PixelBox` in an image of size (width, height) as a `FractionBox`, clipped to the image."""
    (x, y, w, h), (W, H) = box, size
    return (min(max(x / W, 0.0), 1.0), min(max(y / H, 0.0), 1.0),
            min(max((x + w) / W, 0.0), 1.0), min(max((y + h) / H, 0.0), 1.0))
