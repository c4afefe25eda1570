"""Transformer text decoder: blocks of causal self-attention, cross-attention to the image, MLP.

Blocks are pre-norm (vlm's own, GPT-2) or post-norm (BERT, BLIP's text decoder), as `DecoderConfig.norm` says;
the other options of `DecoderConfig` (embedding norm, output transform and bias, activation, epsilon, the width
of the image features) let imported decoders (`vlm.hub`) run exactly as in their source.

Dimensions: B images, S sequences (k per image), T text positions, N image patches, D width, H heads, hd = D // H,
L layers, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlm.config import DecoderConfig
from vlm.model.attention import Attention
from vlm.model.linear import ReorderedWeight, linear, matmul

KeysValues = tuple[Tensor, Tensor]  # each (batch, H, length, hd)


class KVCache:
    """Preallocated self-attention keys and values of every layer, (L, S, H, max_length, hd)."""

    def __init__(self, num_layers: int, batch: int, num_heads: int, max_length: int, head_dim: int,
                 like: Tensor):
        shape = (num_layers, batch, num_heads, max_length, head_dim)
        self.k = like.new_empty(shape)  # positions past `length` are never read
        self.v = like.new_empty(shape)
        self._spare: tuple[Tensor, Tensor] | None = None  # beam search reorders into these, then swaps
        self.length = 0  # positions filled so far

    def update(self, layer: int, k: Tensor, v: Tensor) -> KeysValues:
        """Store the new positions' keys/values (S, H, T, hd); return all so far, (S, H, length + T, hd)."""
        end = self.length + k.shape[2]
        if end > self.k.shape[3]:
            raise ValueError(f"sequence of {end} tokens exceeds the cache's {self.k.shape[3]} positions")
        keys, values = self.k[layer], self.v[layer]
        keys[:, :, self.length:end] = k
        values[:, :, self.length:end] = v
        return keys[:, :, :end], values[:, :, :end]

    def advance(self, steps: int) -> None:
        self.length += steps

    def reorder(self, index: Tensor) -> None:
        """Keep the rows given by index (beam search: each kept beam takes its parent's cache)."""
        if self._spare is None:
            self._spare = (torch.empty_like(self.k), torch.empty_like(self.v))
        filled = slice(0, self.length)  # only the filled positions move, straight into the spare buffers
        for cache, spare in zip((self.k, self.v), self._spare, strict=True):
            torch.index_select(cache[:, :, :, filled], 1, index, out=spare[:, :, :, filled])
        (self.k, self.v), self._spare = self._spare, (self.k, self.v)

    def keep(self, rows: Tensor) -> None:
        """Keep only the given rows, in that order (fewer than before: the decoding loop retires finished images);
        only the filled positions are copied, into smaller buffers."""
        filled = slice(0, self.length)
        shape = (self.k.shape[0], len(rows), *self.k.shape[2:])
        k, v = self.k.new_empty(shape), self.v.new_empty(shape)
        for cache, kept in zip((self.k, self.v), (k, v), strict=True):
            torch.index_select(cache[:, :, :, filled], 1, rows, out=kept[:, :, :, filled])
        self.k, self.v, self._spare = k, v, None


class _GeluLinear(torch.autograd.Function):
    """``linear(gelu(h), weight, bias)`` that saves only h for backward and recomputes the GELU there.

    Autograd would keep both h (for the GELU's gradient) and gelu(h) (for the linear's); the GELU is cheap
    to recompute, so this halves the stored MLP activations. It computes in h's dtype, which under autocast
    is already the low precision one (the weight is cast as autocast would cast it). Its products are
    `vlm.model.linear`'s: on oneDNN in float32 on the CPU.
    """

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor | None, approximate: str) -> Tensor:
        ctx.save_for_backward(h, weight)
        ctx.has_bias, ctx.approximate = bias is not None, approximate
        bias = None if bias is None else bias.to(h.dtype)
        return linear(F.gelu(h, approximate=approximate), weight.to(h.dtype), bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        h, weight = ctx.saved_tensors
        needs_h, needs_weight, needs_bias, _ = ctx.needs_input_grad
        grad = grad.to(h.dtype)
        with torch.enable_grad():
            h_ = h.detach().requires_grad_(needs_h)
            g = F.gelu(h_, approximate=ctx.approximate)
        grad_weight = grad_bias = grad_h = None
        rows = grad.reshape(-1, grad.shape[-1])  # (S * T, D)
        if needs_weight:
            grad_weight = matmul(rows.t(), g.detach().reshape(-1, g.shape[-1])).to(weight.dtype)
        if needs_bias and ctx.has_bias:
            grad_bias = rows.sum(0).to(weight.dtype)
        if needs_h:
            (grad_h,) = torch.autograd.grad(g, h_, matmul(grad, weight.to(h.dtype)))
        return grad_h, grad_weight, grad_bias, None


class MLP(nn.Sequential):
    """Linear, GELU, linear; in training the GELU's output is recomputed in backward rather than stored."""

    def __init__(self, dim: int, hidden: int, approximate: str = "none"):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(approximate=approximate), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        fc1, act, fc2 = self
        h = fc1(x)
        if torch.is_grad_enabled() and (h.requires_grad or fc2.weight.requires_grad):
            return _GeluLinear.apply(h, fc2.weight, fc2.bias, act.approximate)
        return fc2(act(h))


def approximate(cfg: DecoderConfig) -> str:
    """The ``approximate`` argument of torch's GELU for the decoder's activation."""
    return {"gelu": "none", "gelu_tanh": "tanh"}[cfg.activation]


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        D, eps = cfg.width, cfg.norm_eps
        self.width = D
        self.pre_norm = cfg.norm == "pre"  # else post-norm: each LayerNorm follows its residual sum
        self.ln_self = nn.LayerNorm(D, eps=eps)
        self.self_attn = Attention(D, cfg.num_heads, cfg.dropout)
        self.ln_cross = nn.LayerNorm(D, eps=eps)
        self.cross_attn = Attention(D, cfg.num_heads, cfg.dropout, source_dim=cfg.cross_width)
        self.ln_mlp = nn.LayerNorm(D, eps=eps)
        hidden = int(cfg.mlp_ratio * D)
        self.mlp = MLP(D, hidden, approximate(cfg))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: Tensor,
        image_kv: KeysValues,
        self_mask: Tensor | None,
        cache: KVCache | None,
        layer: int,
        need_weights: bool,
        need_self_weights: bool,
    ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
        """x (S, T, D) -> x, the self-attention weights (S, H, T, T_all) when need_self_weights, the
        cross-attention weights (S, H, T, N) when need_weights (else None), and the cross-attention input (S, T, D).
        """
        pre = self.pre_norm
        h = self.ln_self(x) if pre else x
        k, v = self.self_attn.keys_values(h)  # (S, H, T, hd)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (S, H, T_all, hd) with all earlier positions
        is_causal = self_mask is None and k.shape[2] == x.shape[1] and x.shape[1] > 1
        a, self_weights = self.self_attn(h, k, v, mask=self_mask, is_causal=is_causal, need_weights=need_self_weights)
        x = x + self.drop(a)
        if not pre:
            x = self.ln_self(x)
        # Cross-attention needs no mask, so the k sequences of each image are one query sequence of k * T
        # tokens against that image's patches: no keys/values are copied per sequence. The block calls the
        # cross_attn module (not its parts), so FSDP gathers its parameters around the call. The grouped shape
        # is (B, -1, width): an ONNX export then computes it from B alone, not from every size in turn.
        S, T, D = x.shape
        B = image_kv[0].shape[0]
        per_image = S // B
        cross_input = self.ln_cross(x) if pre else x  # (S, T, D)
        c, weights = self.cross_attn(cross_input.reshape(B, -1, self.width), *image_kv, need_weights=need_weights)
        x = x + self.drop(c.reshape_as(x))  # as x: an export reads its shape with one operator
        if not pre:
            x = self.ln_cross(x)
        if weights is not None and per_image > 1:  # (B, H, per_image * T, N) -> (S, H, T, N)
            H, N = weights.shape[1], weights.shape[-1]
            weights = weights.view(B, H, per_image, T, N).transpose(1, 2).reshape(S, H, T, N)
        if pre:
            x = x + self.drop(self.mlp(self.ln_mlp(x)))
        else:
            x = self.ln_mlp(x + self.drop(self.mlp(x)))
        return x, self_weights, weights, cross_input


@dataclass
class DecoderOutput:
    """What one decoder pass returns; the lists hold one tensor per layer, or are None when not requested."""

    logits: Tensor
    """(S, T, V) next-token logits."""
    self_attentions: list[Tensor] | None = None
    """(S, H, T, T_all) causal self-attention weights (need_self_weights), in the autograd graph (Chefer's rule)."""
    cross_attentions: list[Tensor] | None = None
    """(S, H, T, N) cross-attention weights over the image patches (need_weights), in the autograd graph."""
    cross_inputs: list[Tensor] | None = None
    """(S, T, D) normalised text states the cross-attention queries come from (need_cross_inputs): generation
    keeps them and computes weights once decoding ends."""


class TextDecoder(nn.Module):
    """Token + position embeddings (optionally normalised), blocks, final norm (pre-norm blocks), and an output
    head tied to the token embedding, optionally after a transform and with a bias."""

    def __init__(self, cfg: DecoderConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        D, eps = cfg.width, cfg.norm_eps
        self.tok_emb = nn.Embedding(vocab_size, D)
        self.pos_emb = nn.Embedding(cfg.max_length, D)
        self.emb_norm = nn.LayerNorm(D, eps=eps) if cfg.embed_norm else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.ln_f = nn.LayerNorm(D, eps=eps) if cfg.norm == "pre" else nn.Identity()
        self.head_transform = nn.Sequential(nn.Linear(D, D), nn.GELU(approximate=approximate(cfg)),
                                            nn.LayerNorm(D, eps=eps)) if cfg.head_transform else None
        self.head_bias = nn.Parameter(torch.zeros(vocab_size)) if cfg.head_bias else None
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        self._head_weight = ReorderedWeight()

    def image_keys_values(self, memory: Tensor) -> list[KeysValues]:
        """Cross-attention keys/values of every layer from patch features (B, N, D), computed once.

        They are made contiguous here, once, so that no generation step reads them through strides.
        """
        return [tuple(t.contiguous() for t in block.cross_attn.keys_values(memory)) for block in self.blocks]

    def new_cache(self, batch: int, like: Tensor, length: int | None = None) -> KVCache:
        """An empty cache for batch sequences of at most length tokens (None: max_length). Generation sizes it
        to prompt + new tokens: a decoder allowing 512 positions would otherwise preallocate all of them."""
        length = self.cfg.max_length if length is None else min(length, self.cfg.max_length)
        attn = self.blocks[0].self_attn
        return KVCache(len(self.blocks), batch, attn.num_heads, length, attn.head_dim, like)

    def forward(
        self,
        ids: Tensor,
        image_kv: list[KeysValues],
        positions: Tensor | None = None,
        self_mask: Tensor | None = None,
        cache: KVCache | None = None,
        need_weights: bool = False,
        need_self_weights: bool = False,
        need_cross_inputs: bool = False,
    ) -> DecoderOutput:
        """Logits for token ids (S, T), and on request every layer's cross-attention weights (need_weights),
        self-attention weights (need_self_weights) and cross-attention inputs (need_cross_inputs). Weights come
        from the explicit attention path, in the autograd graph; the rest runs the fused kernel.

        image_kv holds B images' keys/values (B, H, N, hd); the S = k * B sequences are image-major:
        sequence s reads image s // k. Without a cache and mask, self-attention is causal over ids. With a
        cache, ids continue the cached sequence; self_mask (S, 1, T, T_all) then says which cached
        positions each new token may see. Given positions (S, T) must lie below max_length (generation's are
        checked once, not at every step).
        """
        S, T = ids.shape
        if positions is None:
            start = cache.length if cache is not None else 0
            if start + T > self.cfg.max_length:
                raise ValueError(f"sequence of {start + T} tokens exceeds the decoder's max_length "
                                 f"{self.cfg.max_length}")
            positions = torch.arange(start, start + T, device=ids.device).expand(S, T)
        x = self.tok_emb(ids) + self.pos_emb(positions)  # (S, T, D)
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        x = self.drop(x)
        self_weights, cross_weights, cross_inputs = [], [], []
        for layer, block in enumerate(self.blocks):
            x, w_self, w_cross, h = block(x, image_kv[layer], self_mask, cache, layer, need_weights, need_self_weights)
            self_weights.append(w_self)
            cross_weights.append(w_cross)
            cross_inputs.append(h)
        if cache is not None:
            cache.advance(T)
        logits = self.logits(x)  # (S, T, V)
        return DecoderOutput(logits, self_weights if need_self_weights else None,
                             cross_weights if need_weights else None, cross_inputs if need_cross_inputs else None)

    def logits(self, x: Tensor) -> Tensor:
        """Next-token logits (S, T, V) from the last block's output (S, T, D)."""
        h = self.ln_f(x)
        if self.head_transform is not None:
            h = self.head_transform(h)
        return linear(h, self.tok_emb.weight, self.head_bias, self._head_weight)  # the head is tied to tok_emb

    def cross_attention_weights(self, cross_inputs: list[Tensor], image_keys: list[Tensor]) -> list[Tensor]:
        """Each layer's cross-attention weights (B, H, T, N) from its inputs (B, T, D) and the image keys (B, H, N, hd)
        (`image_keys_values`' first), one sequence per image.

        Generation keeps these inputs at every step (its attention is the fused kernel, which returns no
        weights) and computes the weights here, once, for the tokens it keeps. The parameters must be whole:
        under FSDP, generation runs inside ``full_parameters``.
        """
        return [block.cross_attn.weights(block.cross_attn.queries(h), k)
                for block, h, k in zip(self.blocks, cross_inputs, image_keys, strict=True)]
