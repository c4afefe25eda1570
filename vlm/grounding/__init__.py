"""Grounding utilities: map per-token attention over the patch grid to image pixels, score and render it."""

from vlm.grounding.maps import (
    box_from_map,
    combine,
    iou,
    peak,
    pixel_mass_in_box,
    pointing_hit,
    resize,
    upsample,
)
from vlm.grounding.overlay import overlay, safe_name, token_grid, write_attention

__all__ = [
    "box_from_map",
    "combine",
    "iou",
    "overlay",
    "peak",
    "pixel_mass_in_box",
    "pointing_hit",
    "resize",
    "safe_name",
    "token_grid",
    "upsample",
    "write_attention",
]
