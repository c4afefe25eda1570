"""The compact evidence `vlm predict --maps` writes: each token's top patches, and a box per phrase.

A token's map (h, w) is the one `vlm attend` makes (`vlm.grounding.methods.token_maps` with the same
`vlm.config.MapConfig`); it is summarised as its ``k`` largest patches, ``[index, weight]`` with ``index = row * w +
col`` on the patch grid, largest first (ties: the lower index first).

Phrases are those the input gives (JSONL ``"phrases"``), found in the caption as whole words, case-insensitively
(the first occurrence; a phrase not in the caption gets no box); otherwise the caption's *runs of content words*:
maximal runs of consecutive alphabetic words none of which is in `STOP_WORDS` (articles, pronouns,
prepositions, conjunctions, auxiliaries, and words of position such as "left" or "above"), so "a red circle to
the left of a blue square" gives "red circle" and "blue square". A phrase's box is `vlm ground`'s rule applied to
the caption's own maps: the mean of its tokens' maps (`vlm.grounding.maps.combine`), then
`vlm.grounding.maps.box_from_map` (the connected region around the peak at least ``threshold`` of it) in pixels of
the image as loaded, ``[x, y, w, h]`` rounded to 2 decimals, with the peak.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vlm.grounding.maps import box_from_map, combine, peak

STOP_WORDS = frozenset("""
a an the this that these those there here it its they them their he she his her we our you your i me my
is are was were be been being am has have had do does did will would can could should may might must
of in on at to from by with without for into onto over under above below behind beside besides between among
near next left right top bottom front back middle center centre side inside outside around through across
along up down off out and or but nor not no so as than then too very also just only both either neither
each every all any some many much more most few several other another such what which who whom whose where
when why how while if
""".split())
"""Words that never belong to a content phrase."""


def top_patches(maps: np.ndarray, k: int) -> list[list[list[float]]]:
    """Per token of maps (T, h, w): its k largest patches as [index, weight] (index = row * w + col)."""
    maps = np.asarray(maps, dtype=np.float64)
    flat = maps.reshape(len(maps), int(np.prod(maps.shape[1:])))  # an empty text has no rows
    k = min(k, flat.shape[1])
    order = np.argsort(-flat, axis=1, kind="stable")[:, :k]  # largest first, ties by index (a stable sort)
    pairs = np.empty((*order.shape, 2), dtype=object)  # its tolist() gives Python ints and floats, built in C
    pairs[..., 0], pairs[..., 1] = order, np.round(np.take_along_axis(flat, order, axis=1), 6)
    return pairs.tolist()


def words(tokens: Sequence[str]) -> list[tuple[str, list[int]]]:
    """The caption's words, each with the indices of its tokens: word-level tokens are words; byte-level BPE
    tokens start a word with "Ġ" (and WordPiece ones continue one with "##")."""
    out: list[tuple[str, list[int]]] = []
    bpe = any(t.startswith("Ġ") for t in tokens)
    for i, token in enumerate(tokens):
        if out and (token.startswith("##") or (bpe and not token.startswith("Ġ"))):
            text, idx = out[-1]
            out[-1] = (text + token.removeprefix("##"), [*idx, i])
        else:
            out.append((token.removeprefix("Ġ"), [i]))
    return out


def content_phrases(tokens: Sequence[str]) -> list[tuple[str, list[int]]]:
    """Runs of content words (see the module's rule): each phrase's text and token indices."""
    phrases: list[tuple[str, list[int]]] = []
    run: list[tuple[str, list[int]]] = []
    for text, idx in [*words(tokens), ("", [])]:
        if text.isalpha() and text.lower() not in STOP_WORDS:
            run.append((text, idx))
            continue
        if run:
            phrases.append((" ".join(w for w, _ in run), [i for _, ix in run for i in ix]))
        run = []
    return phrases


def find_phrase(tokens: Sequence[str], phrase: str) -> list[int] | None:
    """The token indices of the first whole-word, case-insensitive occurrence of phrase in the caption."""
    spans = words(tokens)
    caption = [w.lower() for w, _ in spans]
    wanted = phrase.lower().split()
    for start in range(len(caption) - len(wanted) + 1):
        if caption[start:start + len(wanted)] == wanted:
            return [i for _, idx in spans[start:start + len(wanted)] for i in idx]
    return None


def phrase_boxes(maps: np.ndarray, tokens: Sequence[str], size: tuple[int, int], phrases: Sequence[str] | None,
                 threshold: float = 0.5) -> list[dict]:
    """A box per phrase (given, else the caption's content runs) from the caption's token maps (T, h, w)."""
    found = ([(p, find_phrase(tokens, p)) for p in phrases] if phrases is not None
             else content_phrases(tokens))
    out = []
    for text, idx in found:
        if not idx:
            out.append({"phrase": text, "tokens": [], "box": None, "peak": None})
            continue
        phrase_map = combine(np.asarray(maps)[idx])
        box = box_from_map(phrase_map, size, threshold)
        out.append({"phrase": text, "tokens": idx, "box": [round(v, 2) for v in box],
                    "peak": list(peak(phrase_map, size))})
    return out
