"""The export format: a model exported by an earlier vlm still loads and captions as it did; a saved model loads
without the trunk weights it was trained from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_config
from vlm.api import Captioner
from vlm.checkpoint import CONFIG, FORMAT_VERSION, load_model, save_model
from vlm.data.images import load_image
from vlm.model.vlm import VisionLanguageModel

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.mark.parametrize("version", [1])
def test_a_model_exported_in_an_earlier_format_gives_its_captions(version):
    folder = FIXTURES / f"format_v{version}"
    assert json.loads((folder / "model" / CONFIG).read_text())["format_version"] == version <= FORMAT_VERSION
    expected = json.loads((folder / "expected.json").read_text())
    assert len(set(expected["captions"])) == 2  # the two images have different captions
    captioner = Captioner.load(folder / "model", device="cpu")
    images = [folder / name for name in expected["images"]]
    assert captioner.caption(images) == expected["captions"]
    # Finer than the captions, which wide margins decide: the whole next-token distributions along each caption
    # (teacher-forced), whose mean log-probability moves by ~3e-3 when one LayerNorm weight of the decoder moves 1%.
    tok = captioner.tokenizer
    prompt = tok.caption_prompt()
    for image, text, mean in zip(images, expected["captions"], expected["mean_log_softmax"], strict=True):
        pixels = captioner.transform(load_image(image))[None].to(captioner.device)
        ids = torch.tensor([prompt + tok.encode(text) + [tok.eos_id]], device=captioner.device)
        with torch.no_grad():
            logits = captioner.model(pixels, ids[:, :-1]).logits[0, len(prompt) - 1:]  # (T, V): predict the text
        assert logits.log_softmax(-1).mean().item() == pytest.approx(mean, abs=1e-4)


@pytest.mark.parametrize("encoder", [dict(pretrained=True), dict(weights="/nowhere/trunk.safetensors")],
                         ids=["pretrained", "weights_file"])
def test_a_saved_model_loads_without_the_trunk_weights_it_was_trained_from(tokenizer, tmp_path, monkeypatch, encoder):
    """A model trained from pretrained trunk weights (timm's download, or a local file) loads its own saved weights
    without downloading or reading those (offline, or on another machine, that would fail; they would be overwritten
    anyway), and its config still says what it was trained from."""
    import timm.models._builder as timm_builder

    cfg = tiny_config(**encoder)
    torch.manual_seed(0)
    model = VisionLanguageModel(cfg, len(tokenizer), pretrained=False)
    save_model(model, tokenizer, tmp_path / "model")

    def fetched(*args, **kwargs):
        raise AssertionError("the trunk's pretrained weights were loaded")

    monkeypatch.setattr(timm_builder, "load_pretrained", fetched)
    loaded, _ = load_model(tmp_path / "model")
    assert loaded.cfg == cfg
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
