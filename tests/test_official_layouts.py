"""The loaders on files written to the official layouts field by field (not by our exporter): Karpathy's
dataset_coco.json and dataset_flickr30k.json, VQA v2 questions + annotations, COCO captions + instances of the
same COCO 2014 images; each read through the source the shipped configs (or the README) document."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tests.test_metrics import _official_vqa_eval
from vlm.cli import main
from vlm.config import SourceConfig
from vlm.data.records import Region, detect_format, read_records

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# COCO 2014 images: (id, folder, Karpathy split). 184613 is a val2014 image in Karpathy's "restval" (trained on).
IMAGES = [(57870, "train2014", "train"), (384029, "train2014", "train"), (391895, "val2014", "test"),
          (522418, "val2014", "val"), (184613, "val2014", "restval")]
RAW = {57870: ["A restaurant has modern wooden tables and chairs.", "A long restaurant table with rattan rounded "
               "back chairs.", "a long table with a plant on top of it surrounded with wooden chairs ",
               "A long table with a flower arrangement in the middle for meetings",
               "A table is adorned with wooden chairs with blue accents."],
       384029: ["A man preparing desserts in a kitchen covered in frosting.", "A chef is preparing and decorating "
                "many small pastries.", "A baker prepares various types of baked goods.",
                "a close up of a person grabbing a pastry in a container", "Close up of a hand touching various "
                "pastries."],
       391895: ["A man with a red helmet on a small moped on a dirt road. ", "Man riding a motor bike on a dirt "
                "road on the countryside.", "A man riding on the back of a motorcycle.",
                "A dirt path with a young person on a motor bike rests to the foreground of a verdant area with a "
                "bridge and a background of cloud-wreathed mountains. ", "A man in a red shirt and a red hat is on "
                "a motorcycle on a hill side."],
       522418: ["A woman wearing a net on her head cutting a cake. ", "A woman cutting a large white sheet cake.",
                "A woman wearing a hair net cutting a large sheet cake.", "there is a woman that is cutting a white "
                "cake", "A woman marking a cake with the back of a chef's knife. "],
       184613: ["A child holding a flowered umbrella and petting a yak.", "A young man holding an umbrella next "
                "to a herd of cattle.", "a young boy barefoot holding an umbrella touching the horn of a cow",
                "A young boy with an umbrella who is touching the horn of a cow.", "A boy holding an umbrella while "
                "standing next to livestock."]}

# VQA v2: (question_id, image_id, question, question_type, answer_type, multiple_choice_answer, ten answers).
# The humans disagree, with the raw spellings the release has ("2 ", "Two", "yes?").
VQA = [(57870000, 57870, "What are the chairs made of?", "what are the", "other", "wood",
        ["wood", "wood", "wicker", "wood", "rattan", "wood", "wooden", "wood", "wicker", "wood"]),
       (57870001, 57870, "How many plants are on the table?", "how many", "number", "1",
        ["1", "1", "one", "1", "2", "1", "1", "1", "one", "1"]),
       (384029000, 384029, "Is the person wearing gloves?", "is the person", "yes/no", "no",
        ["no", "no", "no", "no", "yes?", "yes?", "yes", "no", "yes", "yes?"]),
       # The raw spelling "Two" is the most frequent; the release's normalised target is "2".
       (384029001, 384029, "How many gloves are there?", "how many", "number", "2",
        ["Two", "Two", "Two", "Two", "2", "2", "two", "2", "3", "2 "])]
CATEGORIES = [{"supercategory": "person", "id": 1, "name": "person"},
              {"supercategory": "furniture", "id": 62, "name": "chair"},
              {"supercategory": "furniture", "id": 67, "name": "dining table"},
              {"supercategory": "food", "id": 61, "name": "cake"}]
# Instances of the two train2014 images: (annotation id, image id, category id, bbox xywh, iscrowd).
INSTANCES = [(1, 57870, 62, [0.0, 1.5, 6.25, 9.0], 0), (2, 57870, 62, [10.0, 2.0, 5.0, 8.75], 0),
             (3, 57870, 67, [2.0, 8.0, 20.0, 6.5], 0), (4, 384029, 1, [1.0, 1.0, 30.0, 20.0], 1)]
FLICKR = [("1000092795.jpg", "train", ["Two young guys with shaggy hair look at their hands while hanging out in "
                                       "the yard.", "Two young, White males are outside near many bushes."]),
          ("10002456.jpg", "val", ["Several men in hard hats are operating a giant pulley system."]),
          ("1000268201.jpg", "test", ["A child in a pink dress is climbing up a set of stairs in an entry way."])]


def _name(image_id: int, folder: str) -> str:
    return f"COCO_{folder}_{image_id:012d}.jpg"


def _tokens(raw: str) -> list[str]:
    return raw.lower().replace(".", " ").replace(",", " ").split()


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 24), (120, 60, 30)).save(path)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A folder laid out as the shipped configs expect under data/ (COCO, VQA) and a Flickr30k copy."""
    root = tmp_path_factory.mktemp("official")
    coco = root / "data" / "coco"
    info = {"description": "COCO 2014 Dataset", "version": "1.0", "year": 2014}
    licenses = [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1, "name": "Attribution"}]
    sentid, karpathy = 0, []
    for imgid, (image_id, folder, split) in enumerate(IMAGES):
        _image(coco / folder / _name(image_id, folder))
        sentences = [{"tokens": _tokens(raw), "raw": raw, "imgid": imgid, "sentid": sentid + k}
                     for k, raw in enumerate(RAW[image_id])]
        karpathy.append({"filepath": folder, "sentids": [s["sentid"] for s in sentences], "filename":
                         _name(image_id, folder), "imgid": imgid, "split": split, "sentences": sentences,
                         "cocoid": image_id})
        sentid += len(sentences)
    _write(coco / "dataset_coco.json", {"images": karpathy, "dataset": "coco"})
    for folder in ("train2014", "val2014"):
        images = [{"license": 1, "file_name": _name(i, f), "coco_url": f"http://images.cocodataset.org/{f}/"
                   f"{_name(i, f)}", "height": 24, "width": 32, "date_captured": "2013-11-14 11:18:45",
                   "flickr_url": "http://farm4.staticflickr.com/1/1.jpg", "id": i} for i, f, _ in IMAGES if f == folder]
        captions = [{"image_id": image["id"], "id": 100 * image["id"] + k, "caption": raw}
                    for image in images for k, raw in enumerate(RAW[image["id"]])]
        _write(coco / "annotations" / f"captions_{folder}.json",
               {"info": info, "images": images, "licenses": licenses, "annotations": captions})
        if folder == "train2014":
            instances = [{"segmentation": {"counts": [0, 600, 168], "size": [24, 32]} if crowd else
                          [[x, y, x + w, y, x + w, y + h, x, y + h]], "area": w * h, "iscrowd": crowd,
                          "image_id": image_id, "bbox": [x, y, w, h], "category_id": category, "id": ann_id}
                         for ann_id, image_id, category, (x, y, w, h), crowd in INSTANCES]
            _write(coco / "annotations" / "instances_train2014.json",
                   {"info": info, "images": images, "licenses": licenses, "annotations": instances,
                    "categories": CATEGORIES})
    header = {"info": {"description": "This is v2.0 of the VQA dataset.", "version": "2.0", "year": 2017},
              "license": {"url": "http://creativecommons.org/licenses/by/4.0/", "name": "CC BY 4.0"},
              "data_subtype": "train2014", "data_type": "mscoco"}
    _write(root / "data/vqa/v2_OpenEnded_mscoco_train2014_questions.json",
           {**header, "task_type": "Open-Ended", "questions": [
               {"image_id": image_id, "question": question, "question_id": qid}
               for qid, image_id, question, *_ in VQA]})
    confidence = ["yes", "yes", "maybe", "yes", "no", "yes", "maybe", "yes", "yes", "yes"]
    _write(root / "data/vqa/v2_mscoco_train2014_annotations.json", {**header, "annotations": [
        {"question_type": qtype, "multiple_choice_answer": mc, "answers": [
            {"answer": a, "answer_confidence": confidence[k], "answer_id": k + 1} for k, a in enumerate(answers)],
         "image_id": image_id, "answer_type": atype, "question_id": qid}
        for qid, image_id, _, qtype, atype, mc, answers in VQA]})
    flickr, sentid = [], 0
    for imgid, (filename, split, raws) in enumerate(FLICKR):
        _image(root / "data/flickr30k/flickr30k-images" / filename)
        sentences = [{"tokens": _tokens(raw), "raw": raw, "imgid": imgid, "sentid": sentid + k}
                     for k, raw in enumerate(raws)]
        flickr.append({"sentids": [s["sentid"] for s in sentences], "imgid": imgid, "sentences": sentences,
                       "split": split, "filename": filename})
        sentid += len(sentences)
    _write(root / "data/flickr30k/dataset_flickr30k.json", {"images": flickr, "dataset": "flickr30k"})
    return root


def _documented(config: str, key: str, index: int, root: Path) -> SourceConfig:
    """A source of a shipped config, its data/... paths moved under root."""
    entry = yaml.safe_load((CONFIGS / config).read_text())["data"][key][index]
    moved = {k: str(root / v) if k in ("path", "images", "annotations") else v for k, v in entry.items()}
    return SourceConfig(**moved)


def _read(source: SourceConfig):
    records, report = read_records(source)
    assert report.problems == []
    return records


def _clean(raw: str) -> str:
    return " ".join(raw.split())


@pytest.mark.parametrize(("key", "split", "expected"), [
    ("sources", "train", [57870, 384029, 184613]),  # restval is trained on
    ("val_sources", "val", [522418]),
])
def test_karpathy_coco_through_the_shipped_config(root, key, split, expected) -> None:
    source = _documented("coco_vit_b16.yaml", key, 0, root)
    assert source.split == split and source.format == "karpathy"
    records = _read(source)
    assert [r.image_id for r in records] == expected
    folders = {image_id: folder for image_id, folder, _ in IMAGES}
    for r in records:
        assert Path(r.image) == root / "data/coco" / folders[r.image_id] / _name(r.image_id, folders[r.image_id])
        assert r.captions == [_clean(raw) for raw in RAW[r.image_id]]
        assert r.questions == [] and r.regions == []


def test_karpathy_test_split_and_format_detection(root) -> None:
    source = _documented("coco_vit_b16.yaml", "val_sources", 0, root)
    test = _read(SourceConfig(source.path, images=source.images, split="test"))  # format: auto
    assert detect_format(SourceConfig(source.path)) == "karpathy"
    assert [r.image_id for r in test] == [391895]
    assert sorted(r.image_id for r in _read(SourceConfig(source.path, images=source.images))) == sorted(RAW)


def test_flickr30k_karpathy_file(root) -> None:
    folder = root / "data/flickr30k/flickr30k-images"
    path = str(root / "data/flickr30k/dataset_flickr30k.json")
    assert detect_format(SourceConfig(path)) == "karpathy"
    for imgid, (filename, split, raws) in enumerate(FLICKR):
        records = _read(SourceConfig(path, format="karpathy", images=str(folder), split=split))
        assert [(r.image_id, Path(r.image), r.captions) for r in records] == [(imgid, folder / filename, raws)]


def test_vqa_v2_through_the_shipped_config(root) -> None:
    source = _documented("vqav2.yaml", "sources", 0, root)
    assert source.format == "vqa" and detect_format(SourceConfig(source.path)) == "vqa"
    records = _read(source)
    assert [r.image_id for r in records] == [57870, 384029]
    for r in records:
        assert Path(r.image) == root / "data/coco/train2014" / _name(r.image_id, "train2014")
        asked = [v for v in VQA if v[1] == r.image_id]
        assert [(q.question_id, q.question, q.answers, q.answer_type) for q in r.questions] == \
               [(qid, question, answers, atype) for qid, _, question, _, atype, _, answers in asked]
        assert [q.answer for q in r.questions] == [v[5] for v in asked]  # the training target: multiple_choice_answer


def test_vqa_image_names_missing_images_are_reported_by_their_official_name(root, tmp_path) -> None:
    source = _documented("multitask.yaml", "sources", 1, root)
    empty = tmp_path / "train2014"
    empty.mkdir()
    records, report = read_records(SourceConfig(source.path, format="vqa", images=str(empty),
                                                annotations=source.annotations), strict=False)
    assert records == [] and len(report.problems) == 2
    assert str(empty / _name(57870, "train2014")) in report.problems[0]


def test_vqa_test_dev_questions_find_the_test2015_images_and_cannot_be_scored(root, tmp_path, capsys) -> None:
    folder = tmp_path / "test2015"
    _image(folder / _name(262144, "test2015"))
    questions = tmp_path / "v2_OpenEnded_mscoco_test-dev2015_questions.json"
    _write(questions, {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {},
                       "data_subtype": "test-dev2015", "questions": [
                           {"image_id": 262144, "question": "What is the fence made of?", "question_id": 262144000}]})
    records = _read(SourceConfig(str(questions), images=str(folder)))
    assert [(Path(r.image), [q.answers for q in r.questions]) for r in records] == [
        (folder / _name(262144, "test2015"), [[]])]
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"question_id": 262144000, "answer": "wood"}]))
    assert main(["eval", "--results", str(results), "--data", str(questions), "--out", str(tmp_path / "out")]) == 1
    assert "question_id 262144000 has no human answers" in capsys.readouterr().err


def test_coco_captions_and_instances_of_the_same_images(root) -> None:
    captions = _documented("multitask.yaml", "sources", 0, root)
    assert captions.format == "coco" and detect_format(SourceConfig(captions.path)) == "coco"
    records = _read(captions)
    assert [(r.image_id, Path(r.image), r.captions) for r in records] == [
        (i, root / "data/coco/train2014" / _name(i, "train2014"), [_clean(raw) for raw in RAW[i]])
        for i in (57870, 384029)]
    val = _read(_documented("multitask.yaml", "val_sources", 0, root))
    assert [r.image_id for r in val] == [184613, 391895, 522418]
    instances_path = str(root / "data/coco/annotations/instances_train2014.json")
    instances = _read(SourceConfig(instances_path, images=captions.images))
    names = {c["id"]: c["name"] for c in CATEGORIES}
    assert [(r.image_id, r.regions) for r in instances] == [
        (i, [Region(names[c], tuple(box)) for _, image_id, c, box, _ in INSTANCES if image_id == i])
        for i in (57870, 384029)]
    assert [r.image for r in instances] == [r.image for r in records]
    # One source: the captions, and as regions the boxes of the instances file of the same images.
    both = _read(SourceConfig(captions.path, images=captions.images, annotations=instances_path))
    assert [(r.image_id, r.captions, r.regions) for r in both] == [
        (r.image_id, r.captions, i.regions) for r, i in zip(records, instances, strict=True)]


def test_scoring_official_vqa_files_needs_no_images(root, tmp_path, capsys) -> None:
    source = _documented("vqav2.yaml", "sources", 0, root)
    predictions = {57870000: "Wood", 57870001: "one", 384029000: "yes"}
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"question_id": k, "answer": v} for k, v in predictions.items()]))
    code = main(["eval", "--results", str(results), "--data", source.path, "--annotations", source.annotations,
                 "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    vqa = json.loads(captured.out)["vqa"]
    official = {qid: _official_vqa_eval(predictions[qid], answers) for qid, *_, answers in VQA if qid in predictions}
    # 5 and 7 humans agree; "yes?" is no "yes" to the official script, so 2 humans said "yes" (not 5).
    assert official == pytest.approx({57870000: 1.0, 57870001: 1.0, 384029000: 0.6})
    assert vqa["accuracy"] == pytest.approx(sum(official.values()) / 3)
    assert vqa["accuracy/yes/no"] == pytest.approx(official[384029000])
