"""`vlm data validate`: check a dataset before training on it.

Counts records, captions, questions and regions; opens every image; finds empty and over-long texts and
broken records; shows the answer distribution. Every problem names its file and line (or record).
"""

from __future__ import annotations

from collections import Counter

from vlm.config import SourceConfig
from vlm.data.datasets import ShardDataset, shard_sample
from vlm.data.images import load_image
from vlm.data.records import Question, detect_format, read_records
from vlm.errors import VLMError


def validate(source: SourceConfig, max_words: int = 60, max_problems: int = 50) -> dict:
    """A report: counts, problems (each "where: what"), the commonest answers; ``ok`` is False on any problem."""
    fmt = detect_format(source)
    problems: list[str] = []
    counts = Counter()
    answers = Counter()

    def check(where: str, image, captions: list[str], questions: list[Question], regions: int) -> None:
        counts["images"] += 1
        counts["captions"] += len(captions)
        counts["questions"] += len(questions)
        counts["regions"] += regions
        try:
            load_image(image, name=where if not isinstance(image, str) else None)
        except VLMError as e:
            problems.append(f"{where}: {e}")
        for text in [*captions, *(q.question for q in questions)]:
            if len(text.split()) > max_words:
                problems.append(f"{where}: text of {len(text.split())} words (over {max_words}): {text[:60]}...")
        for q in questions:
            answers.update(q.answers)

    if fmt == "webdataset":
        for where, sample in ShardDataset(source, None, strict=False, repeat=False).samples():
            if isinstance(sample, VLMError):  # a shard that breaks off: its readable samples are still checked
                problems.append(str(sample))
                continue
            try:
                image, captions, questions = shard_sample(sample, where, source.caption_key)
            except VLMError as e:
                problems.append(str(e))
                continue
            check(where, image, captions, questions, 0)
    else:
        records, report = read_records(source, strict=False)
        problems += report.problems
        for r in records:
            check(r.where, r.image, r.captions, r.questions, len(r.regions))
    return {
        "path": source.path, "format": fmt, **counts, "problems": len(problems),
        "problem_list": problems[:max_problems], "top_answers": answers.most_common(10),
        "ok": not problems,
    }
