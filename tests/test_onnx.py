"""vlm/deploy: an ONNX export on ONNX Runtime decodes as the torch model does (same loop, greedy and beam, batch
of one and a left-padded mixed batch), with the same scores and maps; int8 differs by a bounded amount; CNN and
ViT trunks export; a damaged or mismatched export is one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import vlm.model.linear as onednn
from tests.conftest import ServeProcess, ending_model, image_sensitive_model, random_images, tiny_config
from vlm.api import NO_MAPS, Captioner, load
from vlm.cli import main
from vlm.config import DecodingConfig
from vlm.data.scenes import make_scene
from vlm.deploy.export import EncoderGraph, _FlatLinear, export_onnx
from vlm.deploy.runtime import OnnxModel, OrtDecoder
from vlm.errors import VLMError
from vlm.model.generate import decode, generate
from vlm.model.vlm import VisionLanguageModel

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def model(tokenizer):
    """The image-sensitive tiny model with sharpened cross-attention, so maps are far from uniform."""
    model = image_sensitive_model(tokenizer)
    with torch.no_grad():
        for block in model.decoder.blocks:
            block.cross_attn.kv.weight[:model.cfg.decoder.width].mul_(8)  # the keys' half
    return model


@pytest.fixture(scope="module")
def exported(model, tokenizer, tmp_path_factory):
    """(torch model dir, ONNX export with maps, int8 export, fp32 export without maps) of the model."""
    root = tmp_path_factory.mktemp("onnx")
    Captioner(model, tokenizer, "cpu").save(root / "torch")
    assert main(["export", "--model", str(root / "torch"), "--out", str(root / "fp32"), "--maps"]) == 0
    assert main(["export", "--model", str(root / "torch"), "--out", str(root / "int8"), "--quantize", "int8"]) == 0
    assert main(["export", "--model", str(root / "torch"), "--out", str(root / "plain")]) == 0
    return root / "torch", root / "fp32", root / "int8", root / "plain"


GRAPHS = {"with_maps": 1, "without_maps": 3}
"""The two decoder step graphs, by their index in `exported`: with maps, the attention weights are outputs too."""


def _prompts(tokenizer, n):
    prompts = [tokenizer.caption_prompt(), tokenizer.question_prompt("what color is the small circle?"),
               tokenizer.question_prompt("how many objects?")]
    return prompts[:n]


def _both(model, onnx, tokenizer, images, prompts, **options):
    config = DecodingConfig(max_new_tokens=10, **options)
    with torch.no_grad():
        image_kv, _ = model.encode(images)
    ours = generate(model, image_kv, prompts, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, config=config,
                    return_attention=onnx.maps)
    encoded, _ = onnx.encode(images)
    theirs = decode(OrtDecoder(onnx, encoded), prompts, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                    config=config, return_attention=onnx.maps)
    return ours, theirs


def _unexplained_divergences(model, onnx, tokenizer, images, prompts, ours, theirs) -> list[str]:
    """Positions where the token sequences part although torch's top-two logit margin there exceeds the backends'
    logit difference (read by feeding both the common prefix again): those would be real disagreements."""
    found = []
    for i, (a, b) in enumerate(zip(ours.tokens, theirs.tokens, strict=True)):
        if a == b:
            continue
        t = next(j for j in range(min(len(a), len(b)) + 1) if j == min(len(a), len(b)) or a[j] != b[j])
        ids = torch.tensor([prompts[i] + a[:t]])
        with torch.no_grad():
            torch_logits = model(images[i:i + 1], ids).logits[0, -1]
        encoded, _ = onnx.encode(images[i:i + 1])
        ort_logits = torch.from_numpy(onnx.teacher_forced(encoded, ids.numpy())[0][0])
        top2 = torch_logits.topk(2).values
        margin, diff = float(top2[0] - top2[1]), float((torch_logits - ort_logits).abs().max())
        print(f"sequence {i} parts at token {t}: top-two margin {margin:.2e}, backend difference {diff:.2e}")
        if margin > 2 * diff:
            found.append(f"sequence {i}, token {t}: margin {margin:.2e} > difference {diff:.2e}")
    return found


@pytest.mark.parametrize("options", [{}, dict(beam_size=3, length_penalty=1.0),
                                     dict(sample=True, top_k=5, no_repeat_ngram_size=2, min_new_tokens=4, seed=0)],
                         ids=["greedy", "beam", "sample_no_repeat_min_tokens"])
@pytest.mark.parametrize("n", [1, 3], ids=["batch1", "mixed_batch"])
@pytest.mark.parametrize("graph", GRAPHS)
def test_onnx_runtime_decodes_as_torch_with_the_same_scores_and_maps(model, tokenizer, exported, options, n, graph):
    onnx, _ = OnnxModel.load(exported[GRAPHS[graph]])
    images = torch.randn(n, 3, 64, 64)
    prompts = _prompts(tokenizer, n)  # the mixed batch has prompts of 3 lengths: left padding
    ours, theirs = _both(model, onnx, tokenizer, images, prompts, **options)
    assert all(len(t) >= 3 for t in ours.tokens)
    assert not _unexplained_divergences(model, onnx, tokenizer, images, prompts, ours, theirs)
    same = [i for i, (a, b) in enumerate(zip(ours.tokens, theirs.tokens, strict=True)) if a == b]
    assert len(same) == n  # with this seeded model no margin is that thin: every sequence agrees
    torch.testing.assert_close(torch.tensor(theirs.scores), torch.tensor(ours.scores), atol=1e-4, rtol=0)
    for i in same if onnx.maps else []:
        a, b = ours.attentions[i], theirs.attentions[i]  # (T, L, H, N)
        assert float(a.amax(-1).mean()) > 2 / a.shape[-1]  # maps peak at over twice uniform: real maps to compare
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0)


def test_the_onnx_captioner_captions_answers_and_attends_as_torch(exported):
    torch_dir, onnx_dir, *_ = exported
    ours, theirs = load(torch_dir, device="cpu"), load(onnx_dir, runtime="onnx", threads=1)
    images = random_images(2)
    assert theirs.caption(images, beam_size=2) == ours.caption(images, beam_size=2)
    questions = ["what color is the circle?", "how many objects?"]
    assert theirs.ask(images, questions) == ours.ask(images, questions)
    a, b = ours.attend(images[0], layers=[1]), theirs.attend(images[0], layers=[1])
    assert b.text == a.text and len(a.tokens) > 2
    assert a.maps.std() > 0.05 * a.maps.mean()  # not uniform
    assert abs(b.maps - a.maps).max() < 1e-4
    a, b = ours.attend(images[0], method="rollout"), theirs.attend(images[0], method="rollout")
    assert abs(a.maps - ours.attend(images[0]).maps).max() > 1e-3  # rollout is not the raw map again
    assert abs(b.maps - a.maps).max() < 1e-4
    with pytest.raises(VLMError, match="the onnx runtime makes raw and rollout maps; chefer"):
        theirs.attend(images[0], method="chefer")


def test_the_onnx_captioner_keeps_freed_memory_as_the_torch_one_on_the_cpu(exported, monkeypatch):
    """Both captioners ask for it (`vlm.allocator`, tested in a fresh process by tests/test_allocator.py)."""
    calls = []
    monkeypatch.setattr("vlm.api.keep_freed_memory", lambda: calls.append("kept"))
    load(exported[1], runtime="onnx", threads=1)
    assert calls == ["kept"]


def test_onnx_decoding_runs_torch_on_one_thread_and_sessions_sleep_between_runs(exported, monkeypatch):
    """ONNX Runtime's sessions sleep rather than spin between runs, each graph has a one-thread session for small
    steps and lanes, a call over several images takes a lane per thread, and the decoding loop's torch operations
    run on one thread, the caller's setting restored after (also when decoding fails): the thread policy that made
    ONNX decoding fast and steady on 2 cores. The sessions' outputs are compared with torch's by the tests above
    (batches of 1 to 9 rows) and below (lanes)."""
    import vlm.deploy.runtime as runtime
    from vlm.deploy.export import DECODER, ENCODER

    captioner = load(exported[1], runtime="onnx", threads=2)
    onnx = captioner.model
    assert onnx.lanes == 2 and onnx.lanes_for(1) == 1 and onnx.lanes_for(2) == onnx.lanes_for(32) == 2
    assert onnx.lane_threads(2) == onnx.lane_threads(32) == 1
    sessions = ((onnx.encoder, 2), (onnx.decoder, 2), (onnx.session(ENCODER, 1), 1), (onnx.session(DECODER, 1), 1))
    for session, threads in sessions:
        assert session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert session.get_session_options().intra_op_num_threads == threads
    one = load(exported[1], runtime="onnx", threads=1).model
    assert one.session(ENCODER, 1) is one.encoder and one.session(DECODER, 1) is one.decoder and one.lanes_for(9) == 1
    many = load(exported[1], runtime="onnx", threads=8).model  # more threads than lanes: each lane gets a share
    assert (many.lanes_for(2), many.lane_threads(2)) == (2, 4)
    assert (many.lanes_for(32), many.lane_threads(32)) == (runtime.MAX_LANES, 8 // runtime.MAX_LANES)
    assert many.session(DECODER, 4).get_session_options().intra_op_num_threads == 4
    seen = []

    def failing_decode(*args, **kwargs):
        seen.append(torch.get_num_threads())
        raise RuntimeError("stop")

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(runtime, "decode", failing_decode)
        with pytest.raises(RuntimeError, match="stop"):
            captioner.caption(random_images(1))
        assert seen == [1] and torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="stop"):  # three images: encoded and decoded in two lanes
            captioner.caption(random_images(3))
        assert seen == [1, 1, 1] and torch.get_num_threads() == 2  # the lanes leave torch's threads as they were
    finally:
        torch.set_num_threads(threads)


def _runs(session, monkeypatch) -> list[tuple[int, int]]:
    """(rows, images) of each run of ``session`` from now on: plain runs (the encoder's) and runs of bound inputs and
    outputs (the decoder's)."""
    runs, run, bind, run_bound = [], session.run, session.io_binding, session.run_with_iobinding

    def counted(names, feeds):
        runs.append((len(feeds.get("input_ids", feeds.get("pixels"))), len(feeds.get("image_key_0", ()))))
        return run(names, feeds)

    class Binding:
        """An I/O binding that keeps the sizes of its inputs."""

        def __init__(self):
            self.binding, self.sizes = bind(), {}

        def bind_cpu_input(self, name, array):
            self.sizes[name] = len(array)
            self.binding.bind_cpu_input(name, array)

        def __getattr__(self, name):
            return getattr(self.binding, name)

    def counted_bound(binding, *args):
        runs.append((binding.sizes["input_ids"], binding.sizes["image_key_0"]))
        return run_bound(binding.binding, *args)

    monkeypatch.setattr(session, "run", counted)
    monkeypatch.setattr(session, "io_binding", Binding)
    monkeypatch.setattr(session, "run_with_iobinding", counted_bound)
    return runs


def test_a_call_over_several_images_runs_in_lanes_and_decodes_as_torch(model, tokenizer, exported, monkeypatch):
    """Five images on two threads: encoded in two one-thread runs side by side (images 0-1, 2-4), then decoded by a
    loop per lane on the one-thread session, the beams of a lane's images in each of its steps; the tokens, scores
    and maps are torch's for the whole batch."""
    from vlm.deploy.export import DECODER, ENCODER
    from vlm.deploy.runtime import generate as generate_onnx

    onnx, _ = OnnxModel.load(exported[1], threads=2)
    encoder_runs = _runs(onnx.session(ENCODER, 1), monkeypatch)
    decoder_runs = _runs(onnx.session(DECODER, 1), monkeypatch)
    images = torch.randn(5, 3, 64, 64)
    prompts = _prompts(tokenizer, 3)[1:] * 2 + _prompts(tokenizer, 1)
    config = DecodingConfig(max_new_tokens=10, beam_size=4)
    with torch.no_grad():
        image_kv, _ = model.encode(images)
    ours = generate(model, image_kv, prompts, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, config=config,
                    return_attention=True)
    encoded, _ = onnx.encode(images)
    assert sorted(encoder_runs) == [(2, 0), (3, 0)]
    theirs = generate_onnx(onnx, encoded, prompts, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, config=config,
                           return_attention=True)
    assert {(8, 2), (12, 3)} == set(decoder_runs)  # beams of images 0-1, of images 2-4: every step in lanes
    assert theirs.tokens == ours.tokens and len(set(map(tuple, ours.tokens))) > 1
    torch.testing.assert_close(torch.tensor(theirs.scores), torch.tensor(ours.scores), atol=1e-4, rtol=0)
    for a, b in zip(ours.attentions, theirs.attentions, strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0)


@pytest.mark.parametrize("options, bias", [({}, 0.6), (dict(beam_size=3, no_repeat_ngram_size=1), 0.5)],
                         ids=["greedy", "beam_no_repeat"])
def test_retiring_ended_images_on_onnx_runtime_leaves_every_sequence_and_map_as_torch(tokenizer, tmp_path, options,
                                                                                       bias):
    """On ONNX Runtime too, images whose rows have all ended leave the later steps (the cache, beam index and images
    bound anew): the steps run fewer rows, and the tokens, scores and maps are torch's and those of decoding every
    row to the end."""
    model = ending_model(tokenizer, bias)
    Captioner(model, tokenizer, "cpu").save(tmp_path / "torch")
    assert main(["export", "--model", str(tmp_path / "torch"), "--out", str(tmp_path / "onnx"), "--maps"]) == 0
    onnx, _ = OnnxModel.load(tmp_path / "onnx", threads=1)
    torch.manual_seed(1)
    images = torch.randn(12, 3, 64, 64)
    prompts = [tokenizer.caption_prompt(), tokenizer.question_prompt("what color is the circle?")] * 6
    config = DecodingConfig(max_new_tokens=16, **options)
    with torch.no_grad():
        image_kv, _ = model.encode(images)
    ours = generate(model, image_kv, prompts, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, config=config,
                    return_attention=True)
    encoded, _ = onnx.encode(images)
    runs = {}
    for retire in (False, True):
        backend, rows = OrtDecoder(onnx, encoded), []
        step = backend.step
        backend.step = lambda ids, *args, step=step, rows=rows: rows.append(len(ids)) or step(ids, *args)
        runs[retire] = decode(backend, prompts, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, config=config,
                              return_attention=True, retire=retire), rows
    (full, full_rows), (retired, retired_rows) = runs[False], runs[True]
    assert len({len(t) for t in ours.tokens}) >= 3  # texts of varied lengths
    assert len(set(full_rows)) == 1 and len(set(retired_rows)) >= 3  # every row, against two retirements
    for theirs in (full, retired):
        assert theirs.tokens == ours.tokens and theirs.ended == ours.ended
        torch.testing.assert_close(torch.tensor(theirs.scores), torch.tensor(ours.scores), atol=1e-4, rtol=0)
        for a, b in zip(ours.attentions, theirs.attentions, strict=True):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    maps = torch.cat([t for t in ours.attentions if len(t)])  # (tokens, L, H, N)
    assert float(maps.amax()) > 1.5 / maps.shape[-1]  # real maps, peaking above uniform


def test_lanes_keep_the_whole_calls_padding_budget_and_seeds(tokenizer, exported):
    """Each lane pads its prompts to the whole call's longest and seeds its images as the whole call would: a lane
    of caption prompts only (images 0-1) still stops at the budget the long questions leave (max_length - P), and
    sampled tokens are those of one loop over all images (one thread, no lanes)."""
    from vlm.deploy.runtime import generate as generate_onnx

    lanes, _ = OnnxModel.load(exported[3], threads=2)
    one, _ = OnnxModel.load(exported[3], threads=1)
    images = torch.randn(4, 3, 64, 64)
    prompts = _prompts(tokenizer, 1) * 2 + [tokenizer.question_prompt("what color is the small circle left of the "
                                                                      "big square?")] * 2
    longest = max(map(len, prompts))
    for options in (dict(max_new_tokens=100, min_new_tokens=100), dict(sample=True, top_k=5, seed=3)):
        config = DecodingConfig(**options)
        whole, split = (generate_onnx(m, m.encode(images)[0], prompts, eos_id=tokenizer.eos_id,
                                      pad_id=tokenizer.pad_id, config=config) for m in (one, lanes))
        assert split.tokens == whole.tokens
        flat = [[x for seq in g.token_logprobs for x in seq] for g in (split, whole)]
        assert flat[0] == pytest.approx(flat[1], abs=1e-5)
        if "seed" in options:
            assert len(set(map(tuple, whole.tokens))) == 4  # each image its own draws
        else:  # the captions ran to the budget the longest prompt leaves, not to their own prompt's
            assert [len(t) for t in whole.tokens] == [24 - longest] * 4 and len(prompts[0]) < longest


@pytest.mark.parametrize("graph", GRAPHS)
def test_the_decoder_step_reads_its_fixed_capacity_cache_in_place_as_the_torch_decoder(model, tokenizer, exported,
                                                                                      graph):
    """The runtime's cache has room for more positions than are filled, and whatever the unfilled slots hold is
    never read: stepping one token at a time gives every position the logits of torch's full forward pass, and each
    step writes its new position's keys/values (torch's) into their slots in place, no other slot."""
    onnx, _ = OnnxModel.load(exported[GRAPHS[graph]])
    images = torch.randn(2, 3, 64, 64)
    ids = torch.tensor([tokenizer.question_prompt("what color is the small circle?")[:6]] * 2)  # (2, 6)
    ids[1, 3:] = torch.tensor([7, 8, 9])
    with torch.no_grad():
        expected = model(images, ids).logits  # (2, 6, V)
        image_kv, _ = model.encode(images)
        cache = model.decoder.new_cache(2, like=image_kv[0][0], length=ids.shape[1])
        model.decoder(ids, image_kv, cache=cache)  # torch's keys/values of every position: cache.k (L, 2, H, 6, hd)
    encoded, _ = onnx.encode(images)
    backend = OrtDecoder(onnx, encoded)
    backend.start(rows=2, length=ids.shape[1] + 4, maps=False)  # 4 slots never filled
    backend.cache[...] = np.random.default_rng(0).uniform(-1e3, 1e3, backend.cache.shape)  # garbage everywhere: the
    # slots not yet filled must be masked out
    garbage = backend.cache.copy()
    steps = []
    for t in range(ids.shape[1]):
        logits, _ = backend.step(ids[:, t:t + 1], torch.full((2, 1), t), None)
        steps.append(logits)
    got = torch.stack(steps, dim=1)
    assert float((expected[:, 1:] - expected[:, :1]).abs().max()) > 1e-2  # positions differ: the cache matters
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert backend.cached == ids.shape[1] and backend.cache.shape[4] == ids.shape[1] + 4
    written = torch.from_numpy(backend.cache[..., :ids.shape[1], :])  # (2, L, 2, H, 6, hd)
    torch.testing.assert_close(written, torch.stack([cache.k, cache.v])[..., :ids.shape[1], :], atol=1e-4, rtol=0)
    assert np.array_equal(backend.cache[..., ids.shape[1]:, :], garbage[..., ids.shape[1]:, :])  # the rest untouched
    import onnx as onnx_format

    nodes = onnx_format.load(str(exported[GRAPHS[graph]] / "decoder.onnx")).graph.node
    ops = [node.op_type for node in nodes]
    assert ops.count("MultiHeadAttention") == 2 * onnx.num_layers  # one ONNX Runtime operator per attention
    scales = [onnx_format.helper.get_attribute_value(a) for n in nodes if n.op_type == "MultiHeadAttention"
              for a in n.attribute if a.name == "scale"]
    assert scales == [1.0] * 2 * onnx.num_layers  # queries scaled by their projection: products without a copy
    shaped = [n.input[0] for n in nodes if n.op_type == "Shape" and n.input[0].startswith("image_")]
    assert shaped == ["image_key_0"] * onnx.num_layers  # every block's image count from one input (`_share_shapes`)
    assert ops.count("Softmax") == (2 if onnx.maps else 0)  # maps: one over all layers' scores, cross and self
    if onnx.maps:  # and nothing else: a concatenation each, no shape arithmetic to regroup them (the runtime does)
        plain = onnx_format.load(str(exported[GRAPHS["without_maps"]] / "decoder.onnx")).graph.node
        assert sorted(ops) == sorted([n.op_type for n in plain] + ["Concat", "Concat", "Softmax", "Softmax"])
    assert ops.count("BiasGelu") == onnx.num_layers and "SkipLayerNormalization" not in ops  # `fuse`'s choice


def test_int8_differs_from_fp32_by_a_bounded_amount(exported, tokenizer):
    _, fp32_dir, int8_dir, _ = exported
    fp32, _ = OnnxModel.load(fp32_dir)
    int8, _ = OnnxModel.load(int8_dir)
    assert int8.facts["quantize"] == "int8" and fp32.facts["quantize"] is None
    images = torch.randn(4, 3, 64, 64)
    ids = torch.tensor([tokenizer.caption_prompt() + [7, 8, 9]] * 4)
    logits = []
    for onnx in (fp32, int8):
        encoded, _ = onnx.encode(images)
        logits.append(torch.from_numpy(onnx.teacher_forced(encoded, ids.numpy())[0]))
    relative = float((logits[1] - logits[0]).norm() / logits[0].norm())
    print(f"int8 logits differ from fp32 by {relative:.2%} (relative L2)")
    assert 1e-4 < relative < 0.05  # quantized (not the fp32 graph again), yet close
    assert (logits[1].argmax(-1) == logits[0].argmax(-1)).float().mean() >= 0.75


@pytest.mark.parametrize(("name", "args"), [("test_resnet", {}), ("test_vit", {"img_size": 64, "reg_tokens": 2})])
def test_cnn_and_vit_trunks_export_and_decode_as_torch(tokenizer, tmp_path, name, args, monkeypatch):
    torch.manual_seed(0)
    model = VisionLanguageModel(tiny_config(name=name, feature_level=-1, model_args=args), len(tokenizer)).eval()
    monkeypatch.setattr(onednn, "MIN_PRODUCT", 0)  # every product one that CPU inference runs on oneDNN:
    with torch.no_grad():
        for block in model.decoder.blocks:
            block.cross_attn.proj.weight.mul_(10)
        export_onnx(model, tokenizer, tmp_path, maps=True)  # exported without gradients, it traces plain ones
    onnx, _ = OnnxModel.load(tmp_path)
    assert onnx.grid == model.encoder(torch.randn(1, 3, 64, 64))[1]  # the ViT's prefix tokens are not patches
    images = torch.randn(2, 3, 64, 64)
    ours, theirs = _both(model, onnx, tokenizer, images, _prompts(tokenizer, 2), beam_size=2)
    assert theirs.tokens == ours.tokens and abs(ours.scores[0] - ours.scores[1]) > 1e-3  # the images matter
    torch.testing.assert_close(torch.tensor(theirs.scores), torch.tensor(ours.scores), atol=1e-4, rtol=0)
    # the encoder's products over tokens are 2D, so ONNX Runtime folds each with its bias into one Gemm
    import onnx as onnx_format
    import onnxruntime as ort

    flat = [m for m in EncoderGraph(model, images).encoder.modules() if isinstance(m, _FlatLinear)]
    blocks = len(model.encoder.trunk.blocks) if name == "test_vit" else 0
    assert len(flat) == 6 * blocks + 1  # q, k, v, proj, fc1, fc2 in each block; the projection to the decoder's width
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "encoder.onnx"), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx_format.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops.count("Gemm") == len(flat) + 1  # and the image keys/values' product
    # each ViT block's attention is ONNX Runtime's one operator
    assert ops.count("MultiHeadAttention") == blocks and "Softmax" not in ops


def _damage_weights(path):
    data = bytearray((path / "decoder.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "decoder.onnx").write_bytes(bytes(data))


def _truncate(path):
    data = (path / "encoder.onnx").read_bytes()
    (path / "encoder.onnx").write_bytes(data[:len(data) // 3])


def _other_config(path):
    config = json.loads((path / "config.json").read_text())
    config["vocab_size"] += 1
    (path / "config.json").write_text(json.dumps(config))


def _edit_model_config(section, key, change):
    def edit(path):
        config = json.loads((path / "config.json").read_text())
        config["model"][section][key] = change(config["model"][section][key])
        (path / "config.json").write_text(json.dumps(config))
    return edit


def _no_data_config(path):
    facts = json.loads((path / "onnx.json").read_text())
    del facts["data_config"]
    (path / "onnx.json").write_text(json.dumps(facts))


def _no_facts(path):
    (path / "onnx.json").unlink()


def _old_format(path):
    facts = json.loads((path / "onnx.json").read_text())
    facts["onnx_format_version"] = 1  # an export whose step passed the whole cache in and out
    (path / "onnx.json").write_text(json.dumps(facts))


@pytest.mark.parametrize(("damage", "message"), [
    (_damage_weights, r"decoder\.onnx: differs from the file exported"),
    (_truncate, r"encoder\.onnx: differs from the file exported"),
    (_other_config, r"config\.json: vocab_size \d+ does not match the exported graphs"),
    (_edit_model_config("decoder", "depth", lambda d: d + 1), r"config\.json: decoder\.depth is \d+, the exported "
                                                               r"graphs' is \d+"),
    (_edit_model_config("decoder", "max_length", lambda n: n + 8), r"config\.json: decoder\.max_length is"),
    (_edit_model_config("encoder", "image_size", lambda n: n * 2), r"config\.json: encoder\.image_size is"),
    (_no_data_config, r"onnx\.json: no 'data_config'; export the model again"),
    (_no_facts, r"not a vlm ONNX export \(missing onnx\.json"),
    (_old_format, r"onnx\.json: onnx_format_version 1, this vlm reads 5; export the model again"),
], ids=["flipped_byte", "truncated", "mismatched_config", "other_depth", "other_max_length", "other_image_size",
        "no_data_config", "torch_dir", "old_format"])
def test_a_damaged_or_mismatched_export_is_one_line(exported, tmp_path, capsys, damage, message):
    broken = tmp_path / "broken"
    shutil.copytree(exported[1], broken)
    damage(broken)
    with pytest.raises(VLMError, match=message):
        load(broken, runtime="onnx")
    assert main(["caption", str(random_images(1)[0].save(tmp_path / "a.png") or tmp_path / "a.png"), "--model",
                 str(broken), "--runtime", "onnx"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert main(["attend", str(tmp_path / "a.png"), "--model", str(exported[2]), "--runtime", "onnx", "--out",
                 str(tmp_path / "o")]) == 1  # the int8 export has no maps
    assert "exported without maps" in capsys.readouterr().err
    assert main(["caption", str(tmp_path / "a.png"), "--model", str(exported[2])]) == 1  # an export, torch runtime
    assert ("an ONNX export (vlm export): vlm caption, ask, attend, eval, ground, predict, demo and serve run it with "
            "--runtime onnx") in capsys.readouterr().err


def test_a_grid_that_does_not_fit_the_encoder_is_one_line(exported, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(exported[3], broken)
    facts = json.loads((broken / "onnx.json").read_text())
    facts["grid"] = [facts["grid"][0] + 1, facts["grid"][1]]
    (broken / "onnx.json").write_text(json.dumps(facts))
    with pytest.raises(VLMError, match=r"onnx\.json: grid \[\d+, \d+\] and num_prefix 0 do not match the encoder's "
                                       r"\d+ image tokens"):
        load(broken, runtime="onnx").attend(random_images(1)[0])


@pytest.mark.parametrize("family", ["tiny_blip", "tiny_vit_gpt2"])
def test_an_imported_hub_model_exports_and_runs_as_its_torch_path(tmp_path, family):
    from tests import hub_models
    from vlm.hub import load_hf

    getattr(hub_models, family)(tmp_path / "hf")
    model, tokenizer = load_hf(str(tmp_path / "hf"))
    assert model.encoder.num_prefix == 1  # the decoder reads the ViT's class token too; maps drop it
    export_onnx(model, tokenizer, tmp_path / "onnx", maps=True)
    ours, theirs = Captioner(model, tokenizer, "cpu"), load(tmp_path / "onnx", runtime="onnx", threads=1)
    images = random_images(2)
    assert theirs.caption(images, beam_size=2, max_new_tokens=8) == ours.caption(images, beam_size=2,
                                                                                  max_new_tokens=8)
    a, b = ours.attend(images[1], max_new_tokens=8), theirs.attend(images[1], max_new_tokens=8)
    assert b.text == a.text and a.maps.shape == b.maps.shape == (8, *theirs.model.grid)
    assert a.maps.std() > 0.1 * a.maps.mean()  # not uniform
    assert abs(b.maps - a.maps).max() < 1e-4
    # `vlm export` without maps (the step graph it writes by default), straight from the Hugging Face directory
    assert main(["export", "--model", f"hf:{tmp_path / 'hf'}", "--out", str(tmp_path / "plain")]) == 0
    plain = load(tmp_path / "plain", runtime="onnx", threads=1)
    assert plain.caption(images, beam_size=2, max_new_tokens=8) == ours.caption(images, beam_size=2, max_new_tokens=8)


def test_eval_ground_and_demo_run_an_export_with_runtime_onnx_as_the_torch_model(exported, tmp_path, capsys):
    torch_dir, onnx_dir, *_ = exported
    image, said = tmp_path / "scene.png", {}
    make_scene(0, "val", image_size=64).image.save(image)
    (caption,) = load(torch_dir, device="cpu").caption(image)
    phrase = caption.split()[1]
    for name, model, runtime in (("torch", torch_dir, "torch"), ("onnx", onnx_dir, "onnx")):
        assert main(["eval", "--model", str(model), "--runtime", runtime, "--num_scenes", "6"]) == 0
        metrics = json.loads(capsys.readouterr().out)
        assert main(["ground", "--model", str(model), "--runtime", runtime, str(image), phrase]) == 0
        found = json.loads(capsys.readouterr().out)
        assert main(["demo", "--model", str(model), "--runtime", runtime, "--out", str(tmp_path / name)]) == 0
        said[name] = (metrics, found, capsys.readouterr().out.replace(str(tmp_path / name), "OUT"))
    (metrics, found, demo), (onnx_metrics, onnx_found, onnx_demo) = said["torch"], said["onnx"]
    assert metrics["caption"]["mean_length"] > 1 and metrics["grounding"]["phrases"] > 6  # something to compare
    assert onnx_metrics["caption"] == metrics["caption"] and onnx_metrics["vqa"] == metrics["vqa"]
    assert onnx_metrics["grounding"] == pytest.approx(metrics["grounding"], abs=1e-4)
    assert onnx_found["tokens"] == found["tokens"] and onnx_found["box"] == pytest.approx(found["box"], abs=1e-2)
    assert onnx_demo == demo

    plain = exported[3]  # without maps: what needs them is left out, with the reason, and the rest is scored
    assert main(["eval", "--model", str(plain), "--runtime", "onnx", "--num_scenes", "6"]) == 0
    said = capsys.readouterr()
    unmapped = json.loads(said.out)
    assert unmapped["caption"] == metrics["caption"] and unmapped["grounding"] == {"skipped": NO_MAPS}
    assert f"note: grounding {NO_MAPS}" in said.err
    assert main(["demo", "--model", str(plain), "--runtime", "onnx", "--out", str(tmp_path / "plain")]) == 0
    said = capsys.readouterr()
    assert said.out.replace(str(tmp_path / "plain"), "OUT") == "\n".join(demo.splitlines()[:-1]) + "\n"
    assert said.err == f"note: attention overlays {NO_MAPS}\n"
    assert main(["predict", "--model", str(plain), "--runtime", "onnx", "--input", str(image), "--out",
                 str(tmp_path / "predicted"), "--maps"]) == 1  # refused before any work
    assert capsys.readouterr().err == f"vlm predict: error: {plain}: exported without maps; export again with vlm " \
                                      "export --maps\n" and not (tmp_path / "predicted").exists()


def test_serve_runs_an_export_with_runtime_onnx_as_the_torch_model(exported, tmp_path):
    import httpx

    torch_dir, onnx_dir, *_ = exported
    server = ServeProcess(onnx_dir, tmp_path / "serve.log", "--runtime", "onnx")
    try:
        url = server.ready()
        images = [make_scene(i, "val", image_size=64).image for i in range(2)]
        files = [{"image": ("a.png", _png(image), "image/png")} for image in images]
        ours = load(torch_dir, device="cpu")
        captions = [httpx.post(url + "api/caption", files=f, timeout=60).json()["caption"] for f in files]
        assert captions == ours.caption(images) and len(set(captions)) == 2
        body = httpx.post(url + "api/attend", files=files[0], data={"method": "rollout"}, timeout=60).json()
        expected = ours.attend(images[0], method="rollout")
        assert body["tokens"] == expected.tokens and np.abs(np.array(body["maps"]) - expected.maps).max() < 1e-4
        refused = httpx.post(url + "api/attend", files=files[0], data={"method": "chefer"}, timeout=60)
        assert refused.status_code == 400 and "chefer" in refused.json()["error"]
    finally:
        server.stop()


def _png(image) -> bytes:
    import io

    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
