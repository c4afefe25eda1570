"""Datasets on disk: every loader round-trips `vlm data shapes`, bad records are reported, sources train."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlm.cli import main
from vlm.config import DataConfig, SourceConfig
from vlm.data.batch import caption_sequence, collate, question_sequence
from vlm.data.datasets import Mixture, RecordDataset, Sampler, ShardDataset, SourceData, mixture_weights
from vlm.data.export import answer_type, write_shapes
from vlm.data.records import Region, detect_format, read_records
from vlm.data.scenes import make_scene
from vlm.errors import VLMError

NUM = 12


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, Path]:
    return write_shapes(tmp_path_factory.mktemp("shapes"), NUM, split="val")


@pytest.fixture(scope="module")
def scenes():
    return [make_scene(i, "val") for i in range(NUM)]


def _same_image(path: str, scene) -> bool:
    return np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(scene.image))


def test_coco_captions_round_trip(shapes, scenes):
    records, report = read_records(SourceConfig(str(shapes["captions"]), images=str(shapes["images"])))
    assert detect_format(SourceConfig(str(shapes["captions"]))) == "coco" and report.skipped == 0
    assert [r.captions for r in records] == [s.captions for s in scenes]
    assert all(_same_image(r.image, s) for r, s in zip(records, scenes, strict=True))


def test_coco_instances_round_trip_boxes(shapes, scenes):
    records, _ = read_records(SourceConfig(str(shapes["instances"]), images=str(shapes["images"])))
    for r, s in zip(records, scenes, strict=True):
        assert sorted((g.phrase, g.bbox) for g in r.regions) == sorted(
            (f"{o.color} {o.shape}", tuple(o.box)) for o in s.objects)


def test_vqa_round_trip_keeps_ten_answers_and_types(shapes, scenes):
    source = SourceConfig(str(shapes["questions"]), images=str(shapes["images"]),
                          annotations=str(shapes["annotations"]))
    records, _ = read_records(source)
    assert detect_format(source) == "vqa"
    for r, s in zip(records, scenes, strict=True):
        assert [q.question for q in r.questions] == [q.question for q in s.questions]
        assert all(len(q.answers) == 10 and q.answer == t.answer and q.answer_type == answer_type(t.answer)
                   for q, t in zip(r.questions, s.questions, strict=True))
        assert _same_image(r.image, s)


def test_karpathy_splits(shapes, scenes):
    parts = {split: read_records(SourceConfig(str(shapes["karpathy"]), images=str(shapes["images"]), split=split))[0]
             for split in ("train", "val", "test")}
    assert [len(parts[s]) for s in ("train", "val", "test")] == [10, 1, 1]  # 80/10/10 of 12
    everything = sorted((r.image_id, tuple(r.captions)) for p in parts.values() for r in p)
    assert everything == [(i + 1, tuple(s.captions)) for i, s in enumerate(scenes)]


def test_jsonl_merges_lines_of_one_image(shapes, scenes):
    records, report = read_records(SourceConfig(str(shapes["jsonl"])))
    assert report.skipped == 0 and len(records) == NUM
    for r, s in zip(records, scenes, strict=True):
        assert r.captions == s.captions
        assert [(q.question, q.answers) for q in r.questions] == [(q.question, [q.answer]) for q in s.questions]
        assert [g.bbox for g in r.regions] == [tuple(o.box) for o in s.objects]
        assert _same_image(r.image, s)


def test_webdataset_shard_streams_the_same_samples(shapes, scenes, tokenizer):
    source = SourceConfig(str(shapes["shards"] / "00000.tar"))
    assert detect_format(source) == "webdataset"
    cfg = DataConfig(captions_per_image=5, questions_per_image=0)
    transform = lambda im: torch.from_numpy(np.asarray(im).copy())  # noqa: E731
    items = list(ShardDataset(source, Sampler(cfg, tokenizer, transform, train=False), strict=True, repeat=False))
    assert len(items) == NUM
    for (pixels, (captions, _), _), scene in zip(items, scenes, strict=True):
        assert np.array_equal(pixels.numpy(), np.asarray(scene.image))
        decoded = sorted(tokenizer.decode(ids[1:]) for ids, _, _ in captions)
        assert decoded == sorted(tokenizer.decode(tokenizer.encode(c)) for c in scene.captions)


def test_bad_records_are_reported_with_file_and_line(tmp_path, shapes):
    jsonl = tmp_path / "bad.jsonl"
    image = shapes["images"] / "000000000001.png"
    jsonl.write_text("\n".join([
        json.dumps({"image": str(image), "captions": ["a fine caption"]}),
        json.dumps({"image": "missing.png", "captions": ["an image that is not there"]}),
        json.dumps({"image": str(image), "captions": ["  "]}),
        '{"image": "broken", "captions": [',
        json.dumps({"image": str(image), "question": "what?", "answers": []}),
    ]) + "\n")
    records, report = read_records(SourceConfig(str(jsonl)), strict=False)
    assert len(records) == 1 and report.skipped == 4
    assert [p.split(": ")[0] for p in report.problems] == [f"{jsonl}:{n}" for n in (3, 4, 5, 2)]
    assert "missing.png not found" in report.problems[-1] and "invalid JSON" in report.problems[1]
    with pytest.raises(VLMError, match=f"{jsonl}:3: empty or missing caption"):
        read_records(SourceConfig(str(jsonl)), strict=True)


def test_unreadable_image_is_skipped_and_counted_or_stops(tmp_path, tokenizer, shapes):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps({"image": "broken.png", "captions": ["x"]}) + "\n"
                     + json.dumps({"image": str(shapes["images"] / "000000000002.png"), "captions": ["y"]}) + "\n")
    records, _ = read_records(SourceConfig(str(jsonl)))
    sampler = Sampler(DataConfig(), tokenizer, lambda im: torch.zeros(1), train=False)
    lenient = RecordDataset(records, sampler, strict=False)
    assert lenient[0][2] == 1 and int(lenient.skipped) == 1  # the next readable record stands in
    with pytest.raises(VLMError, match=rf"{jsonl}:1: .*broken.png"):
        RecordDataset(records, sampler, strict=True)[0]


def test_validate_cli_reports_and_exits_nonzero(tmp_path, shapes, capsys):
    assert main(["data", "validate", str(shapes["captions"]), "--images", str(shapes["images"])]) == 0
    assert f"{NUM} images, {NUM * 5} captions" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "nope.png", "captions": ["a"]}) + "\n")
    assert main(["data", "validate", str(bad)]) == 1
    out, err = capsys.readouterr()
    assert f"{bad}:1: image file" in out and err.strip().endswith("1 problem(s) found") and len(err.splitlines()) == 1


def test_collate_gives_images_without_questions_empty_rows(tokenizer):
    tok = tokenizer
    with_q = (torch.zeros(3, 4, 4), [[caption_sequence(tok, "a red circle", [])],
                                     [question_sequence(tok, "is it red ?", "yes")] * 2], 0)
    without_q = (torch.zeros(3, 4, 4), [[caption_sequence(tok, "a blue square", [])], []], 1)
    batch = collate([with_q, without_q], pad_id=tok.pad_id)
    ids, labels = batch.ids[1], batch.labels[1]
    assert ids.shape[0] == 4  # two rows per image, image-major
    assert (labels[2:] == -100).all() and (labels[:2] != -100).any()


def test_mixture_draws_sources_by_weight():
    weights = mixture_weights([100, 10], [1.0, 3.0])
    draws = torch.multinomial(weights, 20000, replacement=True, generator=torch.Generator().manual_seed(0))
    assert abs((draws >= 100).float().mean().item() - 0.75) < 0.02


def test_flip_never_when_texts_mention_sides(tokenizer):
    cfg = DataConfig(hflip=1.0)
    sampler = Sampler(cfg, tokenizer, lambda im: torch.from_numpy(np.asarray(im).copy()), train=True)
    image = Image.fromarray(np.arange(12, dtype=np.uint8).reshape(2, 6).repeat(3).reshape(2, 6, 3))
    flipped = sampler(image, ["a red circle"], [], 0)[0].numpy()
    kept = sampler(image, ["a red circle to the left of a square"], [], 0)[0].numpy()
    assert np.array_equal(flipped, np.asarray(image)[:, ::-1]) and np.array_equal(kept, np.asarray(image))


def test_record_regions_ground_captions_and_follow_a_flip_but_not_a_crop(shapes, scenes, tokenizer):
    records, _ = read_records(SourceConfig(str(shapes["jsonl"])))
    record, scene = records[0], scenes[0]
    image = Image.open(record.image).convert("RGB")
    W, H = image.size

    def grounded(**data) -> dict:  # the model's input images are 40 x 30 pixels: the boxes are in its pixels
        sampler = Sampler(DataConfig(captions_per_image=1, **data), tokenizer, lambda im: torch.zeros(3, 30, 40),
                          train=True)
        _, (captions, _), _ = sampler(image, ["a red circle and a blue square"], [], 0,
                                      [Region("red circle", (8, 16, 16, 8)), Region("blue square", (40, 0, 8, 8))])
        return {box: [captions[0][0][p + 1] for p, b in captions[0][2] if b == box] for _, box in captions[0][2]}

    sx, sy = 40 / W, 30 / H
    plain = grounded()
    assert plain == {(8 * sx, 16 * sy, 16 * sx, 8 * sy): tokenizer.encode("red circle"),
                     (40 * sx, 0.0, 8 * sx, 8 * sy): tokenizer.encode("blue square")}
    flipped = grounded(hflip=1.0)  # no side words: always flipped, and the boxes mirror with the image
    assert flipped == {((W - 24) * sx, 16 * sy, 16 * sx, 8 * sy): tokenizer.encode("red circle"),
                       ((W - 48) * sx, 0.0, 8 * sx, 8 * sy): tokenizer.encode("blue square")}
    assert grounded(crop_scale=0.5) == {}  # a random crop moves the regions: none are kept
    dataset = RecordDataset(records, Sampler(DataConfig(captions_per_image=5), tokenizer,
                                             lambda im: torch.zeros(3, 64, 64), train=False), strict=True)
    captions = dataset[0][1][0]
    assert max(len(g) for _, _, g in captions) == 2 * len(scene.objects)  # the caption naming every "colour shape"


def test_mixture_indexes_sources_and_references(shapes, tokenizer):
    a, _ = read_records(SourceConfig(str(shapes["captions"]), images=str(shapes["images"])))
    b, _ = read_records(SourceConfig(str(shapes["questions"]), images=str(shapes["images"]),
                                     annotations=str(shapes["annotations"])))
    sampler = Sampler(DataConfig(), tokenizer, lambda im: torch.zeros(1), train=False)
    mix = Mixture([RecordDataset(a, sampler, True), RecordDataset(b, sampler, True)])
    assert len(mix) == 2 * NUM and mix[NUM + 1][2] == NUM + 1
    assert mix.references(0)["captions"] == a[0].captions
    assert mix.references(NUM)["questions"][0]["answers"] == b[0].questions[0].answers


def test_source_data_texts_cover_captions_questions_answers(shapes):
    data = SourceData([SourceConfig(str(shapes["jsonl"]))], strict=True)
    texts = data.texts(10_000)
    scene = make_scene(0, "val")
    assert scene.captions[0] in texts and scene.questions[0].question in texts and scene.questions[0].answer in texts


def test_shards_mix_with_files_by_weight(shapes, tokenizer):
    from vlm.data.datasets import RecordStream, StreamMixture

    cfg = DataConfig(captions_per_image=1, questions_per_image=0)
    from_files = Sampler(cfg, tokenizer, lambda im: torch.zeros(1), train=True)  # the tensor tells the source
    from_shards = Sampler(cfg, tokenizer, lambda im: torch.ones(1), train=True)
    records, _ = read_records(SourceConfig(str(shapes["captions"]), images=str(shapes["images"])))
    files = RecordStream(RecordDataset(records, from_files, True), seed=0)
    shards = ShardDataset(SourceConfig(str(shapes["shards"] / "00000.tar")), from_shards, strict=True)
    items = [item for _, item in zip(range(400), StreamMixture([files, shards], [1.0, 3.0], seed=0), strict=False)]
    assert [index for _, _, index in items] == list(range(400))  # endless: both outlast their NUM samples
    assert abs(np.mean([image.item() for image, _, _ in items]) - 0.75) < 0.07


def test_streamed_and_file_sources_make_training_batches(shapes, tokenizer):
    from vlm.data.module import DataModule

    sources = [SourceConfig(str(shapes["shards"] / "00000.tar")),
               SourceConfig(str(shapes["questions"]), images=str(shapes["images"]),
                            annotations=str(shapes["annotations"]))]
    cfg = DataConfig(sources=sources, batch_size=4, num_workers=0, questions_per_image=2)
    data = DataModule(cfg, tokenizer, lambda im: torch.zeros(3, 8, 8), 8)  # reads the sources itself
    batch = next(iter(data.train_dataloader()))
    assert batch.images.shape == (4, 3, 8, 8) and batch.tasks == ["caption", "vqa"]
    assert batch.ids[1].shape[0] == 8  # two question rows per image, empty ones for shard images without questions
    assert data.val_dataloader() == []


def test_flat_records_round_trip_exactly_and_the_data_keeps_them_flat(shapes):
    from vlm.data.datasets import FlatRecords

    vqa = SourceConfig(str(shapes["questions"]), images=str(shapes["images"]), annotations=str(shapes["annotations"]))
    jsonl = SourceConfig(str(shapes["jsonl"]))  # captions, questions and regions
    for source in (vqa, jsonl):
        records, _ = read_records(source)
        flat = FlatRecords(records)
        assert len(flat) == NUM and list(flat) == records and flat[-1] == records[-1] and flat[3] == records[3]
        with pytest.raises(IndexError):
            flat[NUM]
    data = SourceData([vqa, jsonl], strict=True)
    assert all(isinstance(r, FlatRecords) for r in data.records)


BAD_BOXES = [[1, 2, float("nan"), 3], [1, 2, -3, 3], [1, 2, 3], None, [1, 2, 0, 3], [1, 2, True, 3]]


def test_bad_bboxes_are_reported_by_line_or_annotation_and_skipped(tmp_path, shapes):
    """A box must be 4 finite numbers with w > 0 and h > 0 (a NaN one made the grounding loss NaN), in JSONL regions
    and COCO instances alike."""
    image = str(shapes["images"] / "000000000001.png")
    jsonl = tmp_path / "boxes.jsonl"
    jsonl.write_text("\n".join(json.dumps({"image": image, "captions": ["a red circle"],
                                           "regions": [{"phrase": "red circle", "bbox": box}]})
                               for box in [[1, 2, 3, 4], *BAD_BOXES]) + "\n")
    records, report = read_records(SourceConfig(str(jsonl)), strict=False)
    assert [g.bbox for r in records for g in r.regions] == [(1.0, 2.0, 3.0, 4.0)]
    assert [p.split(": ")[0] for p in report.problems] == [f"{jsonl}:{n}" for n in range(2, 2 + len(BAD_BOXES))]
    assert all(": bad bbox " in p for p in report.problems) and "bad bbox [1, 2, NaN, 3]" in report.problems[0]
    with pytest.raises(VLMError, match=rf"^{jsonl}:2: bad bbox \[1, 2, NaN, 3\]"):
        read_records(SourceConfig(str(jsonl)), strict=True)

    coco = json.loads(shapes["instances"].read_text())
    good = [tuple(a["bbox"]) for a in coco["annotations"] if a["image_id"] == 1]
    coco["annotations"] += [{"id": 1000 + n, "image_id": 1, "bbox": box, "category_id": 1}
                            for n, box in enumerate(BAD_BOXES)]
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps(coco))
    records, report = read_records(SourceConfig(str(instances), images=str(shapes["images"])), strict=False)
    assert report.problems == [f"{instances}: image 1 annotation {1000 + n}: bad bbox {json.dumps(box)}: "
                               "expected [x, y, w, h]: 4 finite numbers with w > 0 and h > 0"
                               for n, box in enumerate(BAD_BOXES)]
    assert [g.bbox for g in records[0].regions] == good and len(records) == NUM


def test_null_regions_are_none_and_other_non_lists_are_reported(tmp_path, shapes):
    image = str(shapes["images"] / "000000000001.png")
    jsonl = tmp_path / "regions.jsonl"
    jsonl.write_text("\n".join(json.dumps({"image": image, "captions": [caption], "regions": regions})
                               for caption, regions in [("a", None), ("b", {"phrase": "x"}), ("c", "x")]) + "\n")
    records, report = read_records(SourceConfig(str(jsonl)), strict=False)
    assert [r.captions for r in records] == [["a"]] and records[0].regions == []
    assert report.problems == [f'{jsonl}:{n}: "regions" must be a list' for n in (2, 3)]


def test_a_line_that_is_not_utf8_is_reported_by_its_number_and_the_others_are_read(tmp_path, shapes):
    image = str(shapes["images"] / "000000000001.png")
    jsonl = tmp_path / "latin1.jsonl"
    lines = [json.dumps({"image": image, "captions": [caption]}, ensure_ascii=False)
             for caption in ["a red circle", "un caf\xe9 rouge", "a blue square"]]
    jsonl.write_bytes("\n".join(lines).encode("latin-1") + b"\n")  # only line 2 differs from UTF-8
    records, report = read_records(SourceConfig(str(jsonl)), strict=False)
    assert records[0].captions == ["a red circle", "a blue square"]
    assert len(report.problems) == 1 and report.problems[0].startswith(f"{jsonl}:2: not UTF-8")
    with pytest.raises(VLMError, match=rf"^{jsonl}:2: not UTF-8"):
        read_records(SourceConfig(str(jsonl)), strict=True)


def test_duplicate_coco_image_ids_and_vqa_question_ids_are_reported_not_merged(tmp_path, shapes):
    coco = json.loads(shapes["captions"].read_text())
    coco["images"][1]["id"] = 1  # two files claim image 1
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps(coco))
    records, report = read_records(SourceConfig(str(captions), images=str(shapes["images"])), strict=False)
    assert report.problems == [f'{captions}: image 1: 2 entries of "images" have this id (ids must be unique)']
    assert 1 not in [r.image_id for r in records] and len(records) == NUM - 2  # image 2's entry now says 1 too

    questions = json.loads(shapes["questions"].read_text())
    annotations = json.loads(shapes["annotations"].read_text())
    questions["questions"][1]["question_id"] = questions["questions"][0]["question_id"]
    annotations["annotations"].append(dict(annotations["annotations"][2]))  # question 2 annotated twice
    q_path, a_path = tmp_path / "questions.json", tmp_path / "annotations.json"
    q_path.write_text(json.dumps(questions))
    a_path.write_text(json.dumps(annotations))
    records, report = read_records(SourceConfig(str(q_path), images=str(shapes["images"]), annotations=str(a_path)),
                                   strict=False)
    first, third = questions["questions"][0]["question_id"], questions["questions"][2]["question_id"]
    assert report.problems == [
        f"{q_path}: questions[0]: question_id {first} is the id of 2 questions (ids must be unique)",
        f"{q_path}: questions[1]: question_id {first} is the id of 2 questions (ids must be unique)",
        f"{q_path}: questions[2]: question_id {third} has 2 annotations in {a_path}"]
    asked = [q.question_id for r in records for q in r.questions]
    assert len(asked) == len(questions["questions"]) - 3 and first not in asked and third not in asked


def test_source_weights_must_be_positive_naming_the_source(shapes):
    good = SourceConfig(str(shapes["jsonl"]))
    for weight in (0.0, -1.0, float("nan")):
        bad = SourceConfig(str(shapes["jsonl"]), weight=weight)
        with pytest.raises(VLMError, match=rf"^data.sources\[1\].weight: expected a positive number, got {weight}$"):
            SourceData([good, bad], strict=False)
    assert SourceData([good, SourceConfig(str(shapes["jsonl"]), weight=0.5)], strict=False).records[1]


def test_a_source_of_regions_alone_is_an_error_before_training(shapes):
    """Regions only ground caption words: a source with no caption or question would train nothing."""
    instances = SourceConfig(str(shapes["instances"]), images=str(shapes["images"]))
    with pytest.raises(VLMError, match=f"^{shapes['instances']}: no captions or questions to train on"):
        SourceData([instances], strict=False)
    both = SourceConfig(str(shapes["captions"]), images=str(shapes["images"]), annotations=str(shapes["instances"]))
    assert all(r.regions and r.captions for r in SourceData([both], strict=False).records[0])


def test_writing_fewer_shapes_over_an_earlier_export_leaves_no_stale_image_or_shard(tmp_path):
    """A folder or shard pattern read after a smaller rerun found the earlier run's extra images and shards."""
    write_shapes(tmp_path, 102)  # two shards
    (tmp_path / "images" / "mine.png").write_bytes(b"a user's file")
    files = write_shapes(tmp_path, 3)
    assert sorted(p.name for p in files["images"].iterdir()) == [f"{i:012d}.png" for i in (1, 2, 3)] + ["mine.png"]
    assert [p.name for p in files["shards"].iterdir()] == ["00000.tar"]
    with tarfile.open(files["shards"] / "00000.tar") as tar:
        assert len(tar.getnames()) == 3 * 3


@pytest.mark.parametrize("args, message", [
    (["--image_size", "4"], "scene image size 4 (--image_size, or the model's encoder.image_size): the built-in scenes "
                            "are square, with a side of at least 16 pixels"),
    (["--split", "test"], "scene split 'test' (--split): expected one of train, val"),
    (["--num_images", "0"], "--num_images 0: at least 1")])
def test_vlm_data_shapes_refuses_sizes_splits_and_counts_it_cannot_write(tmp_path, capsys, args, message):
    """An image side below 10 placed objects forever (the command hung); 1 or 2 failed deep in numpy."""
    assert main(["data", "shapes", "--out", str(tmp_path / "out"), "--num_images", "2", *args]) == 1
    assert capsys.readouterr().err.strip() == f"vlm data: error: {message}"


class _Keys:
    """A stand-in for a RecordDataset of 5 records: each item is its key, so a stream's order is what it yields."""

    def __len__(self) -> int:
        return 5

    def __getitem__(self, key):
        return key, "groups", None


def test_a_resumed_file_stream_or_mixture_goes_on_where_it_would_be_after_skip_items(monkeypatch):
    """`items(skip)` (a resumed run's stream) equals the stream with its first ``skip`` items dropped, for skips
    inside an epoch and across whole epochs, which it neither reads nor draws."""
    from itertools import islice

    from vlm.data import datasets
    from vlm.data.datasets import RecordStream, StreamMixture

    stream = RecordStream(_Keys(), seed=0)
    full = list(islice(stream.items(), 40))
    epochs = [full[e * 5:(e + 1) * 5] for e in range(8)]
    assert all(sorted(key for key, _, _ in epoch) == [(i, e) for i in range(5)] for e, epoch in enumerate(epochs))
    assert len({tuple(i for (i, _), _, _ in epoch) for epoch in epochs}) > 1  # each epoch in an order of its own
    for skip in range(30):
        assert list(islice(stream.items(skip), 10)) == full[skip:skip + 10]
    mixture = StreamMixture([RecordStream(_Keys(), 1), RecordStream(_Keys(), 2)], [0.3, 0.7], seed=0)
    full = list(islice(mixture.items(), 40))
    for skip in range(30):
        assert list(islice(mixture.items(skip), 10)) == full[skip:skip + 10]
    monkeypatch.setattr(datasets, "_stream_position", lambda: (7, 8))  # reader 7 of 8, for 5 records
    with pytest.raises(VLMError, match="5 records for 8 readers .* reader 7 gets none"):
        next(stream.items())
