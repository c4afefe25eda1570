"""Image transforms from timm's data config of the chosen backbone (mean, std, interpolation)."""

from __future__ import annotations

from collections.abc import Callable

import timm.data
from PIL import Image
from torch import Tensor, nn


def image_transform(trunk: nn.Module, image_size: int) -> Callable[[Image.Image], Tensor]:
    """Resize the whole image to image_size x image_size (no crop: attention maps cover all of it)."""
    cfg = timm.data.resolve_data_config({}, model=trunk)
    return timm.data.create_transform(
        input_size=(3, image_size, image_size),
        interpolation=cfg["interpolation"],
        mean=cfg["mean"],
        std=cfg["std"],
        crop_pct=1.0,
        crop_mode="squash",
        is_training=False,
    )
