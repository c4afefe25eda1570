"""Feature cache for frozen encoders: the trunk's maps computed once into a memory-mapped file.

Training then reads each image's map (B, C, h, w) from the file instead of loading, transforming and encoding
the image; only the projection and the decoder learn. The cache is valid for one encoder and one dataset: a
small JSON file beside it records both, and a cache that does not match is computed again.
"""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from torchdata.stateful_dataloader import StatefulDataLoader  # resumable: it saves its position

from vlm.data.builtin import Item, collate
from vlm.errors import VLMError


def _fingerprint(encoder: nn.Module, dataset: Dataset) -> dict:
    """What the cached maps depend on: the encoder config, its trunk weights (a checksum) and the dataset."""
    with torch.no_grad():
        checksum = float(sum(p.double().sum() for p in encoder.trunk.parameters()))
    return {"encoder": repr(encoder.cfg), "trunk_checksum": checksum, "items": len(dataset),
            "dataset": type(dataset).__name__}


@torch.no_grad()
def build_cache(path: str | Path, dataset: Dataset, encoder: nn.Module, batch_size: int = 64,
                num_workers: int = 0) -> np.memmap:
    """Every item's trunk map of ``dataset`` in a float32 memory-mapped .npy file at ``path`` (reused when valid)."""
    path = Path(path)
    meta_path = path.with_suffix(path.suffix + ".json")
    fingerprint = _fingerprint(encoder, dataset)
    if path.exists() and meta_path.exists() and json.loads(meta_path.read_text()) == fingerprint:
        return np.load(path, mmap_mode="r")
    path.parent.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    was_training = encoder.training
    encoder.eval().to(device)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                        collate_fn=lambda items: torch.stack([image for image, _, _ in items]))
    tmp = path.with_name(path.name + ".tmp")
    cache = None
    start = 0
    for images in loader:
        fmap = encoder.feature_map(images.to(device)).float().cpu().numpy()
        if cache is None:
            cache = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(dataset), *fmap.shape[1:]))
        cache[start:start + len(fmap)] = fmap
        start += len(fmap)
    if cache is None:
        raise VLMError(f"{path}: nothing to cache (the dataset is empty)")
    cache.flush()
    del cache
    os.replace(tmp, path)  # a crash never leaves a half-written cache under the real name
    meta_path.write_text(json.dumps(fingerprint))
    encoder.cpu().train(was_training)
    return np.load(path, mmap_mode="r")


class CachedDataset(Dataset):
    """Items of a dataset with each image replaced by its cached trunk map."""

    def __init__(self, dataset: Dataset, cache_path: Path):
        self.dataset, self.cache_path = dataset, cache_path
        self._cache: np.memmap | None = None  # opened lazily: each worker process maps the file itself

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Item:
        if self._cache is None:
            self._cache = np.load(self.cache_path, mmap_mode="r")
        return torch.from_numpy(np.array(self._cache[index])), self.dataset.sequences(index), index

    def references(self, index: int) -> dict:
        return self.dataset.references(index)


class CachedFeatures(L.LightningDataModule):
    """Wraps a data module of map-style datasets: trains from cached trunk maps of a frozen encoder."""

    def __init__(self, data: L.LightningDataModule, encoder: nn.Module, path: str, encoder_trainable: bool):
        super().__init__()
        if encoder_trainable:
            raise VLMError("data.feature_cache needs a frozen encoder: set model.encoder.trainable: false")
        cfg = data.cfg
        if cfg.hflip > 0 or cfg.crop_scale < 1:
            raise VLMError("data.feature_cache: cached features cannot be augmented; set data.hflip: 0 and "
                           "data.crop_scale: 1")
        if not hasattr(data.train_set, "sequences"):
            raise VLMError("data.feature_cache works with file-based data and the built-in scenes, not shards")
        self.data, self.encoder, self.path = data, encoder, Path(path)
        self.skipped = getattr(data, "skipped", 0)

    def _path(self, split: str) -> Path:
        return self.path.with_name(f"{self.path.stem}.{split}{self.path.suffix or '.npy'}")

    def prepare_data(self) -> None:
        """Compute the caches once (on each node's first process); the others wait at setup."""
        for split, dataset in (("train", self.data.train_set), ("val", self.data.val_set)):
            if dataset is not None:
                build_cache(self._path(split), dataset, self.encoder, self.data.cfg.batch_size,
                            self.data.cfg.num_workers)

    def _loader(self, split: str, dataset: Dataset, train: bool) -> DataLoader:
        cfg = self.data.cfg
        weights = getattr(self.data, "weights", None)  # sources mixed by weight keep their mixture
        sampler = None
        if train and weights is not None:
            sampler = WeightedRandomSampler(weights, len(weights), generator=torch.Generator().manual_seed(cfg.seed))
        return StatefulDataLoader(
            CachedDataset(dataset, self._path(split)), batch_size=cfg.batch_size, sampler=sampler,
            shuffle=train and sampler is None, drop_last=train, num_workers=cfg.num_workers,
            collate_fn=partial(collate, pad_id=self.data.pad_id, features=True), persistent_workers=cfg.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.data.train_set, train=True)

    def val_dataloader(self) -> DataLoader | list:
        val = self.data.val_set
        return [] if val is None else self._loader("val", val, train=False)
