"""`vlm data shapes`: the built-in scenes written in every layout vlm reads, to try the loaders with no download.

Writes into one folder: ``images/`` (PNG), ``captions.json`` (COCO captions), ``instances.json`` (COCO instances:
each object's box, its category the object's colour and shape), ``questions.json`` + ``annotations.json``
(VQA v2, ten human answers per question), ``karpathy.json`` (dataset_coco.json layout, 80/10/10 split),
``data.jsonl`` (a line of captions and regions per image, and a line per question) and ``shards/`` (WebDataset
tar shards in the img2dataset layout: ``KEY.png``, ``KEY.txt``, ``KEY.json``).
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

from vlm.data.scenes import COLORS, SHAPES, make_scene

SHARD_SIZE = 100  # samples per tar shard


def answer_type(answer: str) -> str:
    """VQA v2's answer type of an answer."""
    if answer in ("yes", "no"):
        return "yes/no"
    return "number" if answer.isdigit() or answer in ("zero", "one", "two", "three", "four") else "other"


def write_shapes(out: str | Path, num_images: int, split: str = "val", seed: int = 0, image_size: int = 64,
                 scenes: str = "shapes") -> dict:
    """Write ``num_images`` scenes of a split and family (`vlm.data.scenes.FAMILIES`) in every layout; returns the
    paths written, by layout."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "shards").mkdir(exist_ok=True)
    categories = [{"id": i + 1, "name": f"{c} {s}", "supercategory": "shape"}
                  for i, (c, s) in enumerate((c, s) for c in COLORS for s in SHAPES)]
    category_id = {c["name"]: c["id"] for c in categories}
    images, captions, instances, questions, annotations, karpathy, lines = [], [], [], [], [], [], []
    shard: tarfile.TarFile | None = None
    for i in range(num_images):
        scene = make_scene(i, split, seed, image_size, scenes)
        image_id = i + 1
        name = f"{image_id:012d}.png"
        scene.image.save(out / "images" / name)
        w, h = scene.image.size
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        for caption in scene.captions:
            captions.append({"id": len(captions) + 1, "image_id": image_id, "caption": caption})
        regions = []
        for obj in scene.objects:
            x, y, bw, bh = obj.box
            instances.append({"id": len(instances) + 1, "image_id": image_id, "bbox": [x, y, bw, bh],
                              "area": bw * bh, "iscrowd": 0, "category_id": category_id[f"{obj.color} {obj.shape}"]})
            regions.append({"phrase": f"{obj.color} {obj.shape}", "bbox": [x, y, bw, bh]})
        karpathy.append({"filepath": "", "filename": name, "imgid": i, "cocoid": image_id,
                         "split": "train" if i % 10 < 8 else ("val" if i % 10 == 8 else "test"),
                         "sentences": [{"raw": c, "tokens": c.split()} for c in scene.captions]})
        lines.append({"image": f"images/{name}", "image_id": image_id, "captions": scene.captions,
                      "regions": regions})
        qas = []
        for q in scene.questions:
            qid = len(questions) + 1
            questions.append({"image_id": image_id, "question": q.question, "question_id": qid})
            annotations.append({"question_id": qid, "image_id": image_id, "question_type": q.question_type,
                                "answer_type": answer_type(q.answer), "multiple_choice_answer": q.answer,
                                "answers": [{"answer": q.answer, "answer_confidence": "yes", "answer_id": k + 1}
                                            for k in range(10)]})
            lines.append({"image": f"images/{name}", "image_id": image_id, "question": q.question,
                          "answers": [q.answer], "question_id": qid, "answer_type": answer_type(q.answer)})
            qas.append({"question": q.question, "answers": [q.answer], "question_id": qid})
        if i % SHARD_SIZE == 0:
            if shard is not None:
                shard.close()
            shard = tarfile.open(out / "shards" / f"{i // SHARD_SIZE:05d}.tar", "w")
        buffer = io.BytesIO()
        scene.image.save(buffer, format="PNG")
        key = f"{image_id:09d}"
        meta = {"image_id": image_id, "captions": scene.captions, "questions": qas}
        for suffix, data in (("png", buffer.getvalue()), ("txt", scene.captions[0].encode()),
                             ("json", json.dumps(meta).encode())):
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size = len(data)
            shard.addfile(info, io.BytesIO(data))
    if shard is not None:
        shard.close()
    _remove_stale(out, num_images)
    info = {"description": f"vlm built-in {scenes} scenes, {split} split, seed {seed}", "version": "1.0"}
    files = {
        "captions": out / "captions.json", "instances": out / "instances.json", "questions": out / "questions.json",
        "annotations": out / "annotations.json", "karpathy": out / "karpathy.json", "jsonl": out / "data.jsonl",
        "images": out / "images", "shards": out / "shards",
    }
    _dump(files["captions"], {"info": info, "licenses": [], "images": images, "annotations": captions})
    _dump(files["instances"], {"info": info, "licenses": [], "images": images, "annotations": instances,
                               "categories": categories})
    _dump(files["questions"], {"info": info, "task_type": "Open-Ended", "data_type": "shapes",
                               "data_subtype": split, "questions": questions})
    _dump(files["annotations"], {"info": info, "data_type": "shapes", "data_subtype": split,
                                 "annotations": annotations})
    _dump(files["karpathy"], {"dataset": "shapes", "images": karpathy})
    files["jsonl"].write_text("".join(json.dumps(line) + "\n" for line in lines))
    return files


def _remove_stale(out: Path, num_images: int) -> None:
    """Remove the images and shards an earlier, larger export left in ``out`` (by their names: other files stay),
    which a folder or a shard pattern would still find."""
    for path in (out / "images").glob("*.png"):
        if re.fullmatch(r"\d{12}\.png", path.name) and int(path.stem) > num_images:
            path.unlink()
    for path in (out / "shards").glob("*.tar"):
        if re.fullmatch(r"\d{5}\.tar", path.name) and int(path.stem) * SHARD_SIZE >= num_images:
            path.unlink()


def _dump(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data))
