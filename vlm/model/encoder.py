"""A timm trunk turned into a grid of patch features for the decoder to attend to.

Every timm backbone (CNNs with NCHW maps, ViTs with prefix tokens, NHWC models) answers
``forward_intermediates(..., output_fmt="NCHW")`` with a (B, C, h, w) map whose prefix tokens (class,
registers) timm has already dropped using the model's own ``num_prefix_tokens``. Backbones without it
are built with ``features_only=True``. Either way no shape is guessed.

Dimensions: B batch, C trunk channels, h x w patch grid, N = h * w patches, D decoder width.
"""

from __future__ import annotations

import timm
import torch
from torch import Tensor, nn

from vlm.config import EncoderConfig


def sincos_2d(h: int, w: int, dim: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Fixed 2-D sine-cosine position codes (N, D): half the channels encode the row, half the column."""
    if dim % 4:
        raise ValueError(f"decoder width {dim} must be divisible by 4 for 2-D position codes")
    quarter = dim // 4
    freqs = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter))
    rows = torch.arange(h, device=device, dtype=torch.float32)[:, None] * freqs  # (h, D/4)
    cols = torch.arange(w, device=device, dtype=torch.float32)[:, None] * freqs  # (w, D/4)
    rows = torch.cat([rows.sin(), rows.cos()], dim=1)[:, None, :].expand(h, w, 2 * quarter)  # (h, w, D/2)
    cols = torch.cat([cols.sin(), cols.cos()], dim=1)[None, :, :].expand(h, w, 2 * quarter)  # (h, w, D/2)
    return torch.cat([rows, cols], dim=-1).reshape(h * w, dim).to(dtype)  # (N, D)


class ImageEncoder(nn.Module):
    """timm trunk -> patch features (B, N, D) projected to the decoder width, plus the grid (h, w)."""

    def __init__(self, cfg: EncoderConfig, width: int):
        super().__init__()
        kwargs = dict(cfg.model_args)
        if cfg.weights:
            kwargs["pretrained_cfg_overlay"] = dict(file=cfg.weights)
        try:
            trunk = timm.create_model(cfg.name, pretrained=cfg.pretrained or bool(cfg.weights), **kwargs)
        except TypeError as e:  # model_args meant for another backbone
            raise ValueError(f"encoder.model_args {cfg.model_args} do not fit {cfg.name}: {e}") from None
        num_levels = len(trunk.feature_info)
        if not -num_levels <= cfg.feature_level < num_levels:
            raise ValueError(
                f"encoder.feature_level {cfg.feature_level} is out of range for {cfg.name}, "
                f"which has {num_levels} feature levels"
            )
        self.level = cfg.feature_level % num_levels
        channels = trunk.feature_info[self.level]["num_chs"]
        if hasattr(trunk, "forward_intermediates"):
            # Drop the head, the final norm and every stage after the chosen one: unused, they would cost
            # time and hold parameters that never receive a gradient.
            trunk.prune_intermediate_layers([self.level], prune_norm=True, prune_head=True)
            self.features_only = False
        else:
            trunk = timm.create_model(
                cfg.name, pretrained=cfg.pretrained or bool(cfg.weights), features_only=True,
                out_indices=(self.level,), **kwargs,
            )
            self.features_only = True
        # A convolutional trunk runs channels-last, the layout oneDNN and cuDNN convolutions are fastest in;
        # a ViT's one patch convolution would only pay for the copy.
        self.channels_last = sum(isinstance(m, nn.Conv2d) for m in trunk.modules()) > 1
        self.trunk = trunk.to(memory_format=torch.channels_last) if self.channels_last else trunk
        self.cfg = cfg
        self.proj = nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, width))
        self.norm = nn.LayerNorm(width)
        if not cfg.trainable:
            # Eval mode from the start: Lightning records each submodule's mode when fitting starts and sets it
            # back directly after validation, bypassing train() below.
            self.trunk.requires_grad_(False).eval()
        elif cfg.train_last is not None:
            self._train_only_last(cfg.train_last)

    def train(self, mode: bool = True) -> ImageEncoder:
        """A frozen trunk stays in eval mode: its batch-norm statistics and dropout stay as loaded."""
        super().train(mode)
        if not self.cfg.trainable:
            self.trunk.eval()
        return self

    def _train_only_last(self, n: int) -> None:
        """Freeze the trunk but its last n parameter groups (timm's coarse groups: stages or blocks)."""
        from timm.models import group_parameters

        if not hasattr(self.trunk, "group_matcher"):
            raise ValueError(f"encoder.train_last: {type(self.trunk).__name__} has no timm group_matcher")
        groups = group_parameters(self.trunk, self.trunk.group_matcher(coarse=True))
        if not 0 <= n <= len(groups):
            raise ValueError(f"encoder.train_last {n} is out of range: the encoder has {len(groups)} stages/blocks")
        trained = {name for gid in sorted(groups)[len(groups) - n:] for name in groups[gid]}
        for name, p in self.trunk.named_parameters():
            p.requires_grad_(name in trained)

    def feature_map(self, images: Tensor) -> Tensor:
        """The trunk's map at the chosen level, (B, C, h, w)."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.features_only:
            return self.trunk(images)[0]
        return self.trunk.forward_intermediates(
            images, indices=[self.level], intermediates_only=True, output_fmt="NCHW"
        )[0]

    def forward(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        return self.project(self.feature_map(images))

    def project(self, fmap: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """The trunk's map (B, C, h, w) -> patch features (B, N, D) and the grid (h, w)."""
        h, w = fmap.shape[-2:]
        tokens = self.proj(fmap.permute(0, 2, 3, 1).flatten(1, 2))  # (B, N, C) -> (B, N, D); a view if channels-last
        tokens = tokens + sincos_2d(h, w, tokens.shape[-1], tokens.device, tokens.dtype)
        return self.norm(tokens), (h, w)
