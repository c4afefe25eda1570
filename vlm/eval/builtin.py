"""Score a model on the held-out built-in scenes: captions, answers and grounding."""

from __future__ import annotations

from typing import Any

from vlm.api import NO_MAPS, Captioner
from vlm.config import DecodingConfig, MapConfig
from vlm.data.scenes import make_scene
from vlm.eval.caption import caption_scores, diversity
from vlm.eval.grounding import GroundingCase, grounding_scores
from vlm.eval.vqa import vqa_scores


def evaluate_builtin(captioner: Captioner, num_scenes: int = 500, seed: int = 0,
                     decoding: DecodingConfig | None = None, maps: MapConfig | None = None,
                     batch_size: int = 64, scenes: str = "shapes") -> dict[str, Any]:
    """Caption CIDEr-D, BLEU-4 and ROUGE-L, VQA accuracy per question kind, and grounding scores, on the held-out
    scenes of a family (`vlm.data.scenes.FAMILIES`).

    Grounding (`vlm.eval.grounding`): each object's phrase in the first reference caption (which names every
    object) is fed through the decoder; pointing game (the peak of the phrase's map inside the object's box),
    mass in box and box IoU; left out, with the reason, for a captioner that makes no maps. ``decoding`` says how
    captions and answers are generated, ``maps`` how the maps are made.
    """
    size = captioner.model.cfg.encoder.image_size
    family, scenes = scenes, [make_scene(i, "val", seed, size, scenes) for i in range(num_scenes)]
    images = [s.image for s in scenes]

    captions = captioner.caption(images, decoding, batch_size=batch_size)
    caption_metrics = caption_scores(dict(enumerate(captions)), {i: s.captions for i, s in enumerate(scenes)})

    vqa = None  # a model that answers no questions (an imported captioner) is scored on the rest
    if captioner.model.cfg.answers_questions:
        qa = [(i, q) for i, s in enumerate(scenes) for q in s.questions]
        answers = captioner.ask([images[i] for i, _ in qa], [q.question for _, q in qa], decoding,
                                batch_size=batch_size)
        vqa = vqa_scores(dict(enumerate(answers)), {k: [q.answer] for k, (_, q) in enumerate(qa)},
                         {k: q.question_type for k, (_, q) in enumerate(qa)})

    cases = [GroundingCase(s.image, [(o.phrase, o.box) for o in s.objects], s.captions[0]) for s in scenes]
    maps = maps or MapConfig()
    grounding = ({"method": maps.method, **grounding_scores(captioner, cases, maps)} if captioner.makes_maps
                 else {"skipped": NO_MAPS})

    return {
        "scenes": num_scenes,
        "family": family,
        "caption": {"CIDEr-D": caption_metrics["CIDEr-D"], "BLEU-4": caption_metrics["BLEU-4"],
                    "ROUGE-L": caption_metrics["ROUGE-L"], **diversity(captions)},
        "vqa": vqa,
        "grounding": grounding,
        "examples": [{"caption": c, "references": s.captions[:2]} for c, s in zip(captions[:3], scenes, strict=False)],
    }
