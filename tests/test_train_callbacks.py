"""vlm/train/callbacks.py: validation generation metrics."""

from __future__ import annotations

from dataclasses import replace

import lightning as L
import numpy as np
import pytest
import torch

from tests.conftest import tiny_config
from vlm.config import DataConfig, DecodingConfig, OptimConfig
from vlm.data.module import DataModule
from vlm.data.transforms import image_transform
from vlm.model.generate import generate
from vlm.train.module import CaptionModule


def test_validation_metrics_from_the_feature_cache_equal_those_from_images(tokenizer, tmp_path):
    from vlm.train.callbacks import GenerationMetrics

    torch.manual_seed(0)
    module = CaptionModule.create(tiny_config(trainable=False), OptimConfig(), tokenizer)
    cfg = DataConfig(train_scenes=8, val_scenes=6, batch_size=4, num_workers=0)
    transform = image_transform(module.model.encoder.trunk, 64)
    data = DataModule(cfg, tokenizer, transform, 64)
    cached = DataModule(replace(cfg, feature_cache=str(tmp_path / "features.npy")), tokenizer, transform, 64,
                        encoder=module.model.encoder)
    results = {}
    for name, source in (("images", data), ("cache", cached)):
        metrics = GenerationMetrics(samples=0, decoding=DecodingConfig(max_new_tokens=10))
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[metrics])
        trainer.validate(module, source)
        results[name] = metrics.metrics, metrics._captions, metrics._answers
    (metrics_images, captions, answers), (metrics_cache, cached_captions, cached_answers) = results.values()
    assert len(captions) == 6 and len(answers) > 6
    assert cached_captions == captions and cached_answers == answers
    assert metrics_cache == pytest.approx(metrics_images, rel=1e-9)
    # Generation from the cached maps is generation from the images: the same tokens and log-probabilities.
    images = torch.stack([data.val_set[i][0] for i in range(6)])
    maps = torch.from_numpy(np.load(tmp_path / "features.val.npy"))
    prompts = [tokenizer.caption_prompt()] * 6
    kw = dict(eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, config=DecodingConfig(max_new_tokens=8))
    with torch.no_grad():
        from_images = generate(module.model.eval(), module.model.encode(images)[0], prompts, **kw)
        from_maps = generate(module.model, module.model.encode_features(maps)[0], prompts, **kw)
    assert from_maps.tokens == from_images.tokens
    assert from_maps.scores == pytest.approx(from_images.scores, rel=1e-5)
    assert len(set(from_images.scores)) == 6  # the scores depend on the image
