"""A timm trunk turned into a grid of patch features for the decoder to attend to.

Every timm backbone (CNNs with NCHW maps, ViTs with prefix tokens, NHWC models) answers
``forward_intermediates(..., output_fmt="NCHW")`` with a (B, C, h, w) map whose prefix tokens (class,
registers) timm has already dropped using the model's own ``num_prefix_tokens``. Backbones without it
are built with ``features_only=True``. Either way no shape is guessed.

With ``features: final`` (`EncoderConfig`, for captioners imported by `vlm.hub`), the decoder instead reads a
ViT's final output tokens as they are: after the trunk's final norm, at its width C, the prefix (class) tokens
first, with no projection and no added positions. ``num_prefix`` says how many prefix tokens lead; maps drop them.

Dimensions: B batch, C trunk channels, h x w patch grid, N = h * w patches, P prefix tokens, D decoder width.
"""

from __future__ import annotations

import os

import timm
import torch
from torch import Tensor, nn

from vlm.config import EncoderConfig
from vlm.model.attention import Attention
from vlm.model.decoder import MLP


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


class ContextBlock(nn.Module):
    """A pre-norm transformer block over the patch grid: self-attention among all patches, then an MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.ln_attn = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.ln_mlp = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(mlp_ratio * dim))

    def forward(self, x: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """Patches (B, N, D) -> patches, and the attention weights (B, H, N, N) when need_weights."""
        h = self.ln_attn(x)
        a, weights = self.attn(h, *self.attn.keys_values(h), need_weights=need_weights)
        x = x + a
        return x + self.mlp(self.ln_mlp(x)), weights


def _set_norm_eps(trunk: nn.Module, eps: float | None) -> None:
    """Every LayerNorm of the trunk gets this epsilon (None: timm's own; timm's ViT uses 1e-6, HF's ViT 1e-12)."""
    if eps is not None:
        for m in trunk.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = eps


def _create_trunk(cfg: EncoderConfig, pretrained: bool, **kwargs) -> nn.Module:
    """timm's model ``cfg.name``, with its pretrained weights or those of ``cfg.weights`` when ``pretrained``; a
    failure to get them is a ValueError of one line naming the option (timm's own says FileNotFoundError, or what a
    failed download says, without the field)."""
    if pretrained and cfg.weights and not os.path.isfile(cfg.weights):
        raise ValueError(f"encoder.weights {cfg.weights}: no such file")
    try:
        return timm.create_model(cfg.name, pretrained=pretrained, **kwargs)
    except TypeError as e:  # model_args meant for another backbone
        raise ValueError(f"encoder.model_args {cfg.model_args} do not fit {cfg.name}: {e}") from None
    except Exception as e:
        if not pretrained:
            raise
        why = f"{type(e).__name__}: {str(e).strip().splitlines()[0]}" if str(e).strip() else type(e).__name__
        if cfg.weights:
            raise ValueError(f"encoder.weights {cfg.weights}: cannot load the trunk's weights ({why})") from None
        raise ValueError(f"encoder.pretrained: cannot get timm's weights for {cfg.name} ({why}); without the "
                         "internet, give them as encoder.weights FILE") from None


class ImageEncoder(nn.Module):
    """timm trunk -> patch features (B, N, D) projected to the decoder width, plus the grid (h, w); with
    ``cfg.context_layers``, transformer blocks then mix information across all patches (global context)."""

    def __init__(self, cfg: EncoderConfig, width: int, num_heads: int = 4, pretrained: bool = True):
        """pretrained=False: the trunk without the weights ``cfg.pretrained`` or ``cfg.weights`` name, which are then
        neither downloaded nor read (the caller loads saved weights over them)."""
        super().__init__()
        kwargs = dict(cfg.model_args)
        pretrained = pretrained and (cfg.pretrained or bool(cfg.weights))
        overlay = {"file": cfg.weights} if cfg.weights and pretrained else {}
        # The image transform (vlm.data.transforms) reads timm's data config: an imported model's own constants.
        overlay |= {k: tuple(v) if isinstance(v, list) else v for k, v in
                    (("mean", cfg.mean), ("std", cfg.std), ("interpolation", cfg.interpolation)) if v is not None}
        if overlay:
            kwargs["pretrained_cfg_overlay"] = overlay
        trunk = _create_trunk(cfg, pretrained, **kwargs)
        _set_norm_eps(trunk, cfg.norm_eps)
        self.final = cfg.features == "final"
        self.num_prefix = 0  # prefix tokens (class, registers) leading the decoder's keys
        if self.final:
            self._final_tokens(cfg, trunk)
            return
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
            trunk = _create_trunk(cfg, pretrained, features_only=True, out_indices=(self.level,), **kwargs)
            _set_norm_eps(trunk, cfg.norm_eps)
            self.features_only = True
        # A convolutional trunk runs channels-last, the layout oneDNN and cuDNN convolutions are fastest in;
        # a ViT's one patch convolution would only pay for the copy.
        self.channels_last = False
        self.trunk = trunk
        self.use_channels_last(True)
        self.cfg = cfg
        self.proj = nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, width))
        self.norm = nn.LayerNorm(width)
        if cfg.context_layers < 0:
            raise ValueError(f"encoder.context_layers must be 0 or more, got {cfg.context_layers}")
        self.context = nn.ModuleList(ContextBlock(width, num_heads) for _ in range(cfg.context_layers))
        self.context_norm = nn.LayerNorm(width) if cfg.context_layers else nn.Identity()
        if not cfg.trainable:
            # Eval mode from the start: Lightning records each submodule's mode when fitting starts and sets it
            # back directly after validation, bypassing train() below.
            self.trunk.requires_grad_(False).eval()
        elif cfg.train_last is not None:
            self._train_only_last(cfg.train_last)

    def _final_tokens(self, cfg: EncoderConfig, trunk: nn.Module) -> None:
        """features final: the whole trunk, its final norm kept, no projection, no position codes, no context."""
        if not hasattr(trunk, "forward_features") or not hasattr(trunk, "patch_embed"):
            raise ValueError(f"encoder.features final needs a ViT; {cfg.name} has no patch tokens")
        if getattr(cfg, "context_layers", 0):
            raise ValueError("encoder.context_layers need encoder.features projected")
        trunk.reset_classifier(0)  # the head is never used
        self.num_prefix = int(getattr(trunk, "num_prefix_tokens", 0))
        self.cfg, self.trunk, self.channels_last, self.features_only = cfg, trunk, False, False
        self.proj = self.norm = None
        self.context, self.context_norm = nn.ModuleList(), nn.Identity()
        if not cfg.trainable:
            self.trunk.requires_grad_(False).eval()
        elif cfg.train_last is not None:
            self._train_only_last(cfg.train_last)

    def train(self, mode: bool = True) -> ImageEncoder:
        """A frozen trunk stays in eval mode: its batch-norm statistics and dropout stay as loaded. So do the
        running-statistics norms (batch norm) of frozen stages under ``train_last``."""
        super().train(mode)
        if not self.cfg.trainable:
            self.trunk.eval()
        elif self.cfg.train_last:
            self._freeze_norms()
        return self

    def _freeze_norms(self) -> None:
        """Eval mode for each norm with running statistics whose parameters are all frozen (a stage that
        ``train_last`` does not train): training would otherwise still update its statistics."""
        for m in self.trunk.modules():
            stats = isinstance(getattr(m, "running_mean", None), Tensor)  # BatchNorm, InstanceNorm tracking stats
            params = list(m.parameters())
            if stats and params and not any(p.requires_grad for p in params):
                m.eval()

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
        # Eval mode from the start too: Lightning records each submodule's mode when fitting starts and sets it
        # back directly after validation, bypassing train().
        self._freeze_norms()

    def use_channels_last(self, on: bool) -> None:
        """Run a convolutional trunk (more than one convolution) channels-last or not: its weights, and the images
        it reads, in that layout. A ViT's one patch convolution stays as it is."""
        if sum(isinstance(m, nn.Conv2d) for m in self.trunk.modules()) > 1:
            self.channels_last = on
            self.trunk.to(memory_format=torch.channels_last if on else torch.contiguous_format)

    def feature_map(self, images: Tensor) -> Tensor:
        """The trunk's map at the chosen level, (B, C, h, w); with features final, its tokens (B, P + N, C)."""
        if self.final:
            return self.trunk.forward_features(images)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.features_only:
            return self.trunk(images)[0]
        return self.trunk.forward_intermediates(
            images, indices=[self.level], intermediates_only=True, output_fmt="NCHW"
        )[0]

    def forward(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        if self.final:  # the grid of these images (a ViT with dynamic_img_size takes any size)
            return self.feature_map(images), tuple(self.trunk.patch_embed.dynamic_feat_size(images.shape[-2:]))
        return self.project(self.feature_map(images))

    def project(self, fmap: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """The trunk's map (B, C, h, w) -> patch features (B, N, D), after the context blocks, and the grid."""
        patches, grid = self.patch_features(fmap)
        return self.contextualise(patches)[0], grid

    def contextualise(self, patches: Tensor, need_weights: bool = False) -> tuple[Tensor, list[Tensor]]:
        """Patch features (B, N, D) through the context blocks (none: unchanged), and on request each block's
        attention weights (B, H, N, N), in the autograd graph (the maps' rollout and Chefer's rule need them)."""
        weights = []
        for block in self.context:
            patches, w = block(patches, need_weights)
            weights.append(w)
        return self.context_norm(patches), weights

    def patch_features(self, fmap: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """The trunk's map (B, C, h, w) -> projected patch features (B, N, D) before the context blocks, and the
        grid (h, w). With features final, the tokens (B, P + N, C) pass unchanged, on encoder.image_size's grid."""
        if self.final:
            size = (self.cfg.image_size,) * 2 if isinstance(self.cfg.image_size, int) else self.cfg.image_size
            return fmap, tuple(self.trunk.patch_embed.dynamic_feat_size(tuple(size)))
        h, w = fmap.shape[-2:]
        tokens = self.proj(fmap.permute(0, 2, 3, 1).flatten(1, 2))  # (B, N, C) -> (B, N, D); a view if channels-last
        tokens = tokens + sincos_2d(h, w, tokens.shape[-1], tokens.device, tokens.dtype)
        return self.norm(tokens), (h, w)
