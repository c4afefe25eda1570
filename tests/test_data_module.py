"""vlm/data/module.py: one DataModule serves the built-in scenes, a JSONL source and a feature cache, in the same
batch layout, with the same resumable loaders; the feature cache refuses what it cannot serve."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_config
from vlm.config import DataConfig, OptimConfig, SourceConfig
from vlm.data.batch import Batch
from vlm.data.export import write_shapes
from vlm.data.module import DataModule
from vlm.data.records import read_records
from vlm.data.transforms import image_transform
from vlm.errors import VLMError
from vlm.train.module import CaptionModule

SHAPES = 8  # images of each kind: two training batches of 4


@pytest.fixture(scope="module")
def module(tokenizer) -> CaptionModule:
    torch.manual_seed(0)
    return CaptionModule.create(tiny_config(trainable=False), OptimConfig(grounding_weight=1.0), tokenizer).eval()


@pytest.fixture(scope="module")
def kinds(module, tokenizer, tmp_path_factory) -> dict[str, DataModule]:
    """The three kinds of data, each one DataModule: the scenes, a JSONL source of 96 px images (the model reads
    64 px), and that source's feature cache."""
    folder = tmp_path_factory.mktemp("shapes")
    jsonl = write_shapes(folder, SHAPES, image_size=96)["jsonl"]
    cfg = DataConfig(train_scenes=SHAPES, val_scenes=4, batch_size=4, num_workers=0, captions_per_image=2,
                     questions_per_image=2)
    files = replace(cfg, sources=[SourceConfig(str(jsonl))], val_sources=[SourceConfig(str(jsonl))])
    transform = image_transform(module.model.encoder.trunk, 64)
    cached = DataModule(replace(files, feature_cache=str(folder / "features.npy")), tokenizer, transform, 64,
                        encoder=module.model.encoder)
    cached.prepare_data()
    return {"scenes": DataModule(cfg, tokenizer, transform, 64), "jsonl": DataModule(files, tokenizer, transform, 64),
            "cache": cached}


def _batches(data: DataModule) -> tuple[Batch, Batch, Batch]:
    """The first two training batches and the first validation batch."""
    train = iter(data.train_dataloader())
    return next(train), next(train), next(iter(data.val_dataloader()))


@pytest.mark.parametrize("kind", ["scenes", "jsonl", "cache"])
def test_one_module_serves_each_kind_in_the_same_batch_layout_and_resumes_its_loader(kinds, kind):
    data = kinds[kind]
    first, second, val = _batches(data)
    for batch, images in ((first, 4), (second, 4), (val, 4)):
        assert batch.tasks == ["caption", "vqa"] and batch.features == (kind == "cache")
        assert batch.images.shape[0] == images and batch.index.shape == (images,)
        assert [ids.shape[0] for ids in batch.ids] == [labels.shape[0] for labels in batch.labels] == [2 * images] * 2
        (where, boxes), (vqa_where, vqa_boxes) = batch.grounded
        assert where.shape[1] == 2 and boxes.shape[1] == 4 and len(where) == len(boxes) > 0  # captions name objects
        assert len(vqa_where) == len(vqa_boxes) == 0
        # Boxes are (x, y, w, h) in pixels of the model's 64 px input image.
        assert boxes.min() >= 0 and (boxes[:, :2] + boxes[:, 2:]).max() <= 64 and boxes[:, 2:].max() > 1
    assert batch.images.shape[1:] == ((16, 8, 8) if kind == "cache" else (3, 64, 64))
    # The training loader's position is its state: a fresh loader given it resumes at the second batch.
    loader = data.train_dataloader()
    iter_ = iter(loader)
    next(iter_)
    state = loader.state_dict()
    resumed = data.train_dataloader()
    resumed.load_state_dict(state)
    again = next(iter(resumed))
    assert not torch.equal(first.index, second.index) and torch.equal(again.index, second.index)
    assert all(torch.equal(a, b) for a, b in zip(again.ids, second.ids, strict=True))


def test_the_feature_cache_serves_the_source_batches_with_maps_for_images(kinds, module):
    """Same order, texts, labels and boxes as the JSONL source's batches; the trunk maps of their images; the same
    loss, grounding included."""
    for images, cached in zip(_batches(kinds["jsonl"]), _batches(kinds["cache"]), strict=True):
        assert torch.equal(cached.index, images.index) and cached.tasks == images.tasks
        assert all(torch.equal(a, b) for a, b in zip(cached.ids + cached.labels, images.ids + images.labels,
                                                     strict=True))
        for (where, boxes), (cached_where, cached_boxes) in zip(images.grounded, cached.grounded, strict=True):
            assert torch.equal(cached_where, where) and torch.equal(cached_boxes, boxes)
    with torch.no_grad():  # of the last (validation) batch
        maps = module.model.encoder.feature_map(images.images)
        assert (maps[0] - maps[1]).abs().max() > 0.1  # the maps differ from image to image
        torch.testing.assert_close(cached.images, maps, rtol=1e-5, atol=1e-5)
        loss, logs = module._loss(images)
        cached_loss, cached_logs = module._loss(cached)
    assert logs["grounding_loss"] > 0.1
    torch.testing.assert_close(cached_logs["grounding_loss"], logs["grounding_loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cached_loss, loss, rtol=1e-5, atol=1e-6)


def test_jsonl_boxes_are_the_records_boxes_scaled_to_the_input_image(kinds):
    data = kinds["jsonl"]
    record = read_records(data.cfg.sources[0])[0][0]
    _, groups, _ = data.val_set[0]
    boxes = torch.tensor([box for _, _, grounded in groups[0] for _, box in grounded], dtype=torch.float64)
    regions = torch.tensor([region.bbox for region in record.regions], dtype=torch.float64)
    assert len(boxes) > 0 and (boxes[:, None] - regions * 64 / 96).abs().amax(-1).amin(-1).max() < 1e-9
    assert (boxes[:, None] - regions).abs().amax(-1).amin(-1).min() > 1  # not the boxes in the file's pixels


def test_the_feature_cache_refuses_a_trainable_encoder_augmentation_and_shards(module, tokenizer, tmp_path):
    transform = image_transform(module.model.encoder.trunk, 64)
    cfg = DataConfig(train_scenes=4, val_scenes=2, feature_cache=str(tmp_path / "f.npy"))
    trainable = CaptionModule.create(tiny_config(), OptimConfig(), tokenizer).model.encoder
    with pytest.raises(VLMError, match="needs a frozen encoder"):
        DataModule(cfg, tokenizer, transform, 64, encoder=trainable)
    with pytest.raises(VLMError, match="needs a frozen encoder"):
        DataModule(cfg, tokenizer, transform, 64)
    with pytest.raises(VLMError, match="cannot be augmented"):
        DataModule(replace(cfg, hflip=0.5), tokenizer, transform, 64, encoder=module.model.encoder)
    shards = write_shapes(tmp_path / "shapes", 2)["shards"] / "00000.tar"
    with pytest.raises(VLMError, match="not shards"):
        DataModule(replace(cfg, sources=[SourceConfig(str(shards))]), tokenizer, transform, 64,
                   encoder=module.model.encoder)
    assert not Path(cfg.feature_cache).exists()


def test_training_data_smaller_than_a_batch_is_one_batch_of_all_of_it(module, tokenizer, tmp_path, caplog):
    """Dropping the incomplete last batch left data smaller than data.batch_size with no batch at all: a run of 0
    steps that exported an untrained model. Its batches are now all of it, each epoch, with a warning."""
    jsonl = write_shapes(tmp_path, 5)["jsonl"]
    cfg = DataConfig(sources=[SourceConfig(str(jsonl))], batch_size=32, num_workers=0)
    data = DataModule(cfg, tokenizer, image_transform(module.model.encoder.trunk, 64), 64)
    loader = data.train_dataloader()
    epochs = []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        epochs.append([batch.index.tolist() for batch in loader])
    assert [[len(batch) for batch in epoch] for epoch in epochs] == [[5], [5]]  # one batch of 5 in each epoch
    assert {i for epoch in epochs for batch in epoch for i in batch} <= set(range(5)) and epochs[0] != epochs[1]
    assert "data.batch_size 32 is more than the 5 training samples per process: batches of 5" in caplog.text
