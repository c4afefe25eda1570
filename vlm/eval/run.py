"""Evaluate on a dataset on disk (`vlm eval --data ...`): predict with a captioner (or read a results file), score,
and write everything to an output directory.

With both results and a captioner, the results are scored and the captioner only makes the grounding scores and the
report's maps.
"""

from __future__ import annotations

import os
from pathlib import Path

from vlm.api import NO_MAPS, Captioner
from vlm.config import DecodingConfig, MapConfig, SourceConfig
from vlm.data.images import load_image
from vlm.data.records import Record, read_records
from vlm.errors import VLMError
from vlm.eval.dataset import predict, question_key, read_results, score, write_outputs
from vlm.eval.grounding import GroundingCase, grounding_scores
from vlm.eval.vqa import vqa_accuracy
from vlm.text.clean import clean_text

REPORT_SAMPLES = 24


def evaluate_data(source: SourceConfig, captioner: Captioner | None = None, *, results: str | None = None,
                  decoding: DecodingConfig | None = None, maps: MapConfig | None = None, limit: int | None = None,
                  java: bool = True, out: str | os.PathLike = "eval_out",
                  report: str | os.PathLike | None = None) -> tuple[dict, list[Path]]:
    """Metrics, and the files written to ``out`` (results, metrics.json, per_image.csv; the HTML ``report``).

    The captioner predicts with ``decoding`` (unless ``results`` names a results file to score) and, where the
    records have regions, makes grounding maps as ``maps`` says; ``limit`` keeps the first records (and of a
    results file, the results of their images and questions).
    """
    if captioner is None and results is None:
        raise VLMError("give --model (to predict and score) or --results (to score a results file)")
    if limit is not None and limit < 1:
        raise VLMError(f"--limit: expected a positive number of images, got {limit}")
    maps = maps or MapConfig()
    # Scoring a results file needs only the annotations; predicting and the report's pictures need the images.
    records, _ = read_records(source, strict=True, check_images=results is None or report is not None)
    records = records[:limit] if limit else records
    if not records:
        raise VLMError(f"{source.path}: no records")

    if results is not None:
        caption_results, vqa_results = read_results(results)
        if limit:  # the results of the images left out are not errors, just not scored
            images = {str(r.image_id) for r in records}
            questions = {str(question_key(r, i)) for r in records for i in range(len(r.questions))}
            caption_results = [c for c in caption_results if str(c["image_id"]) in images]
            vqa_results = [v for v in vqa_results if str(v["question_id"]) in questions]
            if not caption_results and not vqa_results:
                raise VLMError(f"{results}: no result for the first {len(records)} images of {source.path} (--limit)")
    else:
        caption_results, vqa_results = predict(captioner, records, decoding)
    metrics, rows = score(records, caption_results, vqa_results, java=java)
    cases = [GroundingCase(r.image, [(g.phrase, tuple(g.bbox)) for g in r.regions]) for r in records if r.regions]
    if captioner is not None and cases:
        metrics["grounding"] = ({"method": maps.method, **grounding_scores(captioner, cases, maps)}
                                if captioner.makes_maps else {"skipped": NO_MAPS})
    if not metrics:
        raise VLMError(f"{source.path}: nothing to score (no captions, questions, or regions with a model)")
    written = write_outputs(Path(out), metrics, rows, caption_results if results is None else None,
                            vqa_results if results is None else None)
    if report is not None:
        from vlm.eval.report import write_report

        samples = _samples(captioner, records, caption_results, vqa_results, rows, maps)
        written.append(write_report(report, metrics, samples))
    return metrics, written


def _samples(captioner: Captioner | None, records: list[Record], caption_results: list[dict],
             vqa_results: list[dict], rows: dict, maps: MapConfig) -> list[dict]:
    """The report's samples: the first images, with their caption and answers and (given a model) their maps."""
    captions = {str(r["image_id"]): r["caption"] for r in caption_results}
    answers = {str(r["question_id"]): r["answer"] for r in vqa_results}
    samples, texts = [], []  # texts: (where the tokens and maps go, image, text, question or None)
    for record in records[:REPORT_SAMPLES]:
        image = load_image(record.image)
        caption = captions.get(str(record.image_id))
        sample = {"id": str(record.image_id), "image": image, "caption": caption, "references": record.captions,
                  "score": rows.get(record.image_id, {}).get("CIDEr-D"), "questions": []}
        if caption:
            texts.append((sample, image, caption, None))
        for i, q in enumerate(record.questions):
            answer = answers.get(str(question_key(record, i)))
            if answer is None:
                continue
            entry = {"question": q.question, "answer": answer, "truth": q.answers,
                     "score": vqa_accuracy(answer, q.answers)}
            if answer:
                texts.append((entry, image, answer, q.question))
            sample["questions"].append(entry)
        samples.append(sample)
    if captioner is not None and captioner.makes_maps and texts:
        tok = captioner.tokenizer
        text_maps = captioner.text_maps([t[1] for t in texts], [t[2] for t in texts], maps,
                                        questions=[t[3] for t in texts])
        for (target, _, text, _), m in zip(texts, text_maps, strict=True):
            target["tokens"] = tok.tokens(tok.encode(clean_text(text)))[:m.shape[0]]  # texts past max_length are cut
            target["maps"] = m
    return samples

