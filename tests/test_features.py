"""The feature cache: rebuilt when what its maps depend on changes (images, transform, encoder weights), reused
otherwise, and the cached path keeps the regions, so the grounding loss is the same as from images."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import tiny_config
from vlm.config import DataConfig, OptimConfig, SourceConfig
from vlm.data.batch import collate
from vlm.data.builtin import SceneDataset
from vlm.data.datasets import RecordDataset, Sampler
from vlm.data.export import write_shapes
from vlm.data.features import CachedDataset, build_cache
from vlm.data.records import read_records
from vlm.data.transforms import image_transform
from vlm.train.module import CaptionModule

NUM = 6


@pytest.fixture(scope="module")
def module(tokenizer) -> CaptionModule:
    torch.manual_seed(0)
    return CaptionModule.create(tiny_config(trainable=False), OptimConfig(grounding_weight=1.0), tokenizer).eval()


def records_dataset(folder: Path, module, tokenizer, image_size: int = 64) -> RecordDataset:
    records, _ = read_records(SourceConfig(str(folder / "data.jsonl")))
    transform = image_transform(module.model.encoder.trunk, image_size)
    return RecordDataset(records, Sampler(DataConfig(captions_per_image=5), tokenizer, transform, train=False),
                         strict=True)


def build(path: Path, dataset, module, caplog) -> tuple[np.ndarray, str]:
    """The cache's maps and what build_cache did: "reused", "computing it" or "stale (...)"."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vlm.data.features"):
        maps = np.array(build_cache(path, dataset, module.model.encoder, batch_size=4))
    return maps, caplog.records[-1].getMessage().split(": ", 1)[1]


def test_cache_is_rebuilt_for_other_images_of_the_same_size_and_reused_for_the_same(tmp_path, module, tokenizer,
                                                                                     caplog):
    first, second = write_shapes(tmp_path / "a", NUM, seed=0), write_shapes(tmp_path / "b", NUM, seed=1)
    cache = tmp_path / "f.npy"
    maps, did = build(cache, records_dataset(tmp_path / "a", module, tokenizer), module, caplog)
    assert did == "computing it" and maps.shape[0] == NUM
    built_at = cache.stat().st_mtime_ns
    again, did = build(cache, records_dataset(tmp_path / "a", module, tokenizer), module, caplog)  # read afresh
    assert did == "reused" and cache.stat().st_mtime_ns == built_at and np.array_equal(again, maps)

    # Other images, as many: computed again, and the maps are those of the new images.
    other = records_dataset(tmp_path / "b", module, tokenizer)
    other_maps, did = build(cache, other, module, caplog)
    assert did.startswith("stale (data changed)") and not np.allclose(other_maps, maps)
    with torch.no_grad():
        expected = module.model.encoder.feature_map(torch.stack([other[i][0] for i in range(NUM)]))
    np.testing.assert_allclose(other_maps, expected.numpy(), rtol=1e-5, atol=1e-5)

    # The same paths with other contents (images replaced in place): computed again.
    for name in os.listdir(first["images"]):
        shutil.copyfile(second["images"] / name, first["images"] / name)
    _, did = build(cache, records_dataset(tmp_path / "a", module, tokenizer), module, caplog)
    assert did.startswith("stale (data changed)")
    # Another transform (image size), or other trunk statistics (a BatchNorm buffer): computed again.
    _, did = build(cache, records_dataset(tmp_path / "a", module, tokenizer, image_size=32), module, caplog)
    assert did.startswith("stale (data changed)")
    bn = next(m for m in module.model.encoder.trunk.modules() if isinstance(m, torch.nn.BatchNorm2d))
    try:
        bn.running_mean += 1
        _, did = build(cache, records_dataset(tmp_path / "a", module, tokenizer, image_size=32), module, caplog)
    finally:
        bn.running_mean -= 1
    assert did == "stale (trunk changed), computing it again"


def test_cache_of_scenes_is_rebuilt_for_other_scenes(tmp_path, module, tokenizer, caplog):
    transform = image_transform(module.model.encoder.trunk, 64)
    scenes = {seed: SceneDataset("val", DataConfig(val_scenes=4, seed=seed), tokenizer, transform, 64)
              for seed in (0, 1)}
    assert build(tmp_path / "f.npy", scenes[0], module, caplog)[1] == "computing it"
    assert build(tmp_path / "f.npy", scenes[0], module, caplog)[1] == "reused"
    assert build(tmp_path / "f.npy", scenes[1], module, caplog)[1] == "stale (data changed), computing it again"


def test_cached_features_keep_the_regions_and_the_grounding_loss(tmp_path, module, tokenizer, caplog):
    write_shapes(tmp_path / "a", NUM)
    dataset = records_dataset(tmp_path / "a", module, tokenizer)
    build(tmp_path / "f.npy", dataset, module, caplog)
    cached = CachedDataset(dataset, tmp_path / "f.npy", (64, 64))
    from_images = collate([dataset[i] for i in range(NUM)], tokenizer.pad_id)
    from_cache = collate([cached[i] for i in range(NUM)], tokenizer.pad_id, features=True)
    (where, boxes), (cached_where, cached_boxes) = from_images.grounded[0], from_cache.grounded[0]
    assert len(where) > 0 and torch.equal(cached_where, where) and torch.equal(cached_boxes, boxes)
    with torch.no_grad():
        loss_images, logs_images = module._loss(from_images)
        loss_cache, logs_cache = module._loss(from_cache)
    assert logs_cache["grounding_loss"] > 0.1  # present, and as large as from images
    torch.testing.assert_close(logs_cache["grounding_loss"], logs_images["grounding_loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_cache, loss_images, rtol=1e-5, atol=1e-6)
