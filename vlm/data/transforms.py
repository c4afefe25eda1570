"""Image transforms from timm's data config of the chosen backbone (mean, std, interpolation)."""

from __future__ import annotations

from collections.abc import Callable

import timm.data
from PIL import Image
from torch import Tensor, nn


def input_size(image_size: int | list[int]) -> tuple[int, int]:
    """(height, width) from a side or a [height, width] pair."""
    if isinstance(image_size, int):
        return image_size, image_size
    if len(image_size) != 2:
        raise ValueError(f"encoder.image_size must be a side or [height, width], got {image_size}")
    return int(image_size[0]), int(image_size[1])


def image_transform(trunk: nn.Module, image_size: int | list[int], crop_scale: float = 1.0
                    ) -> Callable[[Image.Image], Tensor]:
    """Resize the whole image to image_size (no crop: attention maps cover all of it).

    With ``crop_scale`` < 1 (training augmentation), a random crop keeping at least that share of the area is
    resized instead. Never a flip (see vlm.data.datasets.Sampler) and never colour jitter (answers name colours).
    """
    cfg = timm.data.resolve_data_config({}, model=trunk)
    size = (3, *input_size(image_size))
    if crop_scale < 1.0:
        return timm.data.create_transform(
            input_size=size, is_training=True, scale=(crop_scale, 1.0), hflip=0.0, vflip=0.0, color_jitter=None,
            interpolation=cfg["interpolation"], mean=cfg["mean"], std=cfg["std"],
        )
    return timm.data.create_transform(
        input_size=size,
        interpolation=cfg["interpolation"],
        mean=cfg["mean"],
        std=cfg["std"],
        crop_pct=1.0,
        crop_mode="squash",
        is_training=False,
    )
