"""Relational scenes (vlm/data/relational.py), context blocks over the patch grid, and maps carried through them."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from tests.conftest import tiny_config
from vlm.api import Captioner
from vlm.cli import main
from vlm.config import DataConfig, DecodingConfig, MapConfig, OptimConfig
from vlm.data.batch import collate
from vlm.data.builtin import SceneDataset, scene_texts
from vlm.data.relational import KINDS, MARGIN, SHAPES
from vlm.data.scenes import make_scene
from vlm.data.transforms import image_transform
from vlm.grounding.methods import token_maps
from vlm.model.vlm import VisionLanguageModel
from vlm.text.tokenizer import Tokenizer
from vlm.train.module import CaptionModule

SIZE = 64


def _centre(o) -> tuple[float, float]:
    x, y, w, h = o.box
    return x + w / 2, y + h / 2


def _expected(question: str, objects: list) -> tuple[str, float | None]:
    """The answer computed from the objects alone, and for closest/farthest the gap to the runner-up (pixels)."""
    by_color = {o.color: o for o in objects}
    m = re.fullmatch(r"what (color|shape) is the object (closest to|farthest from) the (\w+) object\?", question)
    if m:
        what, where, x = m.groups()
        ranked = sorted((math.dist(_centre(by_color[x]), _centre(o)), o) for o in objects if o.color != x)
        if where == "farthest from":
            ranked = ranked[::-1]
        return getattr(ranked[0][1], what), abs(ranked[0][0] - ranked[1][0])
    if m := re.fullmatch(r"how many other objects have the same shape as the (\w+) object\?", question):
        x = by_color[m[1]]
        return str(sum(o.shape == x.shape for o in objects if o is not x)), None
    if m := re.fullmatch(r"what shape is the (\w+) object\?", question):
        return by_color[m[1]].shape, None
    if m := re.fullmatch(r"is the (\w+) object on the left or on the right\?", question):
        return ("left" if _centre(by_color[m[1]])[0] < SIZE / 2 else "right"), None
    if m := re.fullmatch(r"is the (\w+) object at the top or at the bottom\?", question):
        return ("top" if _centre(by_color[m[1]])[1] < SIZE / 2 else "bottom"), None
    if m := re.fullmatch(r"is the (\w+) object (left or right of|above or below) the (\w+) object\?", question):
        a, relation, b = m.groups()
        axis = 0 if relation.startswith("left") else 1
        first = _centre(by_color[a])[axis] < _centre(by_color[b])[axis]
        return (("left", "right") if axis == 0 else ("above", "below"))[0 if first else 1], None
    if m := re.fullmatch(r"is there (?:a|an|(no)) (\w+) (\w+)\?", question):
        no, color, shape = m.groups()
        there = by_color[color].shape == shape
        return ("yes" if there != bool(no) else "no"), None
    if m := re.fullmatch(r"is the (\w+) object (not )?(left of|above) the (\w+) object\?", question):
        a, no, relation, b = m.groups()
        axis = 0 if relation == "left of" else 1
        holds = _centre(by_color[a])[axis] < _centre(by_color[b])[axis]
        return ("yes" if holds != bool(no) else "no"), None
    raise AssertionError(f"unexpected question {question!r}")


def test_every_answer_matches_an_independent_computation_without_near_ties() -> None:
    kinds, answers = {}, {}
    for i in range(60):
        scene = make_scene(i, "val", 0, SIZE, "relational")
        assert len(scene.objects) == 6 and len({o.color for o in scene.objects}) == 6
        assert {o.shape for o in scene.objects} <= set(SHAPES)
        for q in scene.questions:
            answer, gap = _expected(q.question, scene.objects)
            assert q.answer == answer, (i, q.question, q.answer)
            if gap is not None:
                assert gap >= MARGIN * SIZE, (i, q.question, gap)
            kinds[q.question_type] = kinds.get(q.question_type, 0) + 1
            answers.setdefault(q.question_type, set()).add(q.answer)
            if q.question_type == "negation":
                assert " no " in q.question or " not " in q.question
    assert set(kinds) == set(KINDS)
    assert answers["negation"] == answers["yes_no"] == {"yes", "no"}
    assert "0" in answers["count_same"] and len(answers["count_same"]) >= 3


def test_captions_name_every_object_and_relations() -> None:
    scene = make_scene(7, "train", 0, SIZE, "relational")
    assert all(o.phrase in scene.captions[0] for o in scene.objects)  # the grounding caption names all six
    assert any("closest to" in c for c in scene.captions) and any("farthest from" in c for c in scene.captions)


def test_scenes_are_deterministic_and_held_out_scenes_are_not_training_scenes() -> None:
    def key(scene):
        return tuple((o.color, o.shape, *np.round(o.box, 3)) for o in scene.objects)

    a, b = make_scene(5, "train", 0, SIZE, "relational"), make_scene(5, "train", 0, SIZE, "relational")
    assert key(a) == key(b) and a.image.tobytes() == b.image.tobytes() and a.questions == b.questions
    train = {key(make_scene(i, "train", 0, SIZE, "relational")) for i in range(300)}
    val = {key(make_scene(i, "val", 0, SIZE, "relational")) for i in range(100)}
    assert len(train) == 300 and len(val) == 100 and not train & val
    mixed = [len(make_scene(i, "val", 0, SIZE, "mixed").objects) for i in range(6)]
    assert mixed[1::2] == [6, 6, 6] and max(mixed[0::2]) <= 4
    with pytest.raises(ValueError, match="'clevr'"):
        make_scene(0, "val", 0, SIZE, "clevr")


def test_vlm_data_exports_the_relational_family(tmp_path) -> None:
    out = tmp_path / "rel"
    assert main(["data", "shapes", "--out", str(out), "--num-images", "3", "--scenes", "relational"]) == 0
    lines = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    regions = [line["regions"] for line in lines if "regions" in line]
    assert len(regions) == 3 and all(len(r) == 6 for r in regions)
    annotations = json.loads((out / "annotations.json").read_text())["annotations"]
    assert {a["question_type"] for a in annotations} == set(KINDS)
    assert main(["data", "shapes", "--out", str(tmp_path / "x"), "--scenes", "clevr"]) == 1


# ------------------------------------------------------------------------------------- context blocks and maps


@pytest.fixture(scope="module")
def rel_tokenizer() -> Tokenizer:
    return Tokenizer.train(scene_texts(200, 0, "relational"))


@pytest.fixture(scope="module")
def context_captioner(rel_tokenizer) -> Captioner:
    torch.manual_seed(0)
    model = VisionLanguageModel(tiny_config(context_layers=1), len(rel_tokenizer)).eval()
    return Captioner(model, rel_tokenizer, device="cpu")


def _encoded(captioner: Captioner, text: str = "a red circle and a blue square"):
    image = make_scene(0, "val", 0, SIZE, "relational").image
    pixels = captioner.transform(image)[None]
    tok = captioner.tokenizer
    seq = [*tok.caption_prompt(), *tok.encode(text)]
    with torch.no_grad():
        image_kv, grid = captioner.model.encode(pixels)
    return image_kv, grid, seq


def test_the_default_model_has_no_context_blocks() -> None:
    keys = VisionLanguageModel(tiny_config(), 50).state_dict()
    assert not any(k.startswith("encoder.context") for k in keys)
    assert any(k.startswith("encoder.context.0.attn") for k in VisionLanguageModel(tiny_config(context_layers=1),
                                                                                  50).state_dict())


def test_rollout_carries_the_map_back_through_the_context_blocks(context_captioner) -> None:
    model = context_captioner.model
    image_kv, grid, seq = _encoded(context_captioner)
    prompt, target = seq[:3], seq[3:]
    (raw,) = token_maps(model, image_kv, grid, [prompt], [target], MapConfig("raw", layers=[-1]))
    (rollout,) = token_maps(model, image_kv, grid, [prompt], [target], MapConfig("rollout", layers=[-1]))
    with torch.no_grad():
        _, (w,) = model.encode_patches(image_kv.patches, need_weights=True)  # (1, H, N, N)
    carried = 0.5 * w.mean(1)[0] + 0.5 * torch.eye(w.shape[-1])
    expected = raw.reshape(len(target), -1) @ carried
    assert (rollout.reshape(len(target), -1) - raw.reshape(len(target), -1)).abs().max() > 1e-3
    torch.testing.assert_close(rollout.reshape(len(target), -1), expected, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="context blocks"):
        token_maps(model, list(image_kv), grid, [prompt], [target], MapConfig("rollout"))


def test_chefer_through_the_context_blocks_matches_autograd(context_captioner) -> None:
    # Last decoder layer only: R_ti[q] = Rbar_tt[q, q] * e_cross @ Rbar_ii, where e_cross is the mean over heads of
    # (dlogit/dA * A)^+ of the cross-attention row q, and Rbar_ii = I + Abar_ctx row-normalised (R_ii = I + Abar_ctx
    # after one block, Abar_ctx the same rule on the block's attention); Rbar_tt[q, q] lies in [1, 2].
    model = context_captioner.model
    image_kv, grid, seq = _encoded(context_captioner)
    q = 4
    (maps,) = token_maps(model, image_kv, grid, [seq[:q + 1]], [seq[q + 1:q + 2]], MapConfig("chefer", layers=[-1]))
    maps = maps.reshape(-1)
    ids = torch.tensor([seq])
    kv, (ctx_w,) = model.encode_patches(image_kv.patches, need_weights=True)
    out = model.decoder(ids, kv, need_weights=True)
    cross_w = out.cross_attentions[-1]
    g_cross, g_ctx = torch.autograd.grad(out.logits[0, q, seq[q + 1]], [cross_w, ctx_w])
    e_cross = (g_cross * cross_w).clamp_min(0).mean(1)[0, q].detach()  # (N,)
    a_ctx = (g_ctx * ctx_w).clamp_min(0).mean(1)[0].detach()  # (N, N)
    rbar_ii = a_ctx / a_ctx.sum(-1, keepdim=True).clamp_min(1e-12) + torch.eye(a_ctx.shape[0])
    expected = e_cross @ rbar_ii
    ignored = e_cross * float(expected.sum() / e_cross.sum())  # the context blocks ignored, scaled alike
    assert (expected - ignored).abs().max() > 0.05 * expected.abs().max()
    scale = float(maps.sum() / expected.sum())
    assert 1.0 <= scale <= 2.0
    torch.testing.assert_close(maps, scale * expected, atol=1e-7, rtol=1e-4)


def test_evaluation_reports_accuracy_per_relational_kind(context_captioner) -> None:
    from vlm.eval.builtin import evaluate_builtin

    metrics = evaluate_builtin(context_captioner, num_scenes=2, scenes="relational", maps=MapConfig("chefer"),
                               decoding=DecodingConfig(max_new_tokens=2))
    assert {f"accuracy/{k}" for k in KINDS} <= set(metrics["vqa"])
    assert metrics["family"] == "relational" and 0 <= metrics["grounding"]["pointing_game"] <= 1


def test_a_tiny_model_learns_on_the_relational_family(rel_tokenizer) -> None:
    torch.manual_seed(0)
    module = CaptionModule.create(tiny_config(context_layers=1), OptimConfig(grounding_weight=0.0), rel_tokenizer)
    cfg = DataConfig(scenes="relational", captions_per_image=1, questions_per_image=6)
    data = SceneDataset("train", cfg, rel_tokenizer, image_transform(module.model.encoder.trunk, SIZE), SIZE)
    batches = [collate([data[i] for i in range(4)], rel_tokenizer.pad_id)]
    questions = " ".join(rel_tokenizer.decode(ids) for ids in batches[0].ids[batches[0].tasks.index("vqa")].tolist())
    assert "closest" in questions or "farthest" in questions  # the data module reads the relational family
    optimizer = torch.optim.AdamW(module.model.parameters(), lr=5e-3)
    losses = []
    for _ in range(12):
        loss, _ = module._loss(batches[0])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.75 * np.mean(losses[:3]), losses
