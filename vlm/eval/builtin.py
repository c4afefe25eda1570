"""Score a model on the held-out built-in scenes: captions, answers and grounding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from vlm.api import Captioner
from vlm.data.scenes import make_scene
from vlm.eval.caption import caption_scores, diversity
from vlm.eval.vqa import vqa_scores
from vlm.grounding.maps import combine, mass_in_box, pointing_hit


def _find(seq: list[int], sub: list[int]) -> int:
    return next(i for i in range(len(seq) - len(sub) + 1) if seq[i:i + len(sub)] == sub)


def evaluate_builtin(captioner: Captioner, num_scenes: int = 500, seed: int = 0, beam_size: int = 1,
                     batch_size: int = 64, layers: Sequence[int] | None = None) -> dict[str, Any]:
    """Caption CIDEr-D and BLEU, VQA accuracy per question kind, and the pointing game.

    Pointing game: each object's phrase in the first reference caption (which names every object) is
    fed through the decoder; the peak of the phrase's map (its tokens' maps averaged) must fall inside
    the object's box. ``layers`` chooses the decoder layers whose attention makes the maps.
    """
    size = captioner.model.cfg.encoder.image_size
    scenes = [make_scene(i, "val", seed, size) for i in range(num_scenes)]
    images = [s.image for s in scenes]

    captions = captioner.caption(images, beam_size=beam_size, batch_size=batch_size)
    caption_metrics = caption_scores(dict(enumerate(captions)), {i: s.captions for i, s in enumerate(scenes)})

    qa = [(i, q) for i, s in enumerate(scenes) for q in s.questions]
    answers = captioner.ask([images[i] for i, _ in qa], [q.question for _, q in qa], beam_size=beam_size,
                            batch_size=batch_size)
    vqa = vqa_scores(dict(enumerate(answers)), {k: [q.answer] for k, (_, q) in enumerate(qa)},
                     {k: q.kind for k, (_, q) in enumerate(qa)})

    tok = captioner.tokenizer
    hits, masses = [], []
    for start in range(0, num_scenes, batch_size):
        chunk = scenes[start:start + batch_size]
        maps = captioner.text_maps([s.image for s in chunk], [s.captions[0] for s in chunk], layers)
        for scene, token_maps in zip(chunk, maps, strict=True):
            ids = tok.encode(scene.captions[0])
            for obj in scene.objects:
                phrase = tok.encode(obj.phrase)
                at = _find(ids, phrase)
                phrase_map = combine(token_maps[at:at + len(phrase)])
                hits.append(pointing_hit(phrase_map, obj.box, scene.image.size))
                masses.append(mass_in_box(phrase_map, obj.box, scene.image.size))

    return {
        "scenes": num_scenes,
        "caption": {"CIDEr-D": caption_metrics["CIDEr-D"], "BLEU-4": caption_metrics["BLEU-4"],
                    **diversity(captions)},
        "vqa": vqa,
        "grounding": {"pointing_game": float(np.mean(hits)), "mass_in_box": float(np.mean(masses)),
                      "phrases": len(hits)},
        "examples": [{"caption": c, "references": s.captions[:2]} for c, s in zip(captions[:3], scenes, strict=False)],
    }
