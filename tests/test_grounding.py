"""Grounding methods (raw, rollout, Chefer et al.), boxes from maps, grounding scores and the deletion check."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import tiny_config
from vlm.api import Captioner
from vlm.config import DecodingConfig, MapConfig
from vlm.data.scenes import make_scene
from vlm.errors import VLMError
from vlm.eval.grounding import GroundingCase, deletion_curves, grounding_scores, phrase_maps, pointing_by_choice
from vlm.grounding.ground import ground
from vlm.grounding.maps import box_from_map, connected_region, iou, peak, pointing_hit, resize
from vlm.grounding.methods import generated_raw_maps, token_maps
from vlm.model.generate import generate
from vlm.model.vlm import VisionLanguageModel

TEXT = "a small red circle to the left of a large blue square"


@pytest.fixture
def captioner(tiny_model, tokenizer) -> Captioner:
    return Captioner(tiny_model, tokenizer, device="cpu")


def _inputs(captioner: Captioner, n: int = 2):
    images = [make_scene(i, "val", 0, 64).image for i in range(n)]
    seq = [*captioner.tokenizer.caption_prompt(), *captioner.tokenizer.encode(TEXT)]
    pixels = torch.stack([captioner.transform(im) for im in images])
    return images, pixels, torch.tensor([seq] * n)


def test_the_decoder_pass_with_weights_gives_the_fused_pass_logits(captioner) -> None:
    _, pixels, ids = _inputs(captioner)
    model = captioner.model
    with torch.no_grad():
        image_kv, _ = model.encode(pixels)
        fused = model.decoder(ids, image_kv)
        explicit = model.decoder(ids, image_kv, need_weights=True, need_self_weights=True)
    assert fused.self_attentions is None and fused.cross_attentions is None
    torch.testing.assert_close(explicit.logits, fused.logits, atol=1e-5, rtol=1e-5)
    T, N = ids.shape[1], image_kv[0][0].shape[2]
    assert [w.shape for w in explicit.cross_attentions] == [(2, 4, T, N)] * 2
    assert [w.shape for w in explicit.self_attentions] == [(2, 4, T, T)] * 2
    assert torch.allclose(explicit.self_attentions[0].triu(1), torch.zeros(())), "self-attention must be causal"


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


@pytest.mark.parametrize("config", [MapConfig(), MapConfig(layers=[1], head=3)])
def test_generated_raw_maps_are_token_maps_without_a_second_pass(captioner, config) -> None:
    _, pixels, _ = _inputs(captioner)
    model, tok = captioner.model, captioner.tokenizer
    with torch.no_grad():
        image_kv, grid = model.encode(pixels)
        prompts = [tok.caption_prompt()] * 2
        gen = generate(model, image_kv, prompts, eos_id=tok.eos_id, pad_id=tok.pad_id,
                       config=DecodingConfig(max_new_tokens=6), return_attention=True)
        made = generated_raw_maps(model, gen.attentions, grid, config, prefix=model.encoder.num_prefix)
        expected = token_maps(model, image_kv, grid, prompts, gen.tokens, config)
    assert [m.shape for m in made] == [e.shape for e in expected] and made[0].shape[0] == len(gen.tokens[0])
    assert (expected[0] - expected[0].mean()).abs().max() > 1e-3  # the maps are not flat
    for m, e in zip(made, expected, strict=True):
        torch.testing.assert_close(m, e, atol=1e-6, rtol=1e-5)
    # sequences of different lengths (an empty one too) are computed together and come back as they went in
    parts = [gen.attentions[1][:2], gen.attentions[0], gen.attentions[1][:0]]
    cut = generated_raw_maps(model, parts, grid, config, prefix=model.encoder.num_prefix)
    assert [len(m) for m in cut] == [2, len(gen.tokens[0]), 0]
    torch.testing.assert_close(cut[0], made[1][:2])
    torch.testing.assert_close(cut[1], made[0])
    for bad in (replace(config, head=99), replace(config, layers=[7])):  # refused as token_maps refuses them
        with pytest.raises(ValueError, match="out of range"):
            generated_raw_maps(model, gen.attentions, grid, bad, prefix=model.encoder.num_prefix)


@pytest.mark.parametrize("method", ["raw", "rollout"])
def test_the_training_callbacks_maps_are_those_of_attend(tokenizer, method) -> None:
    from vlm.train.callbacks import GenerationMetrics

    torch.manual_seed(0)
    model = VisionLanguageModel(replace(tiny_config(), attention_layers=[1]), len(tokenizer)).eval()  # not all
    captioner = Captioner(model, tokenizer, device="cpu")
    image = make_scene(0, "val", 0, 64).image
    maps = MapConfig(method)
    ((ids, logged),) = GenerationMetrics(maps=maps).sample_maps(model, tokenizer, captioner.transform(image)[None])
    attended = captioner.attend(image, maps=maps)
    every_layer = captioner.attend(image, maps=MapConfig(method, layers=[0, 1])).maps
    assert ids and tokenizer.decode(ids) == attended.text
    assert np.abs(every_layer - attended.maps).max() > 1e-3  # the layers chosen matter
    np.testing.assert_allclose(logged, attended.maps, atol=1e-6)


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
    q, seq = 4, ids[0].tolist()
    with torch.no_grad():
        image_kv, grid = captioner.model.encode(pixels)
    (maps,) = token_maps(captioner.model, image_kv, grid, [seq[:q + 1]], [seq[q + 1:q + 2]],
                         MapConfig(method="chefer", layers=[-1]))  # position q's map
    maps = maps.reshape(1, -1)
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


def _flood(keep: np.ndarray, start: tuple[int, int]) -> np.ndarray:
    """The 4-neighbour region of start in keep, pixel by pixel (the reference)."""
    seen = np.zeros_like(keep)
    seen[start] = True
    stack = [start]
    while stack:
        r, c = stack.pop()
        for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if 0 <= nr < keep.shape[0] and 0 <= nc < keep.shape[1] and keep[nr, nc] and not seen[nr, nc]:
                seen[nr, nc] = True
                stack.append((nr, nc))
    return seen


def test_connected_region_equals_a_pixel_by_pixel_flood_fill() -> None:
    rng = np.random.default_rng(0)
    spiral = np.zeros((15, 15), dtype=bool)  # a path of many turns, and two pixels touching it only diagonally
    spiral[1, 1:14] = spiral[1:14, 13] = spiral[13, 1:14] = spiral[3:14, 1] = spiral[3, 1:12] = True
    spiral[3:12, 11] = spiral[11, 3:12] = spiral[5:12, 3] = spiral[5, 3:10] = spiral[5:10, 9] = True
    spiral[0, 0] = spiral[0, 14] = True
    masks = [(spiral, (7, 9))]
    for _ in range(60):
        up = resize(rng.random((int(rng.integers(2, 9)), int(rng.integers(2, 9)))),
                    (int(rng.integers(5, 60)), int(rng.integers(5, 60))))
        keep = up >= rng.uniform(0.3, 0.9) * up.max()
        masks.append((keep, np.unravel_index(int(np.argmax(up)), up.shape)))
    partial = 0
    for keep, start in masks:
        region = connected_region(keep, start)
        assert np.array_equal(region, _flood(keep, start))
        partial += 1 < region.sum() < keep.sum()  # neither the start alone nor all of keep
    assert partial > 20
    assert connected_region(spiral, (7, 9)).sum() == spiral.sum() - 2  # all of the path, not the diagonal corners
    with pytest.raises(ValueError, match="start"):
        connected_region(spiral, (0, 1))


def test_peak_is_the_maximum_of_the_whole_upsampled_map() -> None:
    """peak evaluates the upsampled map at the pixels that can hold its maximum only: it finds the full map's."""
    rng = np.random.default_rng(0)
    same = 0
    for case in range(600):
        grid = rng.random((int(rng.integers(1, 16)), int(rng.integers(1, 16))))
        if case % 3 == 1:
            grid = np.round(grid * 2) / 2  # plateaus: ties
        size = (int(rng.integers(1, 500)), int(rng.integers(1, 500)))
        up = resize(grid, size)
        x, y = peak(grid, size)
        row, col = int(y - 0.5), int(x - 0.5)
        assert up[row, col] >= up.max() - 1e-12  # a maximum (ties differ from a full argmax by rounding alone)
        same += (row, col) == np.unravel_index(int(np.argmax(up)), up.shape)
    assert same > 550


def test_iou_by_hand() -> None:
    assert iou((0, 0, 10, 10), (5, 0, 10, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 10, 10), (20, 20, 5, 5)) == 0.0
    assert iou((1, 2, 3, 4), (1, 2, 3, 4)) == 1.0


def test_grounding_scores_count_hits_mass_and_iou(captioner, monkeypatch) -> None:
    scene = make_scene(3, "val", 0, 64)
    case = GroundingCase(scene.image, [(o.phrase, o.box) for o in scene.objects], scene.captions[0])
    target = scene.objects[0]

    def peaked(images, texts, maps=None, questions=None, per_layer=False):
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


def _one_patch_captioner(tokenizer, word: str, target: int, reads_image: bool) -> Captioner:
    """A 1-layer, 1-head model set by hand whose only use of the image is the patch ``target``.

    The patch features are their position codes alone (the encoder's projection is zeroed), every query
    attends to ``target`` (its key is the query's direction), and a patch's value is +c * word's embedding for
    ``target`` and -c * it for every other patch: p(word) is high while ``target`` is kept and near 0 once
    it is deleted. Self-attention and the MLP add nothing. With ``reads_image=False`` the cross-attention's
    output is the constant that reading ``target`` gives, so nothing about the image reaches the logits.
    """
    torch.manual_seed(0)
    cfg = tiny_config()
    model = VisionLanguageModel(replace(cfg, decoder=replace(cfg.decoder, depth=1, num_heads=1)), len(tokenizer))
    model.eval()
    block, D = model.decoder.blocks[0], cfg.decoder.width
    (word_id,) = tokenizer.encode(word)
    with torch.no_grad():
        model.encoder.proj[1].weight.zero_()
        model.encoder.proj[1].bias.zero_()
        features = model.encoder(torch.zeros(1, 3, 64, 64))[0][0]  # (N, D): the same for every image
        dots = features @ features[target]  # largest at target: all features have the same norm
        second = dots[torch.arange(len(dots)) != target].max()
        threshold, gap = (dots[target] + second) / 2, dots[target] - second
        model.decoder.tok_emb.weight.normal_()
        model.decoder.ln_f.weight.fill_(0.15)  # logits within a few units: probabilities away from 0 and 1
        direction = model.decoder.tok_emb.weight[word_id] / model.decoder.tok_emb.weight[word_id].norm()
        block.self_attn.proj.weight.zero_()
        block.self_attn.proj.bias.zero_()
        block.mlp[2].weight.zero_()
        block.mlp[2].bias.zero_()
        cross = block.cross_attn
        cross.q.weight.zero_()
        cross.q.bias.copy_(features[target] * 50 * D**0.5 / gap)  # scores 50 apart: all weight on target
        scale = 200 / gap  # values +-100 along the word's embedding
        cross.kv.weight.copy_(torch.cat([torch.eye(D), scale * torch.outer(direction, features[target])]))
        cross.kv.bias.copy_(torch.cat([torch.zeros(D), -scale * threshold * direction]))
        if reads_image:
            cross.proj.weight.copy_(torch.eye(D))
            cross.proj.bias.zero_()
        else:  # the same output as while target is read, whatever the image
            cross.proj.weight.zero_()
            cross.proj.bias.copy_(100 * direction)
    return Captioner(model, tokenizer, device="cpu")


def _one_word_cases(n: int) -> list[GroundingCase]:
    return [GroundingCase(make_scene(i, "val", 0, 64).image, [("red", (0, 0, 8, 8))]) for i in range(n)]


def test_deleting_the_one_patch_a_model_reads_drops_its_probability_at_once(tokenizer) -> None:
    captioner = _one_patch_captioner(tokenizer, "red", target=27, reads_image=True)
    (attention_map,) = phrase_maps(captioner, _one_word_cases(1))
    assert attention_map.ravel().argmax() == 27 and attention_map.max() > 0.99  # the map shows what it reads
    result = deletion_curves(captioner, _one_word_cases(8))
    attended, random = result["curve_attention"], result["curve_random"]
    assert attended[0] == pytest.approx(random[0]) and attended[0] > 0.5  # nothing deleted: the word is likely
    assert max(attended[1:]) < 0.01 * attended[0]  # the first deletion step takes the patch, and the word with it
    assert np.all(np.diff(random) < 1e-6)  # once deleted, it stays deleted
    assert random[1] > 0.5 * random[0] and random[-1] < 0.5 * random[0]  # in random order it goes at some step
    assert result["area_attention"] < 0.4 * result["area_random"]


def test_a_model_that_ignores_the_image_shows_no_deletion_effect(tokenizer) -> None:
    captioner = _one_patch_captioner(tokenizer, "red", target=27, reads_image=False)
    result = deletion_curves(captioner, _one_word_cases(8))
    attended, random = result["curve_attention"], result["curve_random"]
    assert 0.5 < attended[0] < 1  # as likely as with the patch read
    np.testing.assert_allclose(attended, attended[0], rtol=1e-6)
    np.testing.assert_allclose(random, attended[0], rtol=1e-6)
    assert result["area_attention"] == pytest.approx(result["area_random"], rel=1e-6)


def test_ground_writes_only_inside_out_and_returns_a_box(captioner, tmp_path) -> None:
    image = make_scene(0, "val", 0, 64).image.resize((128, 96))
    path = tmp_path / "in.png"
    image.save(path)
    out = tmp_path / "out"
    result = ground(captioner, str(path), "a red circle", MapConfig(method="rollout"), out_dir=out)
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
    # rollout: layer 0 is carried through layer 1's self-attention
    choices = [MapConfig("rollout", [0]), MapConfig("rollout", [1], 2), MapConfig("rollout", None, 2)]
    got = pointing_by_choice(captioner, cases, choices)
    assert got == [grounding_scores(captioner, cases, choice)["pointing_game"] for choice in choices]


def test_grounding_scores_find_phrases_with_a_bpe_tokenizer() -> None:
    """A byte-level BPE encodes "red" alone and inside "a small red circle" as different tokens (the latter with
    its leading space): phrases are found by characters, as training finds them, not by token ids."""
    from tests.conftest import image_sensitive_model
    from vlm.data.builtin import scene_texts
    from vlm.eval.grounding import _phrases
    from vlm.text.tokenizer import Tokenizer

    tok = Tokenizer.train(scene_texts(300, seed=0), kind="bpe", vocab_size=400)
    assert tok.encode("red")[0] not in tok.encode("a small red circle")  # what a token-id search missed
    captioner = Captioner(image_sensitive_model(tok), tok, device="cpu")
    scene = make_scene(3, "val", 0, 64)
    case = GroundingCase(scene.image, [(o.phrase, o.box) for o in scene.objects], scene.captions[0])
    for (phrase, _), found in zip(case.regions, _phrases(captioner, [case]), strict=True):
        assert tok.decode(tok.encode(case.text)[found.span[0]:found.span[1]]).strip() == phrase
    assert grounding_scores(captioner, [case])["phrases"] == len(scene.objects)
