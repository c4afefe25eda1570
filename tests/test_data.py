import re

import numpy as np
import pytest
import torch

from vlm.config import DataConfig
from vlm.data.batch import IGNORE_INDEX, caption_sequence, collate
from vlm.data.builtin import SceneDataset
from vlm.data.scenes import COLORS, SHAPES, make_scene


def test_scenes_are_deterministic_and_splits_differ():
    a, b = make_scene(7, "val"), make_scene(7, "val")
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert a.captions == b.captions and [q.answer for q in a.questions] == [q.answer for q in b.questions]
    assert a.captions != make_scene(7, "train").captions or a.objects != make_scene(7, "train").objects


@pytest.mark.parametrize("index", range(40))
def test_scene_texts_agree_with_its_objects(index):
    scene = make_scene(index, "val")
    objects = scene.objects
    assert 1 <= len(objects) <= 4
    assert len({(o.color, o.shape) for o in objects}) == len(objects)
    assert [o.center_x for o in objects] == sorted(o.center_x for o in objects)
    assert len(set(scene.captions)) == 5
    for o in objects:
        assert o.color in COLORS and o.shape in SHAPES
        assert o.phrase in scene.captions[0]  # the first caption names every object
        x, y, w, h = o.box
        assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64
        # the object's colour dominates the centre of its box
        pixel = np.asarray(scene.image)[int(y + h / 2), int(x + w / 2)]
        assert np.abs(pixel.astype(int) - COLORS[o.color]).max() < 40
    kinds = {q.question_type for q in scene.questions}
    assert {"size", "count", "exist"} <= kinds
    for q in scene.questions:
        if q.question_type == "spatial":
            obj = next(o for o in objects if f"{o.color} {o.shape}" in q.question)
            assert q.answer == ("left" if obj.center_x < 32 else "right")
        if q.question == "how many objects are there?":
            assert q.answer == str(len(objects))
        if q.question_type == "exist":
            color, shape = q.question.rstrip("?").split()[-2:]
            assert q.answer == ("yes" if any(o.color == color and o.shape == shape for o in objects) else "no")


def test_question_kinds_cover_all_six_and_binary_answers_are_balanced():
    questions = [q for i in range(300) for q in make_scene(i, "val").questions]
    assert {q.question_type for q in questions} == {"color", "shape", "size", "count", "exist", "spatial"}
    yes_no = [q.answer for q in questions if q.question_type == "exist"]
    assert 0.4 < yes_no.count("yes") / len(yes_no) < 0.6
    sides = [q.answer for q in questions if q.question_type == "spatial"]
    assert set(sides) == {"left", "right"} and 0.4 < sides.count("left") / len(sides) < 0.6


def test_collate_learns_only_what_follows_the_prompt(tokenizer):
    cfg = DataConfig(captions_per_image=1, questions_per_image=2)
    dataset = SceneDataset("val", cfg, tokenizer, lambda im: torch.zeros(3, 64, 64), 64)
    batch = collate([dataset[i] for i in range(4)], pad_id=tokenizer.pad_id)
    assert batch.images.shape == (4, 3, 64, 64)
    assert batch.tasks == ["caption", "vqa"]
    assert [ids.shape[0] for ids in batch.ids] == [4, 8]  # 1 caption and 2 questions per image, image-major
    assert all(tokenizer.sep_id not in row for row in batch.ids[0].tolist())
    assert all(tokenizer.sep_id in row for row in batch.ids[1].tolist())
    for ids, labels in zip(batch.ids, batch.labels, strict=True):
        for row_ids, row_labels in zip(ids.tolist(), labels.tolist(), strict=True):
            learned = [t for t in row_labels if t != IGNORE_INDEX]
            assert learned[-1] == tokenizer.eos_id
            if tokenizer.sep_id in row_ids:  # question: only the answer and the end token are learned
                sep = row_ids.index(tokenizer.sep_id)
                assert all(t == IGNORE_INDEX for t in row_labels[:sep])
                assert row_labels[sep:sep + len(learned)] == learned
            else:  # caption: everything after [BOS]
                assert row_ids[0] == tokenizer.bos_id
                assert row_labels[:len(learned)] == learned
            # labels are the inputs shifted by one (the end token has no next input)
            positions = [t for t, label in enumerate(row_labels) if label != IGNORE_INDEX][:-1]
            assert all(row_ids[t + 1] == row_labels[t] for t in positions)


def test_caption_sequences_ground_each_object_phrase_at_the_positions_that_predict_it(tokenizer):
    # Input images of 48 x 32 pixels made from the 64 px scenes: the boxes are in the input image's pixels.
    dataset = SceneDataset("val", DataConfig(captions_per_image=5), tokenizer, lambda im: torch.zeros(3, 32, 48), 64)
    for index in range(20):
        scene = make_scene(index, "val")
        _, (captions, questions), _ = dataset[index]
        assert all(grounded == [] for _, _, grounded in questions)
        for ids, prompt_len, grounded in captions:
            by_box: dict = {}
            for position, box in grounded:
                by_box.setdefault(box, []).append(ids[position + 1])  # the token that position predicts
            text = tokenizer.decode(ids[prompt_len:])
            for o in scene.objects:  # every object the caption names, with its box scaled by 48 / 64 and 32 / 64
                x, y, w, h = o.box
                box = (x * 0.75, y * 0.5, w * 0.75, h * 0.5)
                named = re.search(rf"\b{o.phrase}\b", text) is not None
                assert (box in by_box) == named
                if named:
                    assert tokenizer.decode(by_box[box]) == o.phrase


def test_collate_keeps_each_grounded_token_with_its_row_and_box(tokenizer):
    dataset = SceneDataset("val", DataConfig(captions_per_image=1, questions_per_image=2), tokenizer,
                           lambda im: torch.zeros(3, 64, 64), 64)
    items = [dataset[i] for i in range(4)]
    batch = collate(items, pad_id=tokenizer.pad_id)
    (where, boxes), (vqa_where, _) = batch.grounded
    assert vqa_where.shape == (0, 2)
    expected = [(row, position, box) for row, (_, (captions, _), _) in enumerate(items)
                for position, box in captions[0][2]]
    assert where.tolist() == [[row, position] for row, position, _ in expected]
    assert torch.allclose(boxes, torch.tensor([box for _, _, box in expected]))
    labels = batch.labels[0][where[:, 0], where[:, 1]]  # grounded positions are learned caption tokens
    assert (labels != IGNORE_INDEX).all()


def test_a_phrase_two_regions_share_or_named_twice_is_not_grounded(tokenizer):
    one, two = (0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)
    _, _, grounded = caption_sequence(tokenizer, "a small red circle and a large blue square",
                                      [("small red circle", one), ("large blue square", two)])
    assert [box for _, box in grounded] == [one] * 3 + [two] * 3
    _, _, shared = caption_sequence(tokenizer, "a red circle and a blue square",
                                    [("red circle", one), ("red circle", two), ("blue square", two)])
    assert [box for _, box in shared] == [two] * 2
    _, _, twice = caption_sequence(tokenizer, "a red circle and a red circle", [("red circle", one)])
    assert twice == []
