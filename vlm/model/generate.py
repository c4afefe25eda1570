"""Batched greedy and beam-search generation with a KV cache.

Each image is encoded, and its cross-attention keys/values projected, once. Prompts of different lengths
are left-padded; padded positions are masked out and position ids count real tokens only, so a batch
gives the same tokens as one image at a time. On request, the cross-attention of every generated token
(of the beam that was kept) is returned.

Dimensions: B images, K beams, R = B * K rows, P prompt length, T generated, L layers, H heads,
N patches, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vlm.model.vlm import VisionLanguageModel


@dataclass
class Generation:
    tokens: list[list[int]]
    """Generated token ids per image, without the end token."""
    scores: list[float]
    """Sum of token log-probabilities of each kept sequence (the end token included)."""
    grid: tuple[int, int]
    """(h, w) patch grid of the cross-attention maps."""
    attentions: list[Tensor] | None = None
    """Per image (T, L, H, N): each generated token's cross-attention in every layer and head."""


def _self_mask(key_valid: Tensor, start: int, end: int) -> Tensor | None:
    """Boolean (R, 1, end - start, end) mask for queries at [start, end) over keys [0, end).

    A query sees earlier real tokens and itself; None when nothing is padded (plain causal attention).
    """
    valid = key_valid[:, :end]
    if bool(valid.all()):
        return None
    q = torch.arange(start, end, device=valid.device)[:, None]  # (Tq, 1)
    k = torch.arange(end, device=valid.device)[None, :]  # (1, end)
    mask = (k <= q)[None] & (valid[:, None, :] | (k == q)[None])  # (R, Tq, end)
    return mask[:, None]


@torch.no_grad()
def generate(
    model: VisionLanguageModel,
    images: Tensor,
    prompts: list[list[int]],
    *,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int = 30,
    beam_size: int = 1,
    length_penalty: float = 0.0,
    use_cache: bool = True,
    return_attention: bool = False,
) -> Generation:
    """Continue each image's prompt until the end token (greedy when beam_size is 1).

    Beam hypotheses are ranked at the end by score / length ** length_penalty.
    """
    B, K = images.shape[0], beam_size
    if len(prompts) != B:
        raise ValueError(f"{len(prompts)} prompts for {B} images")
    device = images.device
    image_kv, grid = model.encode(images)  # per layer (B, H, N, hd), once per image, shared by its K beams
    R = B * K
    P = max(len(p) for p in prompts)
    T = min(max_new_tokens, model.cfg.decoder.max_length - P)
    if T < 1:
        raise ValueError(f"prompt of {P} tokens leaves no room in max_length {model.cfg.decoder.max_length}")

    seq = torch.full((B, P + T), pad_id, dtype=torch.long, device=device)  # prompt then generated
    key_valid = torch.ones(B, P + T, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        seq[i, P - len(p):P] = torch.tensor(p, dtype=torch.long, device=device)
        key_valid[i, :P - len(p)] = False
    seq, key_valid = seq.repeat_interleave(K, 0), key_valid.repeat_interleave(K, 0)  # (R, P + T)
    positions = (key_valid.cumsum(1) - 1).clamp(min=0)  # (R, P + T): left padding does not shift tokens

    scores = torch.zeros(R, device=device)
    if K > 1:
        scores.view(B, K)[:, 1:] = float("-inf")  # all beams start identical: expand only the first
    finished = torch.zeros(R, dtype=torch.bool, device=device)
    lengths = torch.zeros(R, dtype=torch.long, device=device)
    attn = None
    cache = model.decoder.new_cache(R, like=image_kv[0][0]) if use_cache else None

    for t in range(T):
        end = P + t
        start = cache.length if cache is not None else 0  # uncached: rerun the whole sequence
        logits, weights = model.decoder(
            seq[:, start:end], image_kv, positions=positions[:, start:end],
            self_mask=_self_mask(key_valid, start, end), cache=cache, need_weights=return_attention,
        )
        logp = logits[:, -1].float().log_softmax(-1)  # (R, V)
        # A finished row can only continue with padding, at no cost, so it keeps its score.
        logp[finished] = float("-inf")
        logp[finished, pad_id] = 0.0
        if K == 1:
            token_logp, token = logp.max(-1)  # (R,)
            parent = torch.arange(R, device=device)
            scores = scores + token_logp
        else:
            V = logp.shape[-1]
            candidates = (scores[:, None] + logp).view(B, K * V)  # (B, K * V)
            scores, flat = candidates.topk(K, dim=-1)  # (B, K)
            parent = (flat // V + torch.arange(B, device=device)[:, None] * K).view(R)
            token, scores = (flat % V).view(R), scores.view(R)
            seq, finished, lengths = seq[parent], finished[parent], lengths[parent]
            if cache is not None:
                cache.reorder(parent)
        if return_attention:
            step = torch.stack([w[:, :, -1] for w in weights], dim=1)[parent]  # (R, L, H, N)
            if attn is None:
                attn = step.new_zeros((R, T) + step.shape[1:])  # (R, T, L, H, N)
            elif K > 1:
                attn = attn[parent]  # each kept beam takes its parent's history
            attn[:, t] = step
        seq[:, end] = token
        lengths = lengths + (~finished).long()
        finished = finished | (token == eos_id)
        if bool(finished.all()):
            break

    final = scores / lengths.clamp(min=1).float() ** length_penalty
    best = final.view(B, K).argmax(-1) + torch.arange(B, device=device) * K  # (B,) row of each kept beam
    tokens, kept_scores, attentions = [], [], []
    for row in best.tolist():
        n = int(lengths[row]) - int(finished[row])  # drop the end token
        tokens.append(seq[row, P:P + n].tolist())
        kept_scores.append(float(scores[row]))
        if attn is not None:
            attentions.append(attn[row, :n])
    return Generation(tokens=tokens, scores=kept_scores, grid=grid,
                      attentions=attentions if return_attention else None)
