"""Image encoder + text decoder: one model for captions and answers.

A caption is generated after a caption prompt; an answer after its question prompt. Both read the same
patch features through cross-attention, so every generated token has a map over the image.

Dimensions: B images, S sequences (k per image, image-major), T text, N patches, D width, H heads.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from vlm.config import ModelConfig
from vlm.model.decoder import KeysValues, TextDecoder
from vlm.model.encoder import ImageEncoder
from vlm.model.linear import use_onednn


@dataclass
class VLMOutput:
    logits: Tensor
    """(S, T, V) next-token logits."""
    grid: tuple[int, int]
    """(h, w) patch grid of the images."""
    cross_attentions: list[Tensor] | None = None
    """Per layer (S, H, T, N) cross-attention weights, when requested (need_weights)."""
    self_attentions: list[Tensor] | None = None
    """Per layer (S, H, T, T) self-attention weights, when requested (need_self_weights)."""


class EncodedImages(list):
    """What `VisionLanguageModel.encode` gives: each decoder layer's cross-attention keys/values (a list of
    `KeysValues`, which generation reads), and ``patches``, the patch features (B, N, D) before the encoder's context
    blocks (None without them), from which the maps recompute those blocks' attention to carry relevance through
    them (`vlm.grounding.methods`)."""

    def __init__(self, keys_values: list[KeysValues], patches: Tensor | None = None):
        super().__init__(keys_values)
        self.patches = patches


class VisionLanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, pretrained: bool = True):
        """pretrained=False: for saved weights to be loaded into, the encoder's pretrained weights (``cfg.encoder``'s
        ``pretrained`` or ``weights``) are neither downloaded nor read, whatever the config says."""
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        depth = cfg.decoder.depth
        if cfg.attention_layers is not None and not (
                cfg.attention_layers and all(-depth <= i < depth for i in cfg.attention_layers)):
            raise ValueError(f"model.attention_layers {cfg.attention_layers}: the decoder has {depth} layers "
                             f"(0 to {depth - 1}, or negative from the last)")
        self.encoder = ImageEncoder(cfg.encoder, cfg.decoder.width, cfg.decoder.num_heads, pretrained)
        self.decoder = TextDecoder(cfg.decoder, vocab_size)
        use_onednn(self)  # on the CPU its products run on oneDNN (vlm.model.linear)

    def encode(self, images: Tensor) -> tuple[EncodedImages, tuple[int, int]]:
        """Images (B, 3, H, W) -> each decoder layer's cross-attention keys/values, and the grid (h, w)."""
        if self.encoder.context:
            return self.encode_features(self.encoder.feature_map(images))
        memory, grid = self.encoder(images)  # (B, N, D)
        return EncodedImages(self.decoder.image_keys_values(memory)), grid

    def encode_features(self, fmap: Tensor) -> tuple[EncodedImages, tuple[int, int]]:
        """Like encode, from the encoder trunk's precomputed map (B, C, h, w) (a feature cache)."""
        if not self.encoder.context:
            memory, grid = self.encoder.project(fmap)
            return EncodedImages(self.decoder.image_keys_values(memory)), grid
        patches, grid = self.encoder.patch_features(fmap)
        return self.encode_patches(patches)[0], grid

    def encode_patches(self, patches: Tensor, need_weights: bool = False) -> tuple[EncodedImages, list[Tensor]]:
        """Patch features before the context blocks (B, N, D) -> the decoder's keys/values (keeping the patches),
        and with need_weights each context block's attention weights (B, H, N, N), in the autograd graph."""
        memory, weights = self.encoder.contextualise(patches, need_weights)
        return EncodedImages(self.decoder.image_keys_values(memory), patches.detach()), weights

    def decode(self, image_kv: list[KeysValues], grid: tuple[int, int], ids: Tensor,
               need_weights: bool = False, need_self_weights: bool = False) -> VLMOutput:
        """Teacher-forced logits for token ids (S, T): k = S // B sequences per image, image-major; on request
        each layer's cross- and self-attention weights (`TextDecoder.forward`)."""
        if ids.shape[0] % image_kv[0][0].shape[0]:
            raise ValueError(f"{ids.shape[0]} sequences do not split evenly over {image_kv[0][0].shape[0]} images")
        out = self.decoder(ids, image_kv, need_weights=need_weights, need_self_weights=need_self_weights)
        return VLMOutput(out.logits, grid, out.cross_attentions, out.self_attentions)

    def forward(self, images: Tensor, ids: Tensor, need_weights: bool = False) -> VLMOutput:
        """Encode images (B, 3, H, W) once and decode token ids (S, T), S = k * B, against them."""
        image_kv, grid = self.encode(images)
        return self.decode(image_kv, grid, ids, need_weights)
