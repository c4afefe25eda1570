"""`vlm eval --data ...`: predict with a model (or read a results file), score, and write everything to --out.

With both --results and --model, the results are scored and the model only makes the grounding scores and the
report's maps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlm.api import clean_text
from vlm.config import SourceConfig
from vlm.data.images import load_image
from vlm.data.records import Record, read_records
from vlm.errors import VLMError
from vlm.eval.dataset import predict, question_key, read_results, score, write_outputs
from vlm.eval.grounding import GroundingCase, grounding_scores
from vlm.eval.vqa import vqa_accuracy

REPORT_SAMPLES = 24


def evaluate_data(args: Any) -> tuple[dict, list[Path]]:
    """Metrics and the files written, for the `vlm eval` arguments (model or results, data, out, ...)."""
    if args.model is None and args.results is None:
        raise VLMError("give --model (to predict and score) or --results (to score a results file)")
    if args.limit is not None and args.limit < 1:
        raise VLMError(f"--limit: expected a positive number of images, got {args.limit}")
    source = SourceConfig(path=args.data, format=args.format, images=args.images, annotations=args.annotations,
                          split=args.split)
    records, _ = read_records(source, strict=True, check_images=args.results is None)
    records = records[:args.limit] if args.limit else records
    if not records:
        raise VLMError(f"{args.data}: no records")

    captioner = None
    if args.model is not None:
        from vlm import load

        captioner = load(args.model)
    if args.results is not None:
        caption_results, vqa_results = read_results(args.results)
    else:
        caption_results, vqa_results = predict(captioner, records, beam_size=args.beam)
    metrics, rows = score(records, caption_results, vqa_results, java=args.java)
    cases = [GroundingCase(r.image, [(g.phrase, tuple(g.bbox)) for g in r.regions]) for r in records if r.regions]
    if captioner is not None and cases:
        metrics["grounding"] = {"method": args.method,
                                **grounding_scores(captioner, cases, args.method, args.layers, args.head)}
    if not metrics:
        raise VLMError(f"{args.data}: nothing to score (no captions, questions, or regions with a model)")
    out = Path(args.out or "eval_out")
    written = write_outputs(out, metrics, rows, caption_results if args.results is None else None,
                            vqa_results if args.results is None else None)
    if args.report is not None:
        from vlm.report import write_report

        samples = _samples(captioner, records, caption_results, vqa_results, rows, args)
        written.append(write_report(args.report, metrics, samples))
    return metrics, written


def _samples(captioner, records: list[Record], caption_results: list[dict], vqa_results: list[dict], rows: dict,
             args: Any) -> list[dict]:
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
    if captioner is not None and texts:
        tok = captioner.tokenizer
        maps = captioner.text_maps([t[1] for t in texts], [t[2] for t in texts], args.layers, args.method, args.head,
                                   questions=[t[3] for t in texts])
        for (target, _, text, _), m in zip(texts, maps, strict=True):
            target["tokens"] = tok.tokens(tok.encode(clean_text(text)))[:m.shape[0]]  # texts past max_length are cut
            target["maps"] = m
    return samples
