"""Every random draw of a training item (which texts, flip, crop) is a function of the run's seed and the item's key.

A dataset is indexed with a `Key`: a plain index in validation (always the same draws), or in training
(index, epoch) from `vlm.data.module.TrainOrder`. `draw_rng` turns (seed, key) into the item's generator, so a
resumed run, or another loader worker or process, draws exactly what the uninterrupted run drew.
"""

from __future__ import annotations

import numpy as np

Key = int | tuple[int, int]
"""What a dataset is indexed with: an index, or in training (index, epoch)."""


def split_key(key: Key) -> tuple[int, int | None]:
    """(index, epoch) of a dataset key; the epoch is None for a plain index."""
    return (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), None)


def rekey(key: Key, index: int) -> Key:
    """``key`` with another index (the same epoch, if any): an item of a part of a dataset, or a replacement."""
    _, epoch = split_key(key)
    return index if epoch is None else (index, epoch)


def draw_rng(seed: int, key: Key) -> np.random.Generator:
    """The generator of one item's random draws: of (seed, epoch, index) in training, of the index alone otherwise."""
    index, epoch = split_key(key)
    return np.random.default_rng(index if epoch is None else (seed, epoch, index))


def draw_indices(rng: np.random.Generator, n: int, k: int) -> list[int]:
    """k indices below n (which of an item's n texts to train on): without repeats while k <= n, then every index
    and the rest at random."""
    if k <= n:
        return rng.choice(n, k, replace=False).tolist()
    return [*range(n), *rng.choice(n, k - n).tolist()]
