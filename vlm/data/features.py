"""Feature cache for frozen encoders: the trunk's maps computed once into a memory-mapped file.

Training then reads each image's map (B, C, h, w) from the file instead of loading, transforming and encoding
the image; only the projection and the decoder learn. The cache is valid for one encoder and one set of images: a
small JSON file beside it records their fingerprint (the trunk's weights, each image file, the transform), and a
cache that does not match is computed again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vlm.data.batch import Item
from vlm.data.builtin import SceneDataset
from vlm.data.datasets import Mixture, RecordDataset
from vlm.data.draws import Key, split_key
from vlm.errors import VLMError

log = logging.getLogger(__name__)


def _trunk_digest(encoder: nn.Module) -> str:
    """A digest of every weight and buffer of the trunk (BatchNorm statistics too), name by name."""
    digest = hashlib.sha256()
    for name, tensor in encoder.trunk.state_dict().items():
        digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _data_fingerprint(dataset: Dataset) -> dict:
    """What decides each cached row: its image and the transform. Of the built-in scenes, their generating
    parameters; of records, each row's image file (path, size in bytes, modification time) in order. The texts are
    not cached (each epoch draws them from the records), so they are not part of it."""
    if isinstance(dataset, SceneDataset):
        return {"scenes": dataset.split, "seed": dataset.cfg.seed, "image_size": dataset.image_size,
                "items": len(dataset), "transform": repr(dataset.transform)}
    if not isinstance(dataset, Mixture | RecordDataset):
        raise VLMError(f"data.feature_cache: cannot tell when a cache of {type(dataset).__name__} is stale")
    parts = dataset.datasets if isinstance(dataset, Mixture) else [dataset]
    digest = hashlib.sha256()
    for record in (record for part in parts for record in part.records):
        try:
            stat = os.stat(record.image)
            digest.update(f"{record.image}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError:  # a missing image is skipped (or stops the run) when the cache is built
            digest.update(f"{record.image}\0missing\n".encode())
    return {"images": digest.hexdigest(), "items": len(dataset),
            "transform": sorted({repr(part.sampler.transform) for part in parts})}


def _fingerprint(encoder: nn.Module, dataset: Dataset) -> dict:
    """What the cached maps depend on: the encoder (config, trunk weights and buffers), the images, the transform."""
    return {"encoder": repr(encoder.cfg), "trunk": _trunk_digest(encoder), "data": _data_fingerprint(dataset)}


@torch.no_grad()
def build_cache(path: str | Path, dataset: Dataset, encoder: nn.Module, batch_size: int = 64,
                num_workers: int = 0) -> np.memmap:
    """Every item's trunk map of ``dataset`` in a float32 memory-mapped .npy file at ``path``, reused while its
    fingerprint (`_fingerprint`) matches and computed again otherwise (which of the two is logged)."""
    path = Path(path)
    meta_path = path.with_suffix(path.suffix + ".json")
    fingerprint = _fingerprint(encoder, dataset)
    if path.exists() and meta_path.exists():
        recorded = json.loads(meta_path.read_text())
        if recorded == fingerprint:
            log.info("feature cache %s: reused", path)
            return np.load(path, mmap_mode="r")
        changed = sorted(k for k in fingerprint if recorded.get(k) != fingerprint[k])
        log.info("feature cache %s: stale (%s changed), computing it again", path, ", ".join(changed))
    else:
        log.info("feature cache %s: computing it", path)
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
    """Items of a dataset with each image replaced by its cached trunk map; their boxes in pixels of the input
    images (of ``input_size``, (width, height)) that the maps were computed from."""

    def __init__(self, dataset: Dataset, cache_path: Path, input_size: tuple[int, int]):
        self.dataset, self.cache_path, self.input_size = dataset, cache_path, input_size
        self._cache: np.memmap | None = None  # opened lazily: each worker process maps the file itself

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Key) -> Item:
        if self._cache is None:
            self._cache = np.load(self.cache_path, mmap_mode="r")
        index, _ = split_key(key)
        return torch.from_numpy(np.array(self._cache[index])), self.dataset.sequences(key, self.input_size), index

    def references(self, index: int) -> dict:
        return self.dataset.references(index)
