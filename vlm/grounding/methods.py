"""How a token's map over the image is made: raw cross-attention, decoder rollout, or Chefer et al.'s relevancy.

Every method reads a teacher-forced pass of prompt + text through the decoder and gives, for each text token, a
map (h, w) over the patch grid from the query position that predicts it:

- ``raw``: the cross-attention weights of the chosen layers, heads averaged (or one chosen head).
- ``rollout``: attention rollout through the decoder. Image information enters at each chosen layer's
  cross-attention and is then carried to later positions by the self-attention of the following layers, each
  mixed half and half with the residual stream (Abnar & Zuidema 2020): map = sum_l (rollout after l) @ cross_l.
- ``chefer``: the gradient-weighted rule for encoder-decoder attention of Chefer et al. 2021 ("Generic
  Attention-model Explainability"): for the token's logit, every attention map A becomes
  Abar = mean over heads of (dlogit/dA * A)^+; relevancies start at R_tt = I, R_ti = 0 and are updated layer by
  layer, R_tt += Abar_self R_tt and R_ti += Abar_self R_ti at self-attention, R_ti += Rbar_tt Abar_cross at
  cross-attention (Rbar_tt: R_tt with its off-diagonal part row-normalised, the paper's residual handling; the
  patch side R_ii stays I since the decoder never attends among patches). The map is the token's row of R_ti.

Dimensions: S sequences (one per image here), T text positions, N patches, L layers, H heads, D width.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from vlm.model.vlm import VisionLanguageModel

METHODS = ("raw", "rollout", "chefer")


def decode_with_attention(model: VisionLanguageModel, pixels: Tensor, ids: Tensor,
                          ) -> tuple[Tensor, list[Tensor], list[Tensor], tuple[int, int]]:
    """Teacher-forced logits (S, T, V) for ids (S, T), one sequence per image, with every layer's self- and
    cross-attention weights (S, H, T, T) and (S, H, T, N) kept in the autograd graph, and the grid (h, w).

    The same computation as `VisionLanguageModel.forward` (tests check the logits agree), written out so that
    the self-attention weights, which the decoder does not return, are available too.
    """
    image_kv, grid = model.encode(pixels)
    dec = model.decoder
    S, T = ids.shape
    positions = torch.arange(T, device=ids.device).expand(S, T)
    x = dec.drop(dec.tok_emb(ids) + dec.pos_emb(positions))  # (S, T, D)
    self_weights, cross_weights = [], []
    for block, kv in zip(dec.blocks, image_kv, strict=True):
        h = block.ln_self(x)
        a, w_self = block.self_attn(h, *block.self_attn.keys_values(h), is_causal=T > 1, need_weights=True)
        x = x + block.drop(a)
        c, w_cross = block.cross_attn(block.ln_cross(x), *kv, need_weights=True)
        x = x + block.drop(c)
        x = x + block.drop(block.mlp(block.ln_mlp(x)))
        self_weights.append(w_self)
        cross_weights.append(w_cross)
    logits = dec.ln_f(x) @ dec.tok_emb.weight.t()  # (S, T, V)
    return logits, self_weights, cross_weights, grid


def token_maps(model: VisionLanguageModel, pixels: Tensor, ids: Tensor, queries: Sequence[Sequence[int]],
               method: str = "raw", layers: Sequence[int] | None = None, head: int | None = None,
               ) -> tuple[list[Tensor], tuple[int, int]]:
    """Maps (len(queries[s]), N) for each sequence s of ids (S, T), one row per query position listed.

    A query position q is the position whose output predicts token ids[s, q + 1]. ``layers`` chooses the decoder
    layers whose cross-attention enters the map (default: the model's ``attention_layers``, else all); ``head``
    one cross-attention head instead of their mean (raw and rollout only).
    """
    chosen = check_layers(layers or model.cfg.attention_layers or range(len(model.decoder.blocks)),
                          len(model.decoder.blocks))
    per_layer, grid = layer_maps(model, pixels, ids, queries, method, head)
    return [combine_layers(m, method, chosen) for m in per_layer], grid


def layer_maps(model: VisionLanguageModel, pixels: Tensor, ids: Tensor, queries: Sequence[Sequence[int]],
               method: str = "raw", head: int | None = None) -> tuple[list[Tensor], tuple[int, int]]:
    """Each layer's own part (L, len(queries[s]), N) of the maps of `token_maps`; `combine_layers` sums them.

    Every method is linear in the cross-attention layers it uses (for rollout and chefer, a layer's part is its
    cross-attention carried through the later layers' self-attention), so any choice of layers is a cheap sum.
    """
    if method not in METHODS:
        raise ValueError(f"grounding method {method!r} is not one of {', '.join(METHODS)}")
    num_heads = model.decoder.blocks[0].cross_attn.num_heads
    if head is not None and not -num_heads <= head < num_heads:
        raise ValueError(f"attention head {head} out of range: the decoder has {num_heads} heads")
    if head is not None and method == "chefer":
        raise ValueError("the chefer method averages the heads by definition; it takes no head")
    if method == "chefer":
        return _chefer(model, pixels, ids, queries)
    with torch.no_grad():
        _, self_w, cross_w, grid = decode_with_attention(model, pixels, ids)
    cross = [w.mean(1) if head is None else w[:, head] for w in cross_w]  # L x (S, T, N)
    parts = torch.stack(cross if method == "raw" else _rollout(self_w, cross))  # (L, S, T, N)
    return [parts[:, s, list(q)] for s, q in enumerate(queries)], grid


def combine_layers(parts: Tensor, method: str, chosen: Sequence[int]) -> Tensor:
    """(L, Q, N) per-layer parts -> (Q, N): raw averages the chosen layers, rollout sums and renormalises each
    row, chefer sums."""
    total = parts[list(chosen)].sum(0)
    if method == "raw":
        return total / len(chosen)
    if method == "rollout":
        return total / total.sum(-1, keepdim=True).clamp_min(1e-12)
    return total


def check_layers(layers: Sequence[int], num_layers: int) -> list[int]:
    """Layer indices (negative ones count from the end) as sorted non-negative ones; ValueError if out of range."""
    layers = list(layers)
    if not layers or not all(-num_layers <= i < num_layers for i in layers):
        raise ValueError(f"attention layers {layers} out of range: the decoder has {num_layers} layers")
    return sorted({i % num_layers for i in layers})


def _with_residual(attn: Tensor) -> Tensor:
    """Heads-averaged self-attention (S, H, T, T) mixed half and half with the identity (the residual)."""
    eye = torch.eye(attn.shape[-1], device=attn.device, dtype=attn.dtype)
    return 0.5 * attn.mean(1) + 0.5 * eye


def _rollout(self_w: list[Tensor], cross: list[Tensor]) -> list[Tensor]:
    """Each layer's cross-attention (S, T, N) carried forward by the later layers' self-attention."""
    carry = torch.eye(cross[0].shape[1], device=cross[0].device).expand(cross[0].shape[0], -1, -1)  # (S, T, T)
    parts = [cross[0]] * len(cross)
    for layer in reversed(range(len(cross))):
        parts[layer] = carry @ cross[layer]  # (S, T, N)
        carry = carry @ _with_residual(self_w[layer])  # positions feeding layer's input, through its self-attn
    return parts


def _normalise_residual(r_tt: Tensor) -> Tensor:
    """Chefer et al.'s handling of the residual: the off-diagonal part row-normalised, plus the identity."""
    eye = torch.eye(r_tt.shape[-1], device=r_tt.device, dtype=r_tt.dtype)
    off = r_tt - eye
    return off / off.sum(-1, keepdim=True).clamp_min(1e-12) + eye


def _chefer(model: VisionLanguageModel, pixels: Tensor, ids: Tensor, queries: Sequence[Sequence[int]],
            ) -> tuple[list[Tensor], tuple[int, int]]:
    positions = sorted({q for qs in queries for q in qs})
    S, T = ids.shape
    with torch.enable_grad():
        logits, self_w, cross_w, grid = decode_with_attention(model, pixels, ids)
        N = cross_w[0].shape[-1]
        L = len(cross_w)
        if not positions:
            return [logits.new_zeros(L, 0, N) for _ in queries], grid
        at = torch.tensor(positions, device=ids.device)
        targets = logits[:, at].gather(-1, ids[:, at + 1, None])[..., 0]  # (S, P): each position's next-token logit
        # One batched backward pass: row p of grad_outputs asks for the gradient of position p's logit (of every
        # sequence at once: sequences are independent).
        P = len(positions)
        grad_outputs = torch.eye(P, device=ids.device, dtype=targets.dtype)[:, None, :].expand(P, S, P)
        grads = torch.autograd.grad(targets, self_w + cross_w, grad_outputs=grad_outputs, is_grads_batched=True)
    r_tt = torch.eye(T, device=ids.device).expand(P, S, T, T)
    r_ti = logits.new_zeros(L, P, S, T, N)  # each layer's part of R_ti, kept apart
    for layer in range(L):
        a_self = (grads[layer] * self_w[layer].detach()).clamp_min(0).mean(2)  # (P, S, T, T)
        r_ti = r_ti + a_self @ r_ti
        r_tt = r_tt + a_self @ r_tt
        a_cross = (grads[L + layer] * cross_w[layer].detach()).clamp_min(0).mean(2)  # (P, S, T, N)
        r_ti[layer] = r_ti[layer] + _normalise_residual(r_tt) @ a_cross
    index = {q: p for p, q in enumerate(positions)}
    maps = [torch.stack([r_ti[:, index[q], s, q] for q in qs], 1) if qs else r_ti.new_zeros(L, 0, N)
            for s, qs in enumerate(queries)]
    return [m.detach() for m in maps], grid
