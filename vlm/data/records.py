"""Captioning and VQA datasets on disk, read into one record type.

Formats (``SourceConfig.format``; "auto" tells them apart from the file):

- ``coco``: COCO captions (``captions_*.json``) or instances (``instances_*.json``, boxes become regions named by
  their category) through pycocotools, with the image folder; ``annotations`` may name the instances file of the
  same images, whose boxes then become the regions of the captioned images.
- ``karpathy``: the ``dataset_coco.json`` split file (also Flickr8k/30k); ``split`` picks train (with restval),
  val or test from the file's own split field.
- ``vqa``: VQA v2 questions JSON (``path``) and annotations JSON (``annotations``) with the image folder; all ten
  human answers are kept for scoring.
- ``jsonl``: one JSON object per line with "image" (relative to the file, or absolute) and "captions": [...] and/or
  "question" + "answers": [...], optionally "regions": [{"phrase", "bbox": [x, y, w, h]}]; lines naming the same
  image are merged into one record.
- ``webdataset``: tar shards (img2dataset layout) streamed by ``vlm.data.shards``, not read into records here.

Every problem is reported with its file (and line, or record) so it can be found: with ``strict`` the first one
raises, otherwise bad records are skipped and counted in ``Report``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from vlm.config import SourceConfig
from vlm.data.boxes import PixelBox
from vlm.errors import VLMError

__all__ = ["Question", "Record", "Region", "Report", "SourceConfig", "detect_format", "read_records"]

FORMATS = ("auto", "coco", "karpathy", "vqa", "jsonl", "webdataset")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class Region:
    phrase: str
    bbox: PixelBox
    """In pixels of the original image."""


@dataclass
class Question:
    question: str
    answers: list[str]
    """Every human answer (VQA v2 has ten); training learns the most frequent one."""
    question_id: int | str | None = None
    answer_type: str | None = None
    """VQA v2's "yes/no", "number" or "other", when known."""
    question_type: str | None = None
    """What the question asks about, when known: the built-in scenes' "color", "shape", "size", "count", "exist"
    or "spatial"."""
    target: str | None = None
    """The training target the file names, when it names one (VQA v2's normalised ``multiple_choice_answer``)."""

    @property
    def answer(self) -> str:
        """The training target: the file's own when given, else the most frequent answer (the first among equals)."""
        if self.target:
            return self.target
        return Counter(self.answers).most_common(1)[0][0]


@dataclass
class Record:
    image: str
    """Image file path."""
    image_id: int | str
    captions: list[str] = field(default_factory=list)
    questions: list[Question] = field(default_factory=list)
    regions: list[Region] = field(default_factory=list)
    where: str = ""
    """Where the record comes from ("file:line" or "file: image N"), for messages."""


@dataclass
class Report:
    """What reading a source found: records kept, and problems (each "where: what")."""

    records: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return len(self.problems)


class _Problems:
    """Raise at the first problem (strict) or collect them."""

    def __init__(self, strict: bool, report: Report):
        self.strict, self.report = strict, report

    def __call__(self, message: str) -> None:
        if self.strict:
            raise VLMError(message)
        self.report.problems.append(message)


def detect_format(source: SourceConfig) -> str:
    """The format of a source whose ``format`` is "auto", from its path and, for JSON, its top-level keys."""
    if source.format != "auto":
        if source.format not in FORMATS:
            raise VLMError(f"data format {source.format!r} is not one of {', '.join(FORMATS)}")
        return source.format
    path = source.path
    if path.endswith(".tar") or path.endswith("}") or "://" in path:
        return "webdataset"
    if path.endswith(".jsonl"):
        return "jsonl"
    data = _read_json(path)
    if not isinstance(data, dict):
        raise VLMError(f"{path}: expected a JSON object (COCO, Karpathy or VQA layout)")
    if "questions" in data:
        return "vqa"
    if "images" in data and data["images"] and "sentences" in data["images"][0]:
        return "karpathy"
    if "annotations" in data and "images" in data:
        return "coco"
    raise VLMError(f"{path}: cannot tell the format (no 'questions', 'images'/'annotations' or Karpathy "
                   "'sentences'); set format")


def read_records(source: SourceConfig, strict: bool = True, check_images: bool = True) -> tuple[list[Record], Report]:
    """All records of a file-based source, and a report of what was skipped (never silently)."""
    fmt = detect_format(source)
    report = Report()
    problem = _Problems(strict, report)
    if fmt == "coco":
        records = _read_coco(source, problem, check_images)
    elif fmt == "karpathy":
        records = _read_karpathy(source, problem, check_images)
    elif fmt == "vqa":
        records = _read_vqa(source, problem, check_images)
    elif fmt == "jsonl":
        records = _read_jsonl(source, problem)
    else:
        raise VLMError(f"{source.path}: {fmt} sources are streamed, not read into records")
    kept = []
    for r in records:
        if check_images and not os.path.isfile(r.image):
            problem(f"{r.where}: image file {r.image} not found")
        elif not r.captions and not r.questions and not r.regions:
            problem(f"{r.where}: no captions, questions or regions")
        else:
            kept.append(r)
    report.records = len(kept)
    return kept, report


def _read_json(path: str | os.PathLike):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise VLMError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VLMError(f"{path}: invalid JSON ({e})") from None
    except IsADirectoryError:
        raise VLMError(f"{path}: is a directory, expected an annotation file") from None


def _image_dir(source: SourceConfig, required: bool) -> Path | None:
    """The image folder; None when none is given and the images are not needed (scoring a results file)."""
    if source.images is None:
        if not required:
            return None
        raise VLMError(f"{source.path}: give the image folder (images) for this format")
    folder = Path(source.images)
    if not folder.is_dir():
        raise VLMError(f"{folder}: image folder not found")
    return folder


def _clean(text, where: str, what: str, problem: _Problems) -> str | None:
    """A stripped non-empty string, or None after reporting the problem."""
    if not isinstance(text, str) or not text.strip():
        problem(f"{where}: empty or missing {what}")
        return None
    return " ".join(text.split())


def _bbox(value) -> PixelBox | None:
    """A region's box [x, y, w, h] as a `PixelBox`, or None unless it is 4 finite numbers with w > 0 and h > 0 (a
    NaN, infinite or empty box would make the grounding loss NaN or meaningless)."""
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        return None
    box = tuple(float(v) for v in value)
    return box if box[2] > 0 and box[3] > 0 else None


BAD_BBOX = "expected [x, y, w, h]: 4 finite numbers with w > 0 and h > 0"


ANSWERS_NEEDED = "\"answers\": a non-empty list of non-empty strings"


def given_answers(question: dict) -> list[str] | None:
    """A question object's answers ("answers", or one "answer"), whitespace normalised; None unless they are a
    non-empty list of non-empty strings (`ANSWERS_NEEDED`). The JSONL lines' and the shard samples' check."""
    answers = question.get("answers", [question["answer"]] if "answer" in question else None)
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        return None
    return [" ".join(a.split()) for a in answers]


def _coco_index(path: str):
    """A pycocotools index of one COCO annotation file, fed the parsed file: read once, with our clear errors."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = _read_json(path)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        try:
            coco.createIndex()
        except (KeyError, TypeError, AttributeError) as e:
            raise VLMError(f"{path}: not a COCO annotation file ({e.__class__.__name__}: {e})") from None
    return coco


def _read_coco(source: SourceConfig, problem: _Problems, check_images: bool) -> list[Record]:
    """Captions and/or boxes of ``path``; the boxes of an ``annotations`` file (the instances of the same images,
    as COCO ships them apart from the captions) become regions too."""
    indexes = {path: _coco_index(path) for path in (source.path, source.annotations) if path}
    categories = {path: {c["id"]: c["name"] for c in index.dataset.get("categories", [])}
                  for path, index in indexes.items()}
    folder = _image_dir(source, check_images)
    coco = indexes[source.path]
    # pycocotools indexes images by id, the last entry of an id silently replacing the others: which file such an
    # id's annotations describe cannot be told, so the id is reported and skipped.
    seen = Counter(info.get("id") for info in coco.dataset.get("images", []) if isinstance(info, dict))
    records = []
    for image_id in sorted(coco.imgs):
        info = coco.imgs[image_id]
        where = f"{source.path}: image {image_id}"
        if seen[image_id] > 1:
            problem(f"{where}: {seen[image_id]} entries of \"images\" have this id (ids must be unique)")
            continue
        if "file_name" not in info:
            problem(f"{where}: no file_name")
            continue
        record = Record(str(Path(folder or "", info["file_name"])), image_id, where=where)
        for path, index in indexes.items():
            for ann in index.imgToAnns.get(image_id, []):
                at = f"{path}: image {image_id} annotation {ann.get('id')}"
                if "caption" in ann:
                    text = _clean(ann["caption"], at, "caption", problem)
                    if text:
                        record.captions.append(text)
                elif "bbox" in ann:
                    name = categories[path].get(ann.get("category_id"))
                    if name is None:
                        problem(f"{at}: unknown category_id {ann.get('category_id')}")
                        continue
                    bbox = _bbox(ann["bbox"])
                    if bbox is None:
                        problem(f"{at}: bad bbox {json.dumps(ann['bbox'])}: {BAD_BBOX}")
                        continue
                    record.regions.append(Region(name, bbox))
        records.append(record)
    return records


def _read_karpathy(source: SourceConfig, problem: _Problems, check_images: bool) -> list[Record]:
    data = _read_json(source.path)
    folder = _image_dir(source, check_images)
    splits = {"train": {"train", "restval"}, "val": {"val"}, "test": {"test"},
              None: {"train", "restval", "val", "test"}}
    if source.split not in splits:
        raise VLMError(f"{source.path}: split {source.split!r} is not one of train, val, test")
    records = []
    for n, image in enumerate(data.get("images", [])):
        if image.get("split") not in splits[source.split]:
            continue
        where = f"{source.path}: images[{n}]"
        if "filename" not in image:
            problem(f"{where}: no filename")
            continue
        path = Path(folder or "", image.get("filepath", ""), image["filename"])
        captions = [t for s in image.get("sentences", [])
                    if (t := _clean(s.get("raw"), where, "sentence", problem))]
        records.append(Record(str(path), image.get("cocoid", image.get("imgid", n)), captions, where=where))
    return records


def _image_index(folder: Path) -> dict[str, Path]:
    """File stem -> path of every image in a folder, also under the stem's last "_" part (VQA names images by id
    only, and the test-dev2015 questions' images are COCO_test2015_<id>.jpg)."""
    index: dict[str, Path] = {}
    for path in folder.iterdir():
        if path.suffix.lower() in IMAGE_SUFFIXES:
            index[path.stem] = path
            index.setdefault(path.stem.rsplit("_", 1)[-1], path)
    return index


def _read_vqa(source: SourceConfig, problem: _Problems, check_images: bool) -> list[Record]:
    questions = _read_json(source.path)
    if "questions" not in questions:
        raise VLMError(f"{source.path}: not a VQA questions file (no 'questions')")
    answers: dict = {}
    annotated: Counter = Counter()  # annotations per question_id: more than one cannot be told apart
    if source.annotations:
        annotations = _read_json(source.annotations)
        if "annotations" not in annotations:
            raise VLMError(f"{source.annotations}: not a VQA annotations file (no 'annotations')")
        for n, a in enumerate(annotations["annotations"]):
            if not isinstance(a, dict) or "question_id" not in a:
                raise VLMError(f"{source.annotations}: annotations[{n}] has no question_id")
            answers[a["question_id"]] = a
            annotated[a["question_id"]] += 1
    asked = Counter(q.get("question_id") for q in questions["questions"] if isinstance(q, dict))
    folder = _image_dir(source, check_images)
    index = _image_index(folder) if folder else {}
    subtype = questions.get("data_subtype", "")
    by_image: dict = {}
    for n, q in enumerate(questions["questions"]):
        where = f"{source.path}: questions[{n}]"
        text = _clean(q.get("question"), where, "question", problem)
        if text is None:
            continue
        image_id, qid = q.get("image_id"), q.get("question_id")
        # Answers and results are keyed by question_id: an id must name one question, with one annotation.
        if qid is not None and asked[qid] > 1:
            problem(f"{where}: question_id {qid} is the id of {asked[qid]} questions (ids must be unique)")
            continue
        if qid is not None and annotated[qid] > 1:
            problem(f"{where}: question_id {qid} has {annotated[qid]} annotations in {source.annotations}")
            continue
        ann = answers.get(qid)
        if source.annotations and ann is None:
            problem(f"{where}: question_id {qid} has no annotation in {source.annotations}")
            continue
        given = [a.get("answer") if isinstance(a, dict) else None for a in ann.get("answers", [])] if ann else []
        if not all(isinstance(a, str) for a in given):
            problem(f"{where}: question_id {qid}: each of 'answers' must be an object with a string 'answer'")
            continue
        if ann and not [a for a in given if a.strip()]:
            problem(f"{where}: question_id {qid} has no answers")
            continue
        if image_id not in by_image:
            padded = f"{image_id:012d}" if isinstance(image_id, int) else str(image_id)
            official = f"COCO_{subtype}_{padded}"  # the file name in the official COCO folders
            stem = next((s for s in (official, padded, str(image_id)) if s in index), None)
            path = index[stem] if stem else Path(folder or "", f"{official}.jpg")
            by_image[image_id] = Record(str(path), image_id, where=where)
        by_image[image_id].questions.append(
            Question(text, given, qid, ann.get("answer_type") if ann else None,
                     target=_target(ann.get("multiple_choice_answer") if ann else None)))
    return list(by_image.values())


def _target(answer) -> str | None:
    """VQA v2's ``multiple_choice_answer`` (the most frequent answer after the official normalisation), if given."""
    if not isinstance(answer, str):
        return None
    return " ".join(answer.split()) or None


def _read_jsonl(source: SourceConfig, problem: _Problems) -> list[Record]:
    path = Path(source.path)
    try:
        lines = path.read_bytes().splitlines()  # decoded line by line: one bad line is reported by its number
    except FileNotFoundError:
        raise VLMError(f"{path}: no such file") from None
    except IsADirectoryError as e:
        raise VLMError(f"{path}: cannot read ({e.__class__.__name__})") from None
    base = Path(source.images) if source.images else path.parent
    by_image: dict[str, Record] = {}
    for n, raw in enumerate(lines, 1):
        where = f"{path}:{n}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            problem(f"{where}: not UTF-8 ({e.reason} at byte {e.start + 1} of the line)")
            continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            problem(f"{where}: invalid JSON ({e.msg})")
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("image"), str):
            problem(f"{where}: each line must be an object with an \"image\" path")
            continue
        image = str(base / obj["image"])  # an absolute "image" stays absolute
        captions = obj.get("captions", [obj["caption"]] if "caption" in obj else [])
        if not isinstance(captions, list):
            problem(f"{where}: \"captions\" must be a list of strings")
            continue
        captions = [_clean(c, where, "caption", problem) for c in captions]
        if None in captions:
            continue
        questions = []
        if "question" in obj:
            text = _clean(obj["question"], where, "question", problem)
            answers = given_answers(obj)
            if text is None:
                continue
            if answers is None:
                problem(f"{where}: a question needs {ANSWERS_NEEDED}")
                continue
            questions.append(Question(text, answers, obj.get("question_id"), obj.get("answer_type")))
        regions = []
        given = obj.get("regions")
        if given is not None and not isinstance(given, list):  # null: no regions
            problem(f"{where}: \"regions\" must be a list")
            continue
        for r in given or []:
            if not (isinstance(r, dict) and "bbox" in r and isinstance(r.get("phrase"), str)):
                problem(f"{where}: a region needs \"phrase\" and \"bbox\": [x, y, w, h]")
                break
            bbox = _bbox(r["bbox"])
            if bbox is None:
                problem(f"{where}: bad bbox {json.dumps(r['bbox'])}: {BAD_BBOX}")
                break
            regions.append(Region(r["phrase"], bbox))
        else:
            record = by_image.setdefault(image, Record(image, obj.get("image_id", obj["image"]), where=where))
            record.captions += captions
            record.questions += questions
            record.regions += regions
    return list(by_image.values())
