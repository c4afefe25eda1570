"""Evaluate on a dataset on disk (COCO, Karpathy, VQA v2, JSONL): result files, metrics JSON and a per-image CSV.

`predict` runs a model over the records and gives the COCO caption results ``[{"image_id", "caption"}]`` and the
VQA results ``[{"question_id", "answer"}]``; `score` scores such results (ours or anybody's) against the records:
caption metrics (`vlm.eval.caption`, with collapse guards), VQA accuracy per answer type, and, given a model and
records with regions, grounding scores (`vlm.eval.grounding`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

from vlm.config import DecodingConfig
from vlm.data.records import Record
from vlm.errors import VLMError
from vlm.eval.caption import caption_evaluation, diversity, java_metrics
from vlm.eval.vqa import vqa_accuracy, vqa_scores

CAPTIONS_FILE, VQA_FILE, METRICS_FILE, PER_IMAGE_FILE = "captions_results.json", "vqa_results.json", \
    "metrics.json", "per_image.csv"


def question_key(record: Record, index: int) -> Hashable:
    """A question's id in result files: its own question_id, else "<image_id>:<index>"."""
    question = record.questions[index]
    return question.question_id if question.question_id is not None else f"{record.image_id}:{index}"


def predict(captioner, records: Sequence[Record], decoding: DecodingConfig | None = None, batch_size: int = 64,
            ) -> tuple[list[dict], list[dict]]:
    """Caption every record that has reference captions and answer every question (none for a model that answers
    no questions: an imported captioner)."""
    captioned = [r for r in records if r.captions]
    captions = captioner.caption([r.image for r in captioned], decoding, batch_size=batch_size)
    caption_results = [{"image_id": r.image_id, "caption": c} for r, c in zip(captioned, captions, strict=True)]
    answering = captioner.model.cfg.answers_questions
    asked = [(r, i) for r in records for i in range(len(r.questions))] if answering else []
    answers = captioner.ask([r.image for r, _ in asked], [r.questions[i].question for r, i in asked],
                            decoding, batch_size=batch_size) if asked else []
    vqa_results = [{"question_id": question_key(r, i), "answer": a} for (r, i), a in zip(asked, answers, strict=True)]
    return caption_results, vqa_results


def read_results(path: str | Path) -> tuple[list[dict], list[dict]]:
    """A results file: COCO caption results or VQA results (told apart by their keys)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise VLMError(f"{path}: cannot read results ({e.__class__.__name__}: {e})") from None
    if not isinstance(data, list) or not data or not all(isinstance(d, dict) for d in data):
        raise VLMError(f"{path}: expected a non-empty JSON list of result objects")
    if all("caption" in d and "image_id" in d for d in data):
        return data, []
    if all("answer" in d and "question_id" in d for d in data):
        return [], data
    raise VLMError(f"{path}: results must all be {{'image_id', 'caption'}} or all {{'question_id', 'answer'}}")


def _by_key(results: list[dict], key: str, value: str, known: dict, what: str) -> dict:
    out = {}
    for n, result in enumerate(results):
        k = result[key]
        if k not in known and str(k) in {str(x) for x in known}:  # "42" vs 42
            k = next(x for x in known if str(x) == str(k))
        if k not in known:
            raise VLMError(f"result {n}: {key} {k!r} is not in the data")
        if k in out:
            raise VLMError(f"result {n}: {key} {k!r} appears twice")
        if not isinstance(result[value], str):
            raise VLMError(f"result {n}: {value} must be a string, got {result[value]!r}")
        out[k] = result[value]
    return out


def score(records: Sequence[Record], caption_results: list[dict], vqa_results: list[dict],
          java: bool = True) -> tuple[dict[str, Any], dict[Hashable, dict[str, Any]]]:
    """Metrics of the results against the records (only the images/questions in the results are scored, as the
    COCO toolkit does), and per-image rows for the CSV; empty when there are no results."""
    metrics: dict[str, Any] = {}
    rows: dict[Hashable, dict[str, Any]] = {r.image_id: {"image_id": r.image_id, "image": r.image} for r in records}
    if caption_results:
        refs = {r.image_id: r.captions for r in records if r.captions}
        predictions = _by_key(caption_results, "image_id", "caption", refs, "caption")
        run, skipped = java_metrics() if java else ([], {})
        corpus, per_item = caption_evaluation(predictions, {k: refs[k] for k in predictions}, run)
        metrics["caption"] = {**corpus, **diversity(list(predictions.values())), "images": len(predictions)}
        if skipped:
            metrics["caption"]["skipped"] = skipped
        for key, scores in per_item.items():
            rows[key] |= {"caption": predictions[key], **scores}
    if vqa_results:
        questions = {question_key(r, i): (r, q) for r in records for i, q in enumerate(r.questions)}
        answers = _by_key(vqa_results, "question_id", "answer", questions, "answer")
        unanswered = next((k for k in answers if not questions[k][1].answers), None)
        if unanswered is not None:
            raise VLMError(f"question_id {unanswered!r} has no human answers to score against (VQA needs the "
                           "annotations file: --annotations)")
        truth = {k: questions[k][1].answers for k in answers}
        types = {k: questions[k][1].answer_type or "unknown" for k in answers}
        metrics["vqa"] = {**vqa_scores(answers, truth, types), "questions": len(answers)}
        per_image: dict[Hashable, list[float]] = {}
        for k, answer in answers.items():
            per_image.setdefault(questions[k][0].image_id, []).append(vqa_accuracy(answer, truth[k]))
        for image_id, accs in per_image.items():
            rows[image_id] |= {"vqa_accuracy": sum(accs) / len(accs), "questions": len(accs)}
    return metrics, {k: v for k, v in rows.items() if len(v) > 2}


def write_outputs(out_dir: str | Path, metrics: dict, rows: dict, caption_results: list[dict] | None = None,
                  vqa_results: list[dict] | None = None) -> list[Path]:
    """Write the result files (when given), metrics.json and per_image.csv into out_dir; the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, results in ((CAPTIONS_FILE, caption_results), (VQA_FILE, vqa_results)):
        if results:
            (out / name).write_text(json.dumps(results))
            written.append(out / name)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    columns = list(dict.fromkeys(c for row in rows.values() for c in row))
    with open(out / PER_IMAGE_FILE, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows.values())
    return [*written, out / METRICS_FILE, out / PER_IMAGE_FILE]
