"""Grounding methods (raw, rollout, Chefer et al.), boxes from maps, grounding scores and the deletion check."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlm.api import Captioner
from vlm.data.scenes import make_scene
from vlm.errors import VLMError
from vlm.eval.grounding import GroundingCase, deletion_curves, grounding_scores, pointing_by_choice
from vlm.grounding.ground import ground
from vlm.grounding.maps import box_from_map, iou, peak, pointing_hit
from vlm.grounding.methods import decode_with_attention, token_maps

TEXT = "a small red circle to the left of a large blue square"


@pytest.fixture
def captioner(tiny_model, tokenizer) -> Captioner:
    return Captioner(tiny_model, tokenizer, device="cpu")


def _inputs(captioner: Captioner, n: int = 2):
    images = [make_scene(i, "val", 0, 64).image for i in range(n)]
    seq = [*captioner.tokenizer.caption_prompt(), *captioner.tokenizer.encode(TEXT)]
    pixels = torch.stack([captioner.transform(im) for im in images])
    return images, pixels, torch.tensor([seq] * n)


def test_decode_with_attention_matches_the_model(captioner) -> None:
    _, pixels, ids = _inputs(captioner)
    logits, self_w, cross_w, grid = decode_with_attention(captioner.model, pixels, ids)
    with torch.no_grad():
        out = captioner.model(pixels, ids, need_weights=True)
    torch.testing.assert_close(logits, out.logits, atol=1e-5, rtol=1e-5)
    for ours, theirs in zip(cross_w, out.cross_attentions, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    assert grid == out.grid and self_w[0].shape == (2, 4, ids.shape[1], ids.shape[1])
    assert torch.allclose(self_w[0].triu(1), torch.zeros(())), "self-attention must be causal"


def test_raw_maps_are_the_cross_attention_of_the_predicting_position(captioner) -> None:
    images, pixels, ids = _inputs(captioner)
    n = len(captioner.tokenizer.encode(TEXT))
    maps = captioner.text_maps(images, [TEXT] * 2)
    with torch.no_grad():
        attn = torch.stack(captioner.model(pixels, ids, need_weights=True).cross_attentions)  # (L, S, H, T, N)
    expected = attn.mean(dim=(0, 2))[:, :n].reshape(2, n, *maps[0].shape[1:])
    np.testing.assert_allclose(np.stack(maps), expected.numpy(), atol=1e-6)
    one_head = captioner.text_maps(images, [TEXT] * 2, layers=[1], head=3)
    np.testing.assert_allclose(one_head[0], attn[1, 0, 3, :n].reshape(n, *maps[0].shape[1:]).numpy(), atol=1e-6)


def test_rollout_of_the_last_layer_alone_is_its_raw_attention(captioner) -> None:
    # No self-attention follows the last layer's cross-attention, so nothing is rolled out.
    images, _, _ = _inputs(captioner)
    raw = captioner.text_maps(images, [TEXT] * 2, layers=[-1], method="raw")
    rollout = captioner.text_maps(images, [TEXT] * 2, layers=[-1], method="rollout")
    np.testing.assert_allclose(rollout[0], raw[0], atol=1e-6)
    both = captioner.text_maps(images, [TEXT] * 2, method="rollout")[0]
    assert np.allclose(both.sum(axis=(1, 2)), 1.0, atol=1e-5) and not np.allclose(both, raw[0], atol=1e-3)


def test_chefer_in_the_last_layer_is_the_positive_gradient_times_attention(captioner) -> None:
    # In the last layer, dlogit_t/dA of any other row is zero (its output never reaches position t), so the rule
    # reduces to R_ti[t] = Rbar_tt[t, t] * mean over heads of (dlogit/dA * A)^+ at row t, with Rbar_tt[t, t] in
    # [1, 2] (the identity plus the row-normalised self-relevancy): checked with autograd on the model itself.
    _, pixels, ids = _inputs(captioner, 1)
    q = 4
    (maps,), _ = token_maps(captioner.model, pixels, ids, [[q]], method="chefer", layers=[-1])
    captured = []  # the weights the last cross-attention really used, (1, H, T, N)
    hook = captioner.model.decoder.blocks[-1].cross_attn.register_forward_hook(
        lambda module, inputs, output: captured.append(output[1]))
    out = captioner.model(pixels, ids, need_weights=True)
    hook.remove()
    weights = captured[0]
    (grad,) = torch.autograd.grad(out.logits[0, q, ids[0, q + 1]], weights)
    expected = (grad * weights).clamp_min(0).mean(1)[0, q]
    scale = float(maps[0].sum() / expected.detach().sum())
    assert 1.0 <= scale <= 2.0
    torch.testing.assert_close(maps[0], scale * expected.detach(), atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("method", ["raw", "rollout", "chefer"])
def test_every_method_maps_answers_given_the_question(captioner, method) -> None:
    image = make_scene(0, "val", 0, 64).image
    (maps,) = captioner.text_maps([image], ["red"], method=method, questions=["what color is the circle?"])
    assert maps.shape[0] == 1 and np.isfinite(maps).all() and (maps >= 0).all() and maps.sum() > 0
    attended = captioner.attend(image, question="what color is the circle?", method=method, max_new_tokens=3)
    assert attended.maps.shape[0] == len(attended.tokens)


@pytest.mark.parametrize(("kwargs", "needle"), [({"method": "magic"}, "magic"), ({"layers": [7]}, "layers"),
                                                ({"head": 9}, "head"), ({"method": "chefer", "head": 0}, "head")])
def test_bad_method_layer_or_head_is_a_vlm_error(captioner, kwargs, needle) -> None:
    with pytest.raises(VLMError, match=needle):
        captioner.text_maps([make_scene(0, "val", 0, 64).image], [TEXT], **kwargs)


def test_box_from_map_encloses_the_peak_region_only() -> None:
    grid = np.zeros((4, 4))
    grid[1, 1] = grid[1, 2] = 1.0  # the peak's region: cells (1, 1) and (1, 2)
    grid[3, 3] = 0.9  # a separate region above threshold, not connected to the peak
    x, y, w, h = box_from_map(grid, (40, 40), fraction=0.5)
    assert 5 <= x <= 10 and 5 <= y <= 10 and x + w <= 35 and y + h <= 25 and w > h
    assert iou((x, y, w, h), (10, 10, 20, 10)) > 0.5


def test_iou_by_hand() -> None:
    assert iou((0, 0, 10, 10), (5, 0, 10, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 10, 10), (20, 20, 5, 5)) == 0.0
    assert iou((1, 2, 3, 4), (1, 2, 3, 4)) == 1.0


def test_grounding_scores_count_hits_mass_and_iou(captioner, monkeypatch) -> None:
    scene = make_scene(3, "val", 0, 64)
    case = GroundingCase(scene.image, [(o.phrase, o.box) for o in scene.objects], scene.captions[0])
    target = scene.objects[0]

    def peaked(images, texts, layers=None, method="raw", head=None, questions=None, per_layer=False):
        # In both layers, every token attends to the grid cell under the first object's centre.
        n = len(captioner.tokenizer.encode(texts[0]))
        maps = np.full((2, n, 8, 8), 1e-3)
        cx, cy = target.box[0] + target.box[2] / 2, target.box[1] + target.box[3] / 2
        maps[:, :, int(cy / 8), int(cx / 8)] = 1.0
        return [maps for _ in images]

    monkeypatch.setattr(captioner, "text_maps", peaked)
    scores = grounding_scores(captioner, [case])
    assert scores["phrases"] == len(scene.objects)
    assert scores["pointing_game"] == pytest.approx(1 / len(scene.objects))  # only the first object is hit
    assert 0 < scores["iou"] < 1 and 0 < scores["mass_in_box"] < 1


def test_deletion_curves_start_equal_and_stay_probabilities(captioner) -> None:
    scenes = [make_scene(i, "val", 0, 64) for i in range(3)]
    cases = [GroundingCase(s.image, [(o.phrase, o.box) for o in s.objects], s.captions[0]) for s in scenes]
    result = deletion_curves(captioner, cases, fractions=(0.0, 0.5, 0.875))
    assert result["curve_attention"][0] == pytest.approx(result["curve_random"][0])  # nothing deleted yet
    assert all(0 < p < 1 for p in result["curve_attention"] + result["curve_random"])
    assert result["area_attention"] == pytest.approx(np.mean(result["curve_attention"]))


def test_ground_writes_only_inside_out_and_returns_a_box(captioner, tmp_path) -> None:
    image = make_scene(0, "val", 0, 64).image.resize((128, 96))
    path = tmp_path / "in.png"
    image.save(path)
    out = tmp_path / "out"
    result = ground(captioner, str(path), "a red circle", method="rollout", out_dir=out)
    json.dumps(result)
    x, y, w, h = result["box"]
    assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= 128.01 and y + h <= 96.01
    assert [p.name for p in out.iterdir()] == ["ground.png"] and Image.open(out / "ground.png").size == (128, 96)
    with pytest.raises(VLMError, match="phrase"):
        ground(captioner, str(path), "  ")


def test_peak_of_the_upsampled_map_or_at_the_patch_centre() -> None:
    grid = np.zeros((4, 4))
    grid[0, 0] = 1.0  # a corner cell: the upsampled map is flat over the cell's outer quarter
    assert peak(grid, (40, 40)) == (0.5, 0.5)  # first pixel of the flat maximum
    assert peak(grid, (40, 40), upsampled=False) == (5.0, 5.0)  # the cell's centre
    grid[0, 0], grid[2, 1] = 0.0, 1.0
    assert peak(grid, (80, 40), upsampled=False) == (30.0, 25.0)
    assert pointing_hit(grid, (25, 20, 10, 10), (80, 40), upsampled=False)
    assert not pointing_hit(grid, (0, 0, 10, 10), (80, 40), upsampled=False)


def test_pointing_by_choice_equals_grounding_scores_of_each_choice(captioner) -> None:
    scenes = [make_scene(i, "val", 0, 64) for i in range(3)]
    cases = [GroundingCase(s.image, [(o.phrase, o.box) for o in s.objects], s.captions[0]) for s in scenes]
    choices = [([0], None), ([1], 2), (None, 2)]  # rollout: layer 0 is carried through layer 1's self-attention
    got = pointing_by_choice(captioner, cases, "rollout", choices)
    assert got == [grounding_scores(captioner, cases, "rollout", layers, head)["pointing_game"]
                   for layers, head in choices]
