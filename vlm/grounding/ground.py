"""Find a phrase in an image: the phrase's map (its tokens fed after the caption prompt), a box, and an overlay."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import ImageDraw

from vlm.config import MapConfig
from vlm.data.images import ImageLike, load_image
from vlm.errors import VLMError
from vlm.grounding.maps import box_from_map, combine, peak
from vlm.grounding.overlay import overlay
from vlm.text.clean import clean_text
from vlm.text.tokenizer import Tokenizer

GROUND_FILE = "ground.png"


class TextMapper(Protocol):
    """What `ground` needs of a captioner (`vlm.api.Captioner` is one; grounding sits below the API)."""

    tokenizer: Tokenizer

    def text_maps(self, images: Sequence[ImageLike], texts: Sequence[str],
                  maps: MapConfig | None = None) -> list[np.ndarray]: ...


def text_tokens_and_maps(captioner: TextMapper, image: ImageLike, text: str,
                         maps: MapConfig | None = None) -> tuple[list[str], np.ndarray]:
    """The tokens of ``text`` and the map (T, h, w) of each when the decoder reads it as the image's caption.

    The tokens are those `text_maps` makes maps for: of the cleaned text (`clean_text`), cut as it is cut to fit
    the model's max_length, so that token i is the one map i shows (`ground` and `vlm serve` report them).
    """
    (token_maps,) = captioner.text_maps([image], [text], maps)
    ids = captioner.tokenizer.encode(clean_text(text))[:len(token_maps)]
    return captioner.tokenizer.tokens(ids), token_maps


def ground(captioner: TextMapper, image: ImageLike, phrase: str, maps: MapConfig | None = None,
           threshold: float = 0.5, out_dir: str | os.PathLike | None = None) -> dict:
    """The phrase's box ``[x, y, w, h]`` (pixels of the image), peak and tokens, as a JSON-ready dict.

    The map is the mean of the phrase tokens' maps (each made as ``maps`` says); the box encloses the connected
    region around its peak where the map is at least ``threshold`` of the peak. With ``out_dir``, the overlay with
    the box drawn is written to ``out_dir/ground.png`` (only there).
    """
    if not phrase.strip():
        raise VLMError("phrase: empty")
    if not 0.0 < threshold <= 1.0:
        raise VLMError(f"threshold: expected a fraction in (0, 1], got {threshold}")
    pil = load_image(image)
    if not captioner.tokenizer.encode(clean_text(phrase, "phrase")):
        raise VLMError(f"phrase {phrase!r} has no tokens")
    maps = maps or MapConfig()
    tokens, token_maps = text_tokens_and_maps(captioner, pil, phrase, maps)
    phrase_map = combine(token_maps)
    box = box_from_map(phrase_map, pil.size, threshold)
    x, y = peak(phrase_map, pil.size)
    result = {"phrase": phrase, "tokens": tokens, "method": maps.method, "box": [round(v, 2) for v in box],
              "peak": [x, y], "image_size": list(pil.size), "grid": list(phrase_map.shape)}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        drawn = overlay(pil, phrase_map)
        ImageDraw.Draw(drawn).rectangle([box[0], box[1], box[0] + box[2] - 1, box[1] + box[3] - 1],
                                        outline=(0, 255, 0), width=max(1, round(max(pil.size) / 100)))
        drawn.save(out / GROUND_FILE)
        result["file"] = str(out / GROUND_FILE)
    return result
