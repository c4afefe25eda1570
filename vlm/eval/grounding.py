"""Grounding scores of a model's token maps against true boxes, and a faithfulness check by deleting patches.

A *case* is an image, the regions (phrase, box) to find in it, and optionally a caption that names the phrases
(the built-in scenes' first reference caption does). With a caption, it is fed through the decoder and each
phrase's map is the mean of its tokens' maps inside it; without one, each phrase is fed alone after the caption
prompt (as `vlm ground` does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vlm.api import Captioner
from vlm.config import MapConfig
from vlm.data.boxes import PixelBox
from vlm.data.images import ImageLike, load_image
from vlm.errors import VLMError
from vlm.grounding.maps import box_from_map, combine, iou, pixel_mass_in_box, pointing_hit
from vlm.grounding.methods import chosen_layers, combine_layers

DELETION_FRACTIONS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)


@dataclass
class GroundingCase:
    image: ImageLike
    regions: list[tuple[str, PixelBox]]
    """(phrase, its box)."""
    text: str | None = None


@dataclass
class _Phrase:
    case: int
    image: object
    size: tuple[int, int]
    text: str
    span: tuple[int, int]  # the phrase's token positions in the text
    box: PixelBox


def _phrases(captioner: Captioner, cases: Sequence[GroundingCase]) -> list[_Phrase]:
    tok = captioner.tokenizer
    out = []
    for n, case in enumerate(cases):
        image = load_image(case.image)
        for phrase, box in case.regions:
            text = case.text if case.text is not None else phrase
            spans = tok.phrase_tokens(text, phrase) if phrase.strip() else []  # by characters: BPE alike
            if not spans:
                raise VLMError(f"phrase {phrase!r} is not in the text {text!r}")
            out.append(_Phrase(n, image, image.size, text, (spans[0][0], spans[0][-1] + 1), box))
    return out


def _phrase_layer_maps(captioner: Captioner, phrases: Sequence[_Phrase], maps: MapConfig) -> list[np.ndarray]:
    """Each phrase's tokens' per-layer parts (L, len(phrase), h, w); each (case, text) is decoded once."""
    keys = list(dict.fromkeys((p.case, p.text) for p in phrases))
    first = {key: next(p for p in phrases if (p.case, p.text) == key) for key in keys}
    parts = captioner.text_maps([first[k].image for k in keys], [k[1] for k in keys], maps, per_layer=True)
    by_key = dict(zip(keys, parts, strict=True))
    return [by_key[(p.case, p.text)][:, p.span[0]:p.span[1]] for p in phrases]


def _combine(parts: np.ndarray, method: str, layers: Sequence[int]) -> np.ndarray:
    """(L, n, h, w) parts of a phrase's n tokens -> the phrase's (h, w) map: layers combined, tokens averaged."""
    L, n, h, w = parts.shape
    tokens = combine_layers(torch.from_numpy(parts).reshape(L, n, h * w), method, layers)  # (n, N)
    return combine(tokens.numpy().reshape(n, h, w))


def _layers(captioner: Captioner, layers: Sequence[int] | None) -> list[int]:
    try:
        return chosen_layers(captioner.model, layers)
    except ValueError as e:
        raise VLMError(str(e)) from None


def phrase_maps(captioner: Captioner, cases: Sequence[GroundingCase], maps: MapConfig | None = None,
                ) -> list[np.ndarray]:
    """The (h, w) map of each region's phrase, in order: its tokens' maps, made as ``maps`` says, averaged."""
    maps = maps or MapConfig()
    phrases = _phrases(captioner, cases)
    chosen = _layers(captioner, maps.layers)
    return [_combine(parts, maps.method, chosen) for parts in _phrase_layer_maps(captioner, phrases, maps)]


def grounding_scores(captioner: Captioner, cases: Sequence[GroundingCase], maps: MapConfig | None = None,
                     box_fraction: float = 0.5) -> dict[str, float]:
    """Pointing game (the map's peak inside the box), share of map mass inside the box, and IoU of the map's box
    (`box_from_map` at ``box_fraction`` of the peak) with the true box, averaged over all phrases."""
    phrases = _phrases(captioner, cases)
    if not phrases:
        raise VLMError("no regions to ground")
    found = phrase_maps(captioner, cases, maps)
    hits = [pointing_hit(m, p.box, p.size) for p, m in zip(phrases, found, strict=True)]
    masses = [pixel_mass_in_box(m, p.box, p.size) for p, m in zip(phrases, found, strict=True)]
    ious = np.array([iou(box_from_map(m, p.size, box_fraction), p.box) for p, m in zip(phrases, found, strict=True)])
    return {"pointing_game": float(np.mean(hits)), "mass_in_box": float(np.mean(masses)), "iou": float(ious.mean()),
            "iou>=0.5": float(np.mean(ious >= 0.5)), "phrases": len(phrases)}


def pointing_by_choice(captioner: Captioner, cases: Sequence[GroundingCase], choices: Sequence[MapConfig],
                       upsampled: bool = True) -> list[float]:
    """Pointing-game accuracy of each choice of how the maps are made, decoding every text once per (method, head)
    (layers are combined from per-layer parts, `vlm.grounding.methods.token_maps`); ``upsampled=False`` takes the
    peak at the centre of the argmax grid cell."""
    phrases = _phrases(captioner, cases)
    if not phrases:
        raise VLMError("no regions to ground")
    layers = [_layers(captioner, c.layers) for c in choices]
    parts = {(c.method, c.head): _phrase_layer_maps(captioner, phrases, c)
             for c in {(c.method, c.head): c for c in choices}.values()}
    return [float(np.mean([pointing_hit(_combine(part, c.method, chosen), p.box, p.size, upsampled)
                           for p, part in zip(phrases, parts[(c.method, c.head)], strict=True)]))
            for c, chosen in zip(choices, layers, strict=True)]


def deletion_curves(captioner: Captioner, cases: Sequence[GroundingCase], maps: MapConfig | None = None,
                    fractions: Sequence[float] = DELETION_FRACTIONS, seed: int = 0,
                    batch_size: int = 64) -> dict[str, object]:
    """Faithfulness: the phrase's probability as its most-attended patches are deleted first, against random order.

    Deleting a patch removes its key and value from every cross-attention layer, so the decoder cannot read it.
    The probability is the mean over the phrase's tokens of p(token | text before it). Returns both mean curves
    (one value per fraction deleted) and their areas (the mean over fractions): a faithful map gives the smaller
    "area_attention" than "area_random".
    """
    phrases = _phrases(captioner, cases)
    found = phrase_maps(captioner, cases, maps)
    rng = np.random.default_rng(seed)
    curves = {"attention": [], "random": []}
    for start in range(0, len(phrases), batch_size):
        chunk = phrases[start:start + batch_size]
        orders = {"attention": [np.argsort(-found[start + i].ravel(), kind="stable") for i in range(len(chunk))],
                  "random": [rng.permutation(found[start + i].size) for i in range(len(chunk))]}
        for name, order in orders.items():
            curves[name].append(_deletion_probs(captioner, chunk, np.stack(order), fractions))
    result = {name: np.concatenate(c).mean(0) for name, c in curves.items()}  # (fractions,)
    return {"fractions": list(fractions), "curve_attention": result["attention"].tolist(),
            "curve_random": result["random"].tolist(), "area_attention": float(result["attention"].mean()),
            "area_random": float(result["random"].mean()), "phrases": len(phrases)}


def _deletion_probs(captioner: Captioner, phrases: Sequence[_Phrase], order: np.ndarray,
                    fractions: Sequence[float]) -> np.ndarray:
    """(len(phrases), len(fractions)) mean phrase-token probability with the first patches of order deleted."""
    tok, model = captioner.tokenizer, captioner.model
    seqs = [[*tok.caption_prompt(), *tok.encode(p.text)] for p in phrases]
    ids = torch.full((len(seqs), max(map(len, seqs))), tok.pad_id, dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, :len(seq)] = torch.tensor(seq)
    ids = ids.to(captioner.device)
    prompt = len(tok.caption_prompt())
    pixels = torch.stack([captioner.transform(p.image) for p in phrases]).to(captioner.device)
    out = np.zeros((len(phrases), len(fractions)))
    with torch.no_grad():
        image_kv, grid = model.encode(pixels)
        prefix = getattr(model.encoder, "num_prefix", 0)  # class tokens lead the keys: never deleted, no patch
        N = image_kv[0][0].shape[2] - prefix  # patches, as the maps (and order) number them
        for j, fraction in enumerate(fractions):
            left = np.sort(order[:, round(fraction * N):], axis=1) + prefix  # (S, N - k) patches left
            keep = np.concatenate([np.broadcast_to(np.arange(prefix), (len(left), prefix)), left], axis=1)
            index = torch.as_tensor(keep, device=ids.device)[:, None, :, None]  # (S, 1, P + N - k, 1)
            kv = [tuple(t.gather(2, index.expand(-1, t.shape[1], -1, t.shape[3])) for t in pair)
                  for pair in image_kv]
            probs = model.decode(kv, grid, ids).logits.softmax(-1)  # (S, T, V)
            for row, p in enumerate(phrases):
                positions = torch.arange(p.span[0], p.span[1], device=ids.device) + prompt
                out[row, j] = probs[row, positions - 1, ids[row, positions]].mean().item()
    return out
