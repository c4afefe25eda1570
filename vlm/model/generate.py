"""The one decoding loop, batched with a KV cache: greedy, sampling (temperature, top-k, top-p) and beam search.

`decode` is the loop; it calls a `DecoderBackend`'s step for each position's logits: `TorchDecoder` (the model's
decoder with its preallocated cache; `generate` is decode with it) or the ONNX Runtime backend of
`vlm.deploy.runtime`. Everything else (scores, beams, filters, the maps' bookkeeping) is shared.

Its options are a `vlm.config.DecodingConfig`. The caller encodes each image once (``model.encode``, or
``model.encode_features`` from a feature cache) and passes every layer's cross-attention keys/values, which
the image's beams or samples share. Prompts of different lengths are left-padded; padded positions are masked
out and position ids count real tokens only, so a batch gives the same tokens as one image at a time. An image
whose rows have all ended leaves the later steps (``retire``), which then run only the rows still going.
Sampling draws each image's noise from its own seeded generator, so a sampled caption depends on its image,
prompt and seed, not on the rest of the batch; k samples of an image all come from its generator. On
request, the cross-attention of every generated token (of the beam that was kept) is returned: each step
keeps its cross-attention inputs, and the weights are computed from them once decoding ends, so the tokens
are exactly those of generation without maps.

Dimensions: B images, K beams or samples per image, R = B * K rows, P prompt length, T generated, L layers,
H heads, N patches, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from vlm.config import DecodingConfig
from vlm.model.decoder import KeysValues, KVCache
from vlm.model.vlm import VisionLanguageModel


@dataclass
class Generation:
    tokens: list[list[int]]
    """Generated token ids of each sequence (one per image, or num_samples per image, image after image),
    without the end token."""
    scores: list[float]
    """Sum of the model's token log-probabilities of each kept sequence (the end token included)."""
    ended: list[bool]
    """Whether each sequence stopped at the end token (False: it reached max_new_tokens or max_length)."""
    attentions: list[Tensor] | None = None
    """Per sequence (T, L, H, N): each generated token's cross-attention in every layer and head."""
    token_logprobs: list[list[float]] | None = None
    """Per sequence, each generated token's log-probability (aligned with ``tokens``: the end token's is in
    ``scores`` only), from the distribution the token was chosen from (after no-repeat and min-length masks)."""

    @staticmethod
    def join(parts: Sequence[Generation]) -> Generation:
        """The sequences of several generations, one after another (the lanes of one call, in image order)."""
        def joined(field: str) -> list | None:
            lists = [getattr(part, field) for part in parts]
            return None if lists[0] is None else [x for one in lists for x in one]

        return Generation(tokens=joined("tokens"), scores=joined("scores"), ended=joined("ended"),
                          attentions=joined("attentions"), token_logprobs=joined("token_logprobs"))


def _self_mask(key_valid: Tensor, start: int, end: int) -> Tensor:
    """Boolean (R, 1, end - start, end) mask for queries at [start, end) over keys [0, end).

    A query sees earlier real tokens and itself.
    """
    valid = key_valid[:, :end]
    q = torch.arange(start, end, device=valid.device)[:, None]  # (Tq, 1)
    k = torch.arange(end, device=valid.device)[None, :]  # (1, end)
    mask = (k <= q)[None] & (valid[:, None, :] | (k == q)[None])  # (R, Tq, end)
    return mask[:, None]


def _repeated_ngrams(generated: Tensor, n: int, vocab: int) -> Tensor:
    """(R, V) True for each token that would repeat an n-gram already in the generated tokens (R, t)."""
    R, t = generated.shape
    banned = torch.zeros(R, vocab, device=generated.device)
    if t < n:
        return banned.bool()
    windows = generated.unfold(1, n, 1)  # (R, t - n + 1, n): every n-gram so far
    prefix = generated[:, t - n + 1:]  # (R, n - 1): the n-gram the next token would complete
    match = (windows[:, :, :-1] == prefix[:, None]).all(-1)  # (R, t - n + 1)
    # amax, not a plain scatter: the same last token may end both a matching and a non-matching n-gram.
    return banned.scatter_reduce_(1, windows[:, :, -1], match.float(), "amax").bool()


def _tempered(logp: Tensor, temperature: float) -> Tensor:
    """Log-probabilities (R, V) divided by the temperature, less each row's largest (the same distribution).

    Shifted first, and the most likely token's kept at 0 at any temperature: a tiny temperature (1e-39) would
    otherwise send every token's to -inf (or 0 / 0 = NaN below float32's least), giving an empty text where it
    should tend to greedy.
    """
    top = logp.amax(-1, keepdim=True).clamp(min=torch.finfo(logp.dtype).min)  # finite: a row all -inf stays so
    shifted = logp - top
    return torch.where(shifted == 0, shifted, shifted / temperature)


def _filter(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Logits (R, V) with tokens outside the top k, or outside the smallest set of mass top_p, set to -inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (R, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (R, V)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs >= top_p  # the mass before a token already reaches top_p
        logits = logits.masked_fill(outside.scatter(1, order, outside), float("-inf"))
    return logits


def _generators(seed: int | Sequence[int] | None, B: int, device: torch.device) -> list[torch.Generator]:
    """One generator per image: seed + i for image i, or the given per-image seeds, or random seeds."""
    if seed is None:
        seeds = torch.randint(2**62, (B,)).tolist()
    elif isinstance(seed, int):
        seeds = [seed + i for i in range(B)]
    else:
        seeds = list(seed)
        if len(seeds) != B:
            raise ValueError(f"{len(seeds)} seeds for {B} images")
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


class DecoderBackend(Protocol):
    """What the decoding loop needs of a decoder: one step over new tokens with its own self-attention cache.

    `TorchDecoder` runs the model's `TextDecoder` with its preallocated `KVCache`; `vlm.deploy.runtime` runs an
    exported ONNX decoder step on ONNX Runtime, its cache passed in and out. Tensors cross as torch tensors on
    ``device``.
    """

    num_images: int
    """B: images whose cross-attention keys/values the backend holds; row r reads image r // (R // B)."""
    vocab_size: int
    max_length: int
    device: torch.device

    def start(self, rows: int, length: int, maps: bool) -> None:
        """An empty cache for R rows of at most length tokens; maps: each step also returns its map material."""

    @property
    def cached(self) -> int:
        """Positions already in the cache (0 without one: every step reads the whole sequence again)."""

    def step(self, ids: Tensor, positions: Tensor, self_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Ids (R, t) continuing the cache, their positions (R, t) and mask (R, 1, t, cached + t) (None: no
        padding) -> the last position's logits (R, V) as float, and (when started with maps) what its maps are made
        of, (R, ...)."""

    def reorder(self, parent: Tensor) -> None:
        """Beam search: row r of the cache becomes row parent[r]."""

    def keep(self, rows: Tensor) -> None:
        """Hold only these rows (whole images, K rows each, in order) and their images from now on: the loop retires
        the images whose every row has ended, so later steps run only the rest."""

    def attention(self, material: Tensor, images: Tensor) -> Tensor:
        """(S, T, ...) map material of kept sequences reading images (S,) (of all B, whatever `keep` retired) ->
        cross-attention (S, T, L, H, N)."""


class TorchDecoder:
    """The torch backend: the model's decoder with a preallocated `KVCache` (or none: uncached, for tests).

    A step keeps the cross-attention inputs of its last position; the weights are computed from them once
    decoding ends, for the kept sequences only, so no step pays for the explicit attention path.
    """

    def __init__(self, model: VisionLanguageModel, image_kv: list[KeysValues], use_cache: bool = True):
        self.model, self.image_kv, self.use_cache = model, image_kv, use_cache
        self.all_image_kv = image_kv  # the maps read every image's keys, retired or not
        self.num_images = image_kv[0][0].shape[0]
        self.vocab_size, self.max_length = model.vocab_size, model.cfg.decoder.max_length
        self.device = image_kv[0][0].device
        self.cache: KVCache | None = None
        self.maps, self.rows = False, 0

    def start(self, rows: int, length: int, maps: bool) -> None:
        self.maps, self.rows = maps, rows
        if self.use_cache:
            self.cache = self.model.decoder.new_cache(rows, like=self.image_kv[0][0], length=length)

    @property
    def cached(self) -> int:
        return self.cache.length if self.cache is not None else 0

    def step(self, ids: Tensor, positions: Tensor, self_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        out = self.model.decoder(ids, self.image_kv, positions=positions, self_mask=self_mask, cache=self.cache,
                                 need_cross_inputs=self.maps)
        inputs = torch.stack([h[:, -1] for h in out.cross_inputs], dim=1) if self.maps else None  # (R, L, D)
        return out.logits[:, -1].float(), inputs

    def reorder(self, parent: Tensor) -> None:
        if self.cache is not None:
            self.cache.reorder(parent)

    def keep(self, rows: Tensor) -> None:
        K = self.rows // self.num_images
        images = rows[::K] // K
        if self.cache is not None:
            self.cache.keep(rows)
        self.image_kv = [(k[images], v[images]) for k, v in self.image_kv]
        self.num_images, self.rows = len(images), len(rows)

    def attention(self, material: Tensor, images: Tensor) -> Tensor:
        B = self.all_image_kv[0][0].shape[0]
        in_order = images.equal(torch.arange(B, device=images.device))  # one sequence per image
        keys = [k if in_order else k[images] for k, _ in self.all_image_kv]  # per layer (S, H, N, hd)
        weights = self.model.decoder.cross_attention_weights(list(material.unbind(2)), keys)  # L x (S, H, T, N)
        return torch.stack(weights, dim=1).permute(0, 3, 1, 2, 4).contiguous()  # (S, T, L, H, N)


@torch.no_grad()
def generate(
    model: VisionLanguageModel,
    image_kv: list[KeysValues],
    prompts: list[list[int]],
    *,
    eos_id: int,
    pad_id: int,
    config: DecodingConfig | None = None,
    use_cache: bool = True,
    return_attention: bool = False,
) -> Generation:
    """Continue each image's prompt until the end token with the torch model: `decode` with a `TorchDecoder`.

    image_kv: every decoder layer's cross-attention keys/values of B images (`VisionLanguageModel.encode`, or
    ``encode_features`` from a feature cache), computed once by the caller and shared by the image's beams or
    samples.
    """
    return decode(TorchDecoder(model, image_kv, use_cache), prompts, eos_id=eos_id, pad_id=pad_id, config=config,
                  return_attention=return_attention)


@torch.no_grad()
def decode(
    backend: DecoderBackend,
    prompts: list[list[int]],
    *,
    eos_id: int,
    pad_id: int,
    config: DecodingConfig | None = None,
    return_attention: bool = False,
    pad_to: int = 0,
    retire: bool = True,
) -> Generation:
    """The one decoding loop: continue each image's prompt until the end token, greedy, sampled, or by beam search
    (``config``), calling the backend's step (torch or ONNX Runtime) for the next-token logits.

    With ``config.num_samples`` k, each image gets k sampled sequences, image after image, all drawn from the
    image's own seeded generator. Beam hypotheses are ranked at the end by score / length ** length_penalty.
    Prompts are left-padded to the longest, or to ``pad_to`` tokens if more: a part of a call's images decoded on
    its own (a lane) keeps the whole call's padding and token budget.

    With ``retire``, an image whose every row (beam or sample) has ended leaves the backend (`DecoderBackend.keep`)
    once a quarter of the images it holds have (at least one): later steps run only the rows still going, as a
    step's cost grows with its rows. The bookkeeping keeps every row, a retired one continuing with free padding as
    an ended row does without retiring, so the sequences are the same either way (within the products' rounding,
    which depends on a product's rows, as between batch compositions).
    """
    config = config or DecodingConfig()
    config.validate()
    B = backend.num_images
    K = config.beam_size if config.beam_size > 1 else config.num_samples  # rows per image
    if len(prompts) != B:
        raise ValueError(f"{len(prompts)} prompts for {B} images")
    device = backend.device
    R = B * K
    P = max([pad_to, *map(len, prompts)])
    T = min(config.token_budget(), backend.max_length - P)
    if T < 1:
        raise ValueError(f"prompt of {P} tokens leaves no room in max_length {backend.max_length}")
    sample, beam = config.sample, config.beam_size > 1
    generators = _generators(config.seed, B, device) if sample else []

    seq = torch.full((B, P + T), pad_id, dtype=torch.long, device=device)  # prompt then generated
    key_valid = torch.ones(B, P + T, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        seq[i, P - len(p):P] = torch.tensor(p, dtype=torch.long, device=device)
        key_valid[i, :P - len(p)] = False
    seq, key_valid = seq.repeat_interleave(K, 0), key_valid.repeat_interleave(K, 0)  # (R, P + T)
    positions = (key_valid.cumsum(1) - 1).clamp(min=0)  # (R, P + T): left padding does not shift tokens
    padded = not bool(key_valid.all())

    scores = torch.zeros(R, device=device)
    if beam:
        scores.view(B, K)[:, 1:] = float("-inf")  # all beams start identical: expand only the first
    finished = torch.zeros(R, dtype=torch.bool, device=device)
    lengths = torch.zeros(R, dtype=torch.long, device=device)
    step_logp = torch.zeros(R, T, device=device)  # each row's tokens' log-probabilities
    image_offset = torch.arange(B, device=device)[:, None] * K  # (B, 1) first row of each image
    V = backend.vocab_size
    only_pad = torch.full((V,), float("-inf"), device=device)  # a finished row's next-token log-probabilities:
    only_pad[pad_id] = 0.0  # padding at no cost, so it keeps its score
    materials, parents = [], []  # per step: (R, ...) map material before reordering, (R,) parents
    any_finished = False
    backend.start(R, P + T, return_attention)
    held = None  # the rows the backend holds, in its order (None: all R)
    place = None  # (R,) each held row's place in the backend, -1 for a retired one
    seen_ended = 0  # ended rows when images were last looked at for retiring

    for t in range(T):
        end = P + t
        start = backend.cached  # uncached: rerun the whole sequence
        rows = slice(None) if held is None else held
        logits, material = backend.step(seq[rows, start:end], positions[rows, start:end],
                                        _self_mask(key_valid[rows], start, end) if padded else None)  # (R held, V)
        logp = logits.log_softmax(-1)  # (R held, V)
        if held is not None:  # every row again, a retired one's log-probabilities replaced below as an ended row's
            logp = logp.new_zeros(R, V).index_copy_(0, held, logp)
            if material is not None:
                material = material.new_zeros(R, *material.shape[1:]).index_copy_(0, held, material)
        if config.no_repeat_ngram_size:
            logp = logp.masked_fill(_repeated_ngrams(seq[:, P:end], config.no_repeat_ngram_size, V), float("-inf"))
        if t < config.min_new_tokens:
            logp[:, eos_id] = float("-inf")
        if any_finished:  # a finished row continues with free padding
            logp = torch.where(finished[:, None], only_pad, logp)
        if not beam:
            if sample:
                # Gumbel-max: argmax(log p / temperature + Gumbel noise) is a draw from the filtered distribution.
                sampling = _filter(_tempered(logp, config.temperature), config.top_k, config.top_p)
                noise = torch.cat([torch.rand(K, V, generator=g, device=device) for g in generators])  # (R, V)
                token = (sampling - (-noise.log()).log()).argmax(-1)  # (R,)
                token_logp = logp.gather(1, token[:, None])[:, 0]
            else:
                token_logp, token = logp.max(-1)  # (R,)
            parent = None
            scores = scores + token_logp
        else:
            candidates = (scores[:, None] + logp).view(B, K * V)  # (B, K * V)
            scores, flat = candidates.topk(K, dim=-1)  # (B, K)
            parent = (flat // V + image_offset).view(R)
            token, scores = (flat % V).view(R), scores.view(R)
            token_logp = logp.view(B, K * V).gather(1, flat).view(R)
            seq, finished, lengths, step_logp = seq[parent], finished[parent], lengths[parent], step_logp[parent]
            backend.reorder(parent if held is None else place[parent[held]])  # an image's rows are held together
        if return_attention:
            materials.append(material)
            parents.append(parent)
        seq[:, end] = token
        step_logp[:, t] = token_logp
        lengths = lengths + (~finished).long()
        finished = finished | (token == eos_id)
        ended = int(finished.sum())
        if ended == R:
            break
        any_finished = ended > 0
        if retire and ended > seen_ended:
            seen_ended = ended
            going = ~finished.view(B, K).all(1)  # (B,) images with a row still going
            holding = B if held is None else len(held) // K
            if holding - int(going.sum()) >= max(1, holding // 4):
                kept = (going.nonzero()[:, 0, None] * K + torch.arange(K, device=device)).view(-1)  # rows, in order
                backend.keep(kept if held is None else place[kept])
                held = kept
                place = torch.full((R,), -1, dtype=torch.long, device=device)
                place[held] = torch.arange(len(held), device=device)

    if beam:
        final = scores / lengths.clamp(min=1).float() ** config.length_penalty
        kept = final.view(B, K).argmax(-1) + image_offset[:, 0]  # (B,) row of each kept beam
    else:
        kept = torch.arange(R, device=device)  # every greedy or sampled row
    attn = backend.attention(_kept(materials, parents, kept), kept // K) if return_attention else None
    tokens, kept_scores, ended, attentions, logprobs = [], [], [], [], []
    for i, row in enumerate(kept.tolist()):
        n = int(lengths[row]) - int(finished[row])  # drop the end token
        tokens.append(seq[row, P:P + n].tolist())
        logprobs.append(step_logp[row, :n].tolist())
        kept_scores.append(float(scores[row]))
        ended.append(bool(finished[row]))
        if attn is not None:
            attentions.append(attn[i, :n])
    return Generation(tokens=tokens, scores=kept_scores, ended=ended,
                      attentions=attentions if return_attention else None, token_logprobs=logprobs)


def _kept(materials: list[Tensor], parents: list[Tensor | None], rows: Tensor) -> Tensor:
    """(S, T, ...): each step's map material of the kept sequences, rows (S,) at the end.

    Step t's token of row r was predicted by row parents[t][r] (r itself without beams), whose material
    materials[t] holds; following the parents backwards gives every earlier token's row.
    """
    out = []
    for material, parent in zip(reversed(materials), reversed(parents), strict=True):
        if parent is not None:
            rows = parent[rows]
        out.append(material[rows])  # (S, ...)
    return torch.stack(out[::-1], dim=1)
