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


def test_vqa_metrics_of_questions_without_an_answer_type_are_named_unknown_as_vlm_eval_names_them():
    """Val questions with and without an answer type once crashed the sort of the types (None < str), and a JSONL
    val set without types logged val/vqa/accuracy/None."""
    from types import SimpleNamespace

    from vlm.train.callbacks import GenerationMetrics

    class References:  # image 0's question has an answer type, image 1's none (as JSONL questions may)
        def references(self, index: int) -> dict:
            return {"captions": ["a red circle"],
                    "questions": [{"question": "what color is it?", "answers": ["red"],
                                   "kind": "other" if index == 0 else None}]}

    logged = {}
    metrics = GenerationMetrics(samples=0)
    metrics._captions = {0: "a red circle", 1: "a red square"}
    metrics._answers = {(0, 0): "red", (1, 0): "blue"}
    trainer = SimpleNamespace(sanity_checking=False, global_step=0, is_global_zero=True,
                              val_dataloaders=SimpleNamespace(dataset=References()))
    metrics.on_validation_epoch_end(trainer, SimpleNamespace(log_dict=lambda values, **_: logged.update(values)))
    assert {k: v for k, v in logged.items() if k.startswith("val/vqa/")} == {
        "val/vqa/accuracy": 0.5, "val/vqa/accuracy/other": 1.0, "val/vqa/accuracy/unknown": 0.0}
