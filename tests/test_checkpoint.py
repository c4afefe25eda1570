"""The export format: a model exported by an earlier vlm still loads and captions as it did."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vlm.api import Captioner
from vlm.checkpoint import CONFIG, FORMAT_VERSION
from vlm.data.images import load_image

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
