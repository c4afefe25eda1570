"""vlm.hub: Hugging Face captioners imported into vlm run exactly as in transformers (offline: tiny random models
built and saved here, then imported).

Beam search is compared where the two algorithms coincide: no hypothesis ends before max_new_tokens (asserted),
so every kept hypothesis has the same length and length_penalty cannot reorder them. When hypotheses end early,
transformers moves them out of the beam and keeps K running ones, while vlm keeps a finished one in its slot at
its final score; the results may then differ (README, Start from a pretrained captioner).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tests.hub_models import BERT_VOCAB, MEAN, STD, tiny_blip, tiny_vit_bert, tiny_vit_gpt2
from vlm.api import Captioner, read_model
from vlm.checkpoint import load_model
from vlm.cli import main
from vlm.config import DecodingConfig, MapConfig
from vlm.errors import VLMError
from vlm.grounding.methods import generated_raw_maps, token_maps
from vlm.hub import import_model, load_hf
from vlm.model.generate import generate

pytest.importorskip("transformers")

BUILDERS = {"blip": tiny_blip, "vit-gpt2": tiny_vit_gpt2, "vit-bert": tiny_vit_bert}


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """Each family: (its directory, the transformers model, the imported vlm model and tokenizer)."""
    root = tmp_path_factory.mktemp("hub")
    out = {}
    for name, build in BUILDERS.items():
        source = build(root / name)
        model, tok = load_hf(f"hf:{root / name}")
        out[name] = (root / name, source, model.eval(), tok)
    return out


def _pixels(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _source_logits(name: str, source, pixels: torch.Tensor, ids: torch.Tensor, **kw):
    if name == "blip":  # its text decoder's output has the cross-attentions
        return source.text_decoder(input_ids=ids, encoder_hidden_states=source.vision_model(pixels)[0], **kw)
    return source(pixel_values=pixels, decoder_input_ids=ids, **kw)


def _ids(tok, B: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    words = torch.randint(6, min(len(tok), 39), (B, 6), generator=g)
    return torch.cat([torch.full((B, 1), tok.bos_id), words], 1)


@pytest.mark.parametrize("name", BUILDERS)
def test_logits_equal_the_source_models(families, name):
    _, source, model, tok = families[name]
    pixels, ids = _pixels(), _ids(tok)
    with torch.no_grad():
        ref = _source_logits(name, source, pixels, ids).logits
        ours = model(pixels, ids).logits
    # Not trivially equal: the logits are large and differ between the two images and texts.
    assert ref.std() > 0.5 and (ref[0] - ref[1]).abs().max() > 0.5
    # Equal up to one grey level where PIL's resampling rounds differently (HF resizes a float array): 1/255/std.
    one_level = 1 / 255 / min(STD) + 1e-6
    diff = (ours - ref).abs()
    assert diff.max() <= one_level and (diff > 1e-4).float().mean() < 0.02


@pytest.mark.parametrize("name", BUILDERS)
def test_greedy_tokens_equal_transformers_generate(families, name):
    path, source, model, tok = families[name]
    pixels, steps = _pixels(3), 8
    if name != "vit-gpt2":
        from transformers import BertTokenizerFast

        hf_tok = BertTokenizerFast.from_pretrained(path)
    prompt = tok.caption_prompt("a picture of" if name != "vit-gpt2" else None)
    with torch.no_grad():
        gen = generate(model, model.encode(pixels)[0], [prompt] * 3, eos_id=tok.eos_id, pad_id=tok.pad_id,
                       config=DecodingConfig(max_new_tokens=steps))
        kw = dict(max_new_tokens=steps, do_sample=False, num_beams=1, repetition_penalty=1.0, min_length=0)
        if name == "blip":  # transformers' BLIP puts its decoder-start token ([DEC]) in place of [CLS], drops [SEP]
            ids = torch.tensor([hf_tok("a picture of")["input_ids"]] * 3)  # [CLS] a picture of [SEP]
            ref = source.generate(pixel_values=pixels, input_ids=ids, **kw)
        elif name == "vit-bert":  # its decoder starts from [CLS] (decoder_start_token_id)
            ids = torch.tensor([hf_tok("a picture of")["input_ids"][:-1]] * 3)
            ref = source.generate(pixel_values=pixels, decoder_input_ids=ids, **kw)
        else:
            ref = source.generate(pixel_values=pixels, **kw)
    assert ref.shape[1] > len(prompt)
    expected = []
    for row in ref[:, len(prompt):].tolist():
        expected.append(row[:row.index(tok.eos_id)] if tok.eos_id in row else row)
    assert len({tuple(t) for t in expected}) > 1  # the images give different captions
    assert gen.tokens == expected


def test_beam_search_equals_transformers_when_no_hypothesis_ends_early(families):
    _, source, model, tok = families["blip"]
    pixels, steps = _pixels(2), 6
    with torch.no_grad():
        gen = generate(model, model.encode(pixels)[0], [tok.caption_prompt()] * 2, eos_id=tok.eos_id,
                       pad_id=tok.pad_id, config=DecodingConfig(max_new_tokens=steps, beam_size=3, length_penalty=1.0))
        greedy = generate(model, model.encode(pixels)[0], [tok.caption_prompt()] * 2, eos_id=tok.eos_id,
                          pad_id=tok.pad_id, config=DecodingConfig(max_new_tokens=steps))
        ref = source.generate(pixel_values=pixels, max_new_tokens=steps, num_beams=3, do_sample=False,
                              length_penalty=1.0, early_stopping=False, repetition_penalty=1.0)
    assert not any(gen.ended)  # the setting where the algorithms coincide
    assert gen.tokens != greedy.tokens  # beam search chose differently from greedy: the comparison has teeth
    assert gen.tokens == ref[:, 1:].tolist()


@pytest.mark.parametrize("name", ["blip", "vit-gpt2"])
def test_maps_equal_source_cross_attention_without_the_class_token(families, name):
    _, source, model, tok = families[name]
    pixels, ids = _pixels(), _ids(tok)
    prompt_len = 2
    with torch.no_grad():
        cross = _source_logits(name, source, pixels, ids, output_attentions=True).cross_attentions
        image_kv, grid = model.encode(pixels)
    prompts, targets = ids[:, :prompt_len].tolist(), ids[:, prompt_len:].tolist()
    maps = token_maps(model, image_kv, grid, prompts, targets, MapConfig(method="raw"), per_layer=True)
    rows = range(prompt_len - 1, ids.shape[1] - 1)  # the positions that predict the target tokens
    for s in range(2):
        for layer, weights in enumerate(cross):  # (B, H, T, 1 + N)
            patches = weights[s].mean(0)[list(rows), 1:]
            expected = patches / patches.sum(-1, keepdim=True)
            assert expected.max() - expected.min() > 0.05  # not uniform
            assert (maps[s][layer].flatten(1) - expected).abs().max() < 1e-5
    assert model.encoder.num_prefix == 1 and maps[0].shape[-2:] == (4, 4)


def test_export_loads_back_and_the_captioner_takes_a_prompt_but_refuses_questions(families, tmp_path, capsys):
    path, _, model, tok = families["blip"]
    out = import_model(f"hf:{path}", tmp_path / "blip")
    again, tok2 = load_model(out)
    converted, tok3 = read_model(f"hf:{path}")  # what --init hf:DIR and vlm export --model hf:DIR read
    pixels, ids = _pixels(), _ids(tok)
    with torch.no_grad():
        assert torch.equal(again.eval()(pixels, ids).logits, model(pixels, ids).logits)
        assert torch.equal(converted.eval()(pixels, ids).logits, model(pixels, ids).logits)
    assert tok3.special_tokens == tok2.special_tokens and len(tok3) == len(tok2)
    assert tok2.special_tokens == {"bos": "[DEC]", "eos": "[SEP]", "pad": "[PAD]", "unk": "[UNK]"}
    captioner = Captioner.load(out, device="cpu")
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    (caption,) = captioner.caption(image, prompt="a picture of", max_new_tokens=4)
    assert caption.startswith("a picture of ")
    attended = captioner.attend(image, prompt="a picture of", max_new_tokens=4)
    assert attended.text == caption and attended.maps.shape[1:] == (4, 4)
    with pytest.raises(VLMError, match="answers no questions"):
        captioner.ask(image, "what is it ?")
    image.save(tmp_path / "red.png")
    assert main(["ask", str(tmp_path / "red.png"), "what is it ?", "--model", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "answers no questions" in err
    assert main(["predict", "--model", str(out), "--input", str(tmp_path / "red.png"), "--out", str(tmp_path / "p"),
                 "--question", "what is it ?"]) == 1  # vlm predict says it as vlm ask does
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "answers no questions" in err
    from fastapi.testclient import TestClient

    from vlm.serve import create_app

    with TestClient(create_app(captioner)) as client:
        reply = client.post("/api/ask", files={"image": ("red.png", (tmp_path / "red.png").read_bytes())},
                            data={"question": "what is it ?"})
    assert reply.status_code == 400 and "answers no questions" in reply.text
    # Images are normalised with the source's processor constants, resized with its interpolation.
    import timm.data

    data = timm.data.resolve_data_config({}, model=captioner.model.encoder.trunk)
    assert list(data["mean"]) == MEAN and list(data["std"]) == STD and data["interpolation"] == "bicubic"


def test_unsupported_architectures_are_refused_in_one_line(tmp_path, capsys):
    for arch, model_type in (("GitForCausalLM", "git"), ("LlavaForConditionalGeneration", "llava")):
        folder = tmp_path / model_type
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"architectures": [arch], "model_type": model_type}))
        with pytest.raises(VLMError, match=f"unsupported architecture {arch}"):
            load_hf(f"hf:{folder}")
        assert main(["import", "--from", f"hf:{folder}", "--out", str(tmp_path / "out")]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and arch in err
    assert not (tmp_path / "out").exists()


def test_a_bin_only_checkpoint_loads_through_weights_only(families, tmp_path):
    from safetensors.torch import load_file

    path, _, model, tok = families["vit-gpt2"]
    copy = tmp_path / "bin"
    shutil.copytree(path, copy)
    state = load_file(copy / "model.safetensors")
    (copy / "model.safetensors").unlink()
    torch.save(state, copy / "pytorch_model.bin")
    again, _ = load_hf(f"hf:{copy}")
    pixels, ids = _pixels(), _ids(tok)
    with torch.no_grad():
        assert torch.equal(again.eval()(pixels, ids).logits, model(pixels, ids).logits)
    torch.save({"state": state, "code": Image.new("RGB", (1, 1))}, copy / "pytorch_model.bin")  # not plain data
    with pytest.raises(VLMError, match="refused to unpickle"):
        load_hf(f"hf:{copy}")


def test_generation_cache_is_sized_to_prompt_and_new_tokens(families):
    """A decoder allowing 512 positions (BLIP) generating 5 tokens allocates a cache of prompt + 5 positions."""
    _, _, model, tok = families["blip"]
    decoder = model.decoder
    decoder.cfg.max_length = 512  # the positions the cache could be sized to; the embedding table is not read past 9
    sizes = []
    new_cache = decoder.new_cache

    def recording(*args, **kwargs):
        cache = new_cache(*args, **kwargs)
        sizes.append(cache.k.shape[3])
        return cache

    decoder.new_cache = recording
    try:
        prompt = tok.caption_prompt("a picture of")
        with torch.no_grad():
            generate(model, model.encode(_pixels(1))[0], [prompt], eos_id=tok.eos_id, pad_id=tok.pad_id,
                     config=DecodingConfig(max_new_tokens=5, beam_size=2))
    finally:
        del decoder.new_cache
        decoder.cfg.max_length = 64
    assert sizes == [len(prompt) + 5]


def test_no_network_or_missing_directory_is_one_line(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network attempt, however configured
    assert main(["import", "--from", "hf:nobody/no-such-captioner", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot download it from the Hugging Face Hub" in err
    (tmp_path / "empty").mkdir()
    with pytest.raises(VLMError, match="config.json: no such file"):
        load_hf(f"hf:{tmp_path / 'empty'}")


def test_bert_vocabulary_is_the_sources(families):
    _, _, _, tok = families["vit-bert"]
    assert len(tok) == len(BERT_VOCAB) and tok.bos_id == BERT_VOCAB.index("[CLS]") and tok.sep_id is None


def test_fine_tuning_an_imported_model_lowers_its_loss_and_exports(families, tmp_path):
    """Import -> vlm train --init for a few steps on a tiny JSONL -> export -> load."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vlm.config import DataConfig, OptimConfig, SourceConfig, TrainConfig, TrainerConfig, ValConfig
    from vlm.train.run import train

    path = families["blip"][0]
    init = import_model(f"hf:{path}", tmp_path / "imported")
    colours = {"red": (220, 20, 20), "blue": (20, 20, 220), "green": (20, 200, 20), "white": (250, 250, 250)}
    lines = []
    for i, (word, rgb) in enumerate(colours.items()):
        Image.new("RGB", (32, 32), rgb).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "captions": [f"a {word} car on the street"]}))
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    cfg = TrainConfig(data=DataConfig(sources=[SourceConfig(path=str(tmp_path / "train.jsonl"))], batch_size=4,
                                      num_workers=0),
                      optim=OptimConfig(lr=5e-3, warmup_steps=0),
                      trainer=TrainerConfig(max_steps=4, max_time=None, accelerator="cpu", devices=1,
                                            log_every_n_steps=1, val_check_interval=100),
                      val=ValConfig(generate=False))
    exported = train(cfg, tmp_path / "run", init=str(init))
    events = EventAccumulator(str(next((tmp_path / "run" / "lightning_logs").glob("version_*")))).Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert len(losses) == 4 and losses[-1] < 0.85 * losses[0] and sorted(losses, reverse=True) == losses
    tuned = Captioner.load(exported, device="cpu")
    assert tuned.model.cfg.decoder.norm == "post" and tuned.tokenizer.bos_id == BERT_VOCAB.index("[DEC]")
    # The export holds the trained weights: the training caption is now more likely than before.
    pixels = tuned.transform(Image.open(tmp_path / "1.png"))[None]
    caption = [*tuned.tokenizer.caption_prompt(), *tuned.tokenizer.encode("a blue car on the street")]
    ids = torch.tensor([caption])

    def log_likelihood(model) -> float:
        with torch.no_grad():
            logp = model.eval()(pixels, ids[:, :-1]).logits.log_softmax(-1)
        return float(logp.gather(-1, ids[:, 1:, None]).sum())

    assert log_likelihood(tuned.model) > log_likelihood(load_model(init)[0]) + 1.0


def test_grounding_loss_map_of_an_imported_model_is_vlm_attends_map(families):
    """The training loss's share in a box, for a model whose decoder also attends to the class token, is the share
    of the map `vlm attend` draws (class column dropped, renormalised over the patches)."""
    from vlm.train.module import box_coverage, grid_mass_in_boxes

    _, _, model, tok = families["blip"]
    pixels, ids = _pixels(), _ids(tok)
    prompt_len, size = 2, (32, 32)
    with torch.no_grad():
        out = model(pixels, ids, need_weights=True)
        image_kv, grid = model.encode(pixels)
    layers = list(range(model.cfg.decoder.depth))
    where = torch.tensor([[0, 3], [1, 4], [1, 5]])  # [sequence, position predicting the token]
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0], [8.0, 8.0, 24.0, 16.0], [16.0, 0.0, 16.0, 32.0]])
    mass = grid_mass_in_boxes(out.cross_attentions, layers, where, boxes, grid, size, prefix=model.encoder.num_prefix)
    prompts, targets = ids[:, :prompt_len].tolist(), ids[:, prompt_len:].tolist()
    maps = token_maps(model, image_kv, grid, prompts, targets, MapConfig(method="raw", layers=layers))
    coverage = box_coverage(boxes, grid, size)  # (G, N)
    expected = torch.stack([(maps[s][p - prompt_len + 1].flatten() * coverage[g]).sum()
                            for g, (s, p) in enumerate(where.tolist())])
    # Not trivially equal: the class token holds a share of the attention the patches' renormalisation removes.
    raw_share = torch.stack([out.cross_attentions[i][where[:, 0], :, where[:, 1], 1:].mean(1) for i in layers])
    naive = (raw_share.mean(0) * coverage).sum(-1)
    assert (naive - expected).abs().max() > 1e-3
    assert (mass - expected).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["blip", "vit-gpt2"])
def test_images_are_prepared_as_the_source_processor_prepares_them(families, name):
    """A photo gets the pixels the source's own image processor gives it (size, resampling, mean and std), so an
    imported model sees what the original saw."""
    from transformers import AutoImageProcessor

    path, _, model, tok = families[name]
    captioner = Captioner(model, tok, device="cpu")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (41, 57, 3), dtype=np.uint8))  # not square, not the input size
    ours = captioner.transform(image)
    ref = torch.as_tensor(AutoImageProcessor.from_pretrained(path)(image, return_tensors="np")["pixel_values"][0])
    assert ours.shape == ref.shape == (3, 32, 32)
    assert ref.std() > 0.5  # not trivially equal: noise, normalised
    # Equal up to one grey level where PIL's resampling rounds differently (HF resizes a float array): 1/255/std.
    one_level = 1 / 255 / min(STD) + 1e-6
    diff = (ours - ref).abs()
    assert diff.max() <= one_level and (diff > 1e-4).float().mean() < 0.02


def test_generated_raw_maps_of_an_imported_model_drop_the_class_token_as_token_maps_do(families):
    """`vlm predict`'s one-pass raw maps (from generation's own cross-attention) for a decoder that also attends to
    its ViT's class token: the class column dropped and each row renormalised, as `token_maps` does."""
    _, _, model, tok = families["blip"]
    pixels, ids = _pixels(), _ids(tok)
    prompts = ids[:, :2].tolist()
    with torch.no_grad():
        image_kv, grid = model.encode(pixels)
        gen = generate(model, image_kv, prompts, eos_id=tok.eos_id, pad_id=tok.pad_id,
                       config=DecodingConfig(max_new_tokens=4), return_attention=True)
        made = generated_raw_maps(model, gen.attentions, grid, MapConfig(), prefix=model.encoder.num_prefix)
        expected = token_maps(model, image_kv, grid, prompts, gen.tokens, MapConfig())
    assert model.encoder.num_prefix == 1 and gen.attentions[0].shape[-1] == grid[0] * grid[1] + 1
    assert gen.attentions[0][..., 0].mean() > 1e-3  # the class token holds a share the renormalisation removes
    for m, e in zip(made, expected, strict=True):
        assert m.shape == e.shape and len(m) == 4
        torch.testing.assert_close(m, e, atol=1e-5, rtol=1e-4)


def test_import_refuses_to_overwrite_its_source(tmp_path, capsys):
    source = tmp_path / "blip"
    tiny_blip(source)
    capsys.readouterr()  # transformers' progress bar
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    for out in (source, source / "."):
        assert main(["import", "--from", f"hf:{source}", "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--out {out}: is the directory of hf:{source} itself" in err
        assert {p.name: p.read_bytes() for p in source.iterdir()} == before
    load_hf(f"hf:{source}")  # still the Hugging Face model


def test_deleting_no_patch_of_an_imported_model_leaves_its_phrase_probability(families):
    """Deletion curves of a decoder that also reads its ViT's class token: the class column is never deleted and
    patch i is key i + 1 (patch 0 once deleted the class token, and the last patch went even at fraction 0). A
    GPT-2 tokenizer (byte-level BPE) finds the phrase inside the text too ("cat" is "Ġcat" there)."""
    from vlm.eval.grounding import GroundingCase, deletion_curves

    for family in ("blip", "vit-gpt2"):
        _, _, model, tok = families[family]
        captioner = Captioner(model, tok, device="cpu")
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
        text = "a cat on the table"
        result = deletion_curves(captioner, [GroundingCase(image, [("cat", (0, 0, 16, 16))], text)],
                                 fractions=(0.0, 0.5))
        seq = [*tok.caption_prompt(), *tok.encode(text)]
        (span,) = tok.phrase_tokens(text, "cat")
        with torch.no_grad():
            image_kv, grid = model.encode(captioner.transform(image)[None])
            probs = model.decode(image_kv, grid, torch.tensor([seq])).logits.softmax(-1)[0]
        at = [len(tok.caption_prompt()) + i for i in span]
        untouched = float(np.mean([probs[i - 1, seq[i]].item() for i in at]))
        assert result["curve_attention"][1] != pytest.approx(untouched, rel=1e-4)  # deleting patches changes it
        assert result["curve_attention"][0] == pytest.approx(untouched, rel=1e-5)


def test_demo_and_eval_of_an_imported_captioner_skip_the_questions(families, tmp_path, capsys):
    """An imported captioner answers no questions: `vlm demo` and `vlm eval` caption, map and ground it, and leave
    the questions out (they stopped at the first question)."""
    path, _, _, _ = families["blip"]
    model = import_model(f"hf:{path}", tmp_path / "blip")
    assert main(["demo", "--model", str(model), "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert out.count("scene") == 4 and "Q:" not in out and (tmp_path / "demo" / "attention" / "grid.png").exists()
    assert main(["eval", "--model", str(model), "--num_scenes", "2", "--java", "false"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["vqa"] is None and metrics["grounding"]["phrases"] > 0 and "CIDEr-D" in metrics["caption"]
    from vlm.data.export import write_shapes

    data = write_shapes(tmp_path / "data", 2)["jsonl"]  # captions and questions
    assert main(["eval", "--model", str(model), "--data", str(data), "--java", "false", "--out",
                 str(tmp_path / "eval")]) == 0
    metrics = json.loads(capsys.readouterr().out)  # a dataset's questions are left out too
    assert "vqa" not in metrics and metrics["caption"]["images"] == 2
    assert not (tmp_path / "eval" / "vqa_results.json").exists()


def test_a_tokenizer_far_smaller_than_the_embedding_is_refused(families, tmp_path):
    """Rows past the tokenizer's last id are padding and dropped; hundreds of them mean another model's tokenizer
    (it imported, and captioned in the wrong words or not at all)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    path, source, _, _ = families["vit-gpt2"]
    copy = tmp_path / "other_tokenizer"
    shutil.copytree(path, copy)
    words = ["<|endoftext|>", "a", "red", "circle", "blue", "square"]
    HFTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="a")).save(
        str(copy / "tokenizer.json"))
    rows = source.config.decoder.vocab_size
    with pytest.raises(VLMError, match=rf"other_tokenizer: the tokenizer has 6 tokens, the model's embedding {rows} "
                                       r"rows: not this model's tokenizer \(padding adds fewer than 128 rows\)$"):
        load_hf(f"hf:{copy}")
