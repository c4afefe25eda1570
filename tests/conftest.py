"""Tiny models and data shared by the tests: CPU, seconds, no network."""

from __future__ import annotations

import pytest
import torch

from vlm.config import DecoderConfig, EncoderConfig, ModelConfig
from vlm.data.builtin import scene_texts
from vlm.model.vlm import VisionLanguageModel
from vlm.text.tokenizer import Tokenizer


def tiny_config(**encoder) -> ModelConfig:
    enc = dict(name="resnet18", feature_level=2, image_size=64, model_args={"channels": [8, 16, 32, 64]})
    enc.update(encoder)
    return ModelConfig(encoder=EncoderConfig(**enc), decoder=DecoderConfig(width=32, depth=2, num_heads=4))


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(scene_texts(300, seed=0))


@pytest.fixture
def tiny_model(tokenizer) -> VisionLanguageModel:
    torch.manual_seed(0)
    return VisionLanguageModel(tiny_config(), len(tokenizer)).eval()
