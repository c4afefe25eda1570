"""How a token's map over the image is made: raw cross-attention, decoder rollout, or Chefer et al.'s relevancy.

`token_maps` is the one way to make maps (the API, the CLI, vlm serve, vlm eval and the training callback call it
with a `vlm.config.MapConfig`). Every method reads the weights of one teacher-forced pass of prompt + text through
the decoder (`TextDecoder.forward` with the weights requested) and gives, for each text token, a map (h, w) over
the patch grid from the query position that predicts it:

- ``raw``: the cross-attention weights of the chosen layers, heads averaged (or one chosen head).
- ``rollout``: attention rollout through the decoder. Image information enters at each chosen layer's
  cross-attention and is then carried to later positions by the self-attention of the following layers, each
  mixed half and half with the residual stream (Abnar & Zuidema 2020): map = sum_l (rollout after l) @ cross_l.
- ``chefer``: the gradient-weighted rule for encoder-decoder attention of Chefer et al. 2021 ("Generic
  Attention-model Explainability"): for the token's logit, every attention map A becomes
  Abar = mean over heads of (dlogit/dA * A)^+; relevancies start at R_tt = I, R_ti = 0 and are updated layer by
  layer, R_tt += Abar_self R_tt and R_ti += Abar_self R_ti at self-attention, R_ti += Rbar_tt Abar_cross at
  cross-attention (Rbar_tt: R_tt with its off-diagonal part row-normalised, the paper's residual handling). The
  map is the token's row of R_ti.

When the decoder also attends to the encoder's prefix tokens (an imported captioner's class token), their columns
are removed and each layer's raw or rollout row renormalised over the patches before layers are combined.

Context blocks (``encoder.context_layers``: self-attention among the patches before the decoder) make a map over
their output tokens, not over the image, so rollout and chefer carry it back through them to the patches: rollout
multiplies each part by the blocks' own rollout (heads averaged, half and half with the residual, last block
first); chefer builds the patch-side relevancy R_ii = I, R_ii += Abar_ctx R_ii at each block (Abar_ctx the
gradient-weighted attention of the token's logit, as above) and updates R_ti += Rbar_tt Abar_cross Rbar_ii (the
paper's rule for attention between two modalities; without context blocks Rbar_ii = I). ``raw`` stays the
cross-attention itself, over the context tokens (one per patch). These two methods recompute the blocks from the
patches that `VisionLanguageModel.encode` keeps (`EncodedImages.patches`).

Dimensions: S sequences (one per image here), T text positions, N patches, L layers, H heads, D width.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from vlm.config import METHODS, MapConfig
from vlm.model.decoder import KeysValues
from vlm.model.vlm import VisionLanguageModel

__all__ = ["METHODS", "check_layers", "check_map_config", "chosen_layers", "combine_layers", "token_maps"]


def token_maps(model: VisionLanguageModel, image_kv: list[KeysValues], grid: tuple[int, int],
               prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], config: MapConfig | None = None,
               *, per_layer: bool = False) -> list[Tensor]:
    """The one way to make maps: each target's token maps (len(target), h, w), made as ``config`` says, when
    the decoder reads prompt + target against its image (image_kv holds one image per prompt).

    A token's map comes from the position that predicts it. With ``per_layer``, each layer's own part
    (L, len(target), h, w) instead (``config.layers`` unused): every method is linear in the cross-attention
    layers it uses (for rollout and chefer, a layer's part is its cross-attention carried through the later
    layers' self-attention), so `combine_layers` makes any choice of layers from them as a cheap sum.
    """
    config = config or MapConfig()
    check_map_config(model, config)
    if len(prompts) != len(targets) or len(prompts) != image_kv[0][0].shape[0]:
        raise ValueError(f"{len(prompts)} prompts and {len(targets)} targets for {image_kv[0][0].shape[0]} images")
    seqs = [[*p, *t] for p, t in zip(prompts, targets, strict=True)]
    device = image_kv[0][0].device
    ids = torch.zeros(len(seqs), max(len(s) for s in seqs), dtype=torch.long, device=device)  # (S, T)
    for row, seq in enumerate(seqs):  # right padding: causal attention never reads it
        ids[row, :len(seq)] = torch.tensor(seq, device=device)
    queries = [range(len(p) - 1, len(p) - 1 + len(t)) for p, t in zip(prompts, targets, strict=True)]
    patches = getattr(image_kv, "patches", None)
    if model.encoder.context and config.method != "raw" and patches is None:
        raise ValueError(f"{config.method} maps through the encoder's context blocks need the encoding of "
                         "VisionLanguageModel.encode (its patches), not bare keys/values")
    if config.method == "chefer":
        parts = _chefer(model, image_kv, ids, queries)
    else:
        parts = _attention_parts(model, image_kv, ids, queries, config.method, config.head)
    prefix = getattr(model.encoder, "num_prefix", 0)
    if prefix:
        parts = [patches_only(p, prefix, config.method) for p in parts]
    if not per_layer:
        chosen = chosen_layers(model, config.layers)
        parts = [combine_layers(p, config.method, chosen) for p in parts]
    return [p.float().reshape(*p.shape[:-1], *grid) for p in parts]


def generated_raw_maps(model: VisionLanguageModel, attentions: Sequence[Tensor], grid: tuple[int, int],
                       config: MapConfig | None = None, *, prefix: int = 0) -> list[Tensor]:
    """Raw maps (T, h, w) of generated tokens from the cross-attention (T, L, H, N) that decoding returns
    (`vlm.model.generate.decode` with ``return_attention``, on either backend): what `token_maps` makes of the same
    tokens with ``method="raw"`` (heads averaged or one head, the ``prefix`` columns dropped, the chosen layers
    averaged), without a second pass over the decoder. ``model``: anything with the model's ``cfg`` (an ONNX
    export's `OnnxModel` too). The sequences are computed together, as one (sum of T, L, H, N) tensor."""
    config = config or MapConfig()
    if config.method != "raw":
        raise ValueError(f"generated_raw_maps makes raw maps, not {config.method}")
    check_map_config(model, config)
    if not attentions:
        return []
    chosen = chosen_layers(model, config.layers)
    attn = torch.cat(list(attentions))  # (sum T, L, H, N)
    parts = (attn.mean(2) if config.head is None else attn[:, :, config.head]).transpose(0, 1)  # (L, sum T, N)
    if prefix:
        parts = patches_only(parts, prefix, "raw")
    maps = combine_layers(parts, "raw", chosen).float().reshape(-1, *grid)  # (sum T, h, w)
    return list(maps.split([len(a) for a in attentions]))


def patches_only(parts: Tensor, prefix: int, method: str) -> Tensor:
    """(L, Q, P + N) -> (L, Q, N): an encoder's prefix (class) token columns removed, and each layer's raw or
    rollout row renormalised over the patches (a chefer relevancy is no distribution: its columns are only dropped).
    An imported captioner's decoder attends to its ViT's class token too (`vlm.hub`)."""
    patches = parts[..., prefix:]
    if method == "chefer":
        return patches
    return patches / patches.sum(-1, keepdim=True).clamp_min(1e-12)


def check_map_config(model: VisionLanguageModel, config: MapConfig) -> None:
    """ValueError naming the first map option out of range for the model (method, head, layers), before any image
    is read. ``model``: anything with the model's ``cfg`` (an ONNX export's `OnnxModel` too)."""
    config.validate()
    heads = model.cfg.decoder.num_heads
    if config.head is not None and not -heads <= config.head < heads:
        raise ValueError(f"attention head {config.head} out of range: the decoder has {heads} heads")
    chosen_layers(model, config.layers)


def chosen_layers(model: VisionLanguageModel, layers: Sequence[int] | None) -> list[int]:
    """The decoder layers whose cross-attention makes a map: ``layers``, else the model's ``attention_layers``,
    else all."""
    depth = model.cfg.decoder.depth  # from the config alone: an ONNX export on ONNX Runtime has it too
    return check_layers(layers or model.cfg.attention_layers or range(depth), depth)


def _attention_parts(model: VisionLanguageModel, image_kv: list[KeysValues], ids: Tensor,
                     queries: Sequence[Sequence[int]], method: str, head: int | None) -> list[Tensor]:
    """Each layer's part (L, len(queries[s]), N) of the raw or rollout maps of each sequence s."""
    with torch.no_grad():
        out = model.decoder(ids, image_kv, need_weights=True, need_self_weights=method == "rollout")
    cross = [w.mean(1) if head is None else w[:, head] for w in out.cross_attentions]  # L x (S, T, N)
    parts = torch.stack(cross if method == "raw" else _rollout(out.self_attentions, cross))  # (L, S, T, N)
    if method == "rollout" and model.encoder.context:
        with torch.no_grad():
            _, context_w = model.encode_patches(image_kv.patches, need_weights=True)
        carry = torch.eye(parts.shape[-1], device=parts.device).expand(parts.shape[1], -1, -1)  # (S, N, N)
        for w in context_w:  # output tokens <- input tokens, the first block applied last
            carry = _with_residual(w) @ carry
        parts = parts @ carry  # (L, S, T, N) over the patches
    return [parts[:, s, list(q)] for s, q in enumerate(queries)]


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


def _chefer(model: VisionLanguageModel, image_kv: list[KeysValues], ids: Tensor, queries: Sequence[Sequence[int]],
            ) -> list[Tensor]:
    positions = sorted({q for qs in queries for q in qs})
    S, T = ids.shape
    with torch.enable_grad():
        context_w = []
        if model.encoder.context:  # recomputed in the graph: the logits' gradients reach the blocks' attention
            image_kv, context_w = model.encode_patches(image_kv.patches, need_weights=True)
        out = model.decoder(ids, image_kv, need_weights=True, need_self_weights=True)
        logits, self_w, cross_w = out.logits, out.self_attentions, out.cross_attentions
        N = cross_w[0].shape[-1]
        L = len(cross_w)
        if not positions:
            return [logits.new_zeros(L, 0, N).detach() for _ in queries]
        at = torch.tensor(positions, device=ids.device)
        targets = logits[:, at].gather(-1, ids[:, at + 1, None])[..., 0]  # (S, P): each position's next-token logit
        # One batched backward pass: row p of grad_outputs asks for the gradient of position p's logit (of every
        # sequence at once: sequences are independent).
        P = len(positions)
        grad_outputs = torch.eye(P, device=ids.device, dtype=targets.dtype)[:, None, :].expand(P, S, P)
        grads = torch.autograd.grad(targets, self_w + cross_w + context_w, grad_outputs=grad_outputs,
                                    is_grads_batched=True)
    r_ii = torch.eye(N, device=ids.device).expand(P, S, N, N)  # patch-side relevancy through the context blocks
    for grad, w in zip(grads[2 * L:], context_w, strict=True):
        r_ii = r_ii + (grad * w.detach()).clamp_min(0).mean(2) @ r_ii
    rbar_ii = _normalise_residual(r_ii) if context_w else None
    r_tt = torch.eye(T, device=ids.device).expand(P, S, T, T)
    r_ti = logits.new_zeros(L, P, S, T, N)  # each layer's part of R_ti, kept apart
    for layer in range(L):
        a_self = (grads[layer] * self_w[layer].detach()).clamp_min(0).mean(2)  # (P, S, T, T)
        r_ti = r_ti + a_self @ r_ti
        r_tt = r_tt + a_self @ r_tt
        a_cross = (grads[L + layer] * cross_w[layer].detach()).clamp_min(0).mean(2)  # (P, S, T, N)
        if rbar_ii is not None:
            a_cross = a_cross @ rbar_ii
        r_ti[layer] = r_ti[layer] + _normalise_residual(r_tt) @ a_cross
    index = {q: p for p, q in enumerate(positions)}
    maps = [torch.stack([r_ti[:, index[q], s, q] for q in qs], 1) if qs else r_ti.new_zeros(L, 0, N)
            for s, qs in enumerate(queries)]
    return [m.detach() for m in maps]
