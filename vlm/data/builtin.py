"""Training and validation items from the built-in scenes, in the layout of `vlm.data.batch`."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from functools import partial

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from vlm.config import DataConfig
from vlm.data.batch import Item, TrainingSequence, caption_sequence, collate, question_sequence
from vlm.data.boxes import fraction_box
from vlm.data.scenes import make_scene
from vlm.text.tokenizer import Tokenizer

# torchdata's StatefulDataLoader calls a deprecated torch function on every iteration; the warning is not ours.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")

Key = int | tuple[int, int]
"""What a dataset is indexed with: an index (validation: always the same draws), or in training (index, epoch)
from `TrainOrder`, whose draws (texts, flip, crop) are seeded by the run's seed, the epoch and the index."""


def split_key(key: Key) -> tuple[int, int | None]:
    """(index, epoch) of a dataset key; the epoch is None for a plain index."""
    return (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), None)


def rekey(key: Key, index: int) -> Key:
    """``key`` with another index (the same epoch, if any): an item of a part of a dataset, or a replacement."""
    _, epoch = split_key(key)
    return index if epoch is None else (index, epoch)


def draw_rng(seed: int, key: Key) -> np.random.Generator:
    """The generator of one item's random draws: a function of (seed, epoch, index) in training, so a resumed run
    or another worker process draws exactly what the uninterrupted run drew; of the index alone otherwise."""
    index, epoch = split_key(key)
    return np.random.default_rng(index if epoch is None else (seed, epoch, index))


def scene_texts(num_scenes: int, seed: int) -> list[str]:
    """Captions, questions and answers of the first training scenes, to train the tokenizer on."""
    texts = []
    for i in range(num_scenes):
        scene = make_scene(i, "train", seed)
        texts += scene.captions + [t for q in scene.questions for t in (q.question, q.answer)]
    return texts


def _draw(rng: np.random.Generator, n: int, k: int) -> list[int]:
    """k indices below n: without repeats while k <= n, then every index and the rest at random."""
    if k <= n:
        return rng.choice(n, k, replace=False).tolist()
    return [*range(n), *rng.choice(n, k - n).tolist()]


class TrainOrder(DistributedSampler):
    """The training order, split over the DDP processes: a function of (seed, epoch) alone. Yields `Key`s
    (index, epoch), so every draw of an item is seeded too.

    A permutation per epoch, or with ``weights`` (one per sample) draws with replacement by weight. Every
    process gets ceil(n / processes) keys, padded with repeats like torch's DistributedSampler, in batches of
    ``batch_size`` (an incomplete last batch is dropped).

    The epoch and the position within it are the sampler's state, which torchdata's StatefulDataLoader stores in
    the checkpoint, so a resumed run continues the same order: it is restored before the loader starts (Lightning
    sets the epoch only after that, and leaves a DistributedSampler in place under DDP).
    """

    def __init__(self, size: int, seed: int, batch_size: int, weights: Tensor | None = None):
        distributed = dist.is_available() and dist.is_initialized()
        super().__init__(range(size), num_replicas=dist.get_world_size() if distributed else 1,
                         rank=dist.get_rank() if distributed else 0, shuffle=True, seed=seed)
        self.batch_size, self.weights = batch_size, weights
        self.yielded, self._resume_at = 0, 0  # keys of this epoch given out by this process; where to resume

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        n = len(self.dataset)
        order = (torch.randperm(n, generator=g) if self.weights is None
                 else torch.multinomial(self.weights, n, replacement=True, generator=g)).tolist()
        order = (order * math.ceil(self.total_size / n))[: self.total_size]
        self.yielded, self._resume_at = self._resume_at, 0
        for index in order[self.rank : self.total_size : self.num_replicas][self.yielded :]:
            self.yielded += 1
            yield index, self.epoch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if self.num_samples - state["yielded"] < self.batch_size:  # written after the epoch's last batch
            self.epoch, self._resume_at = state["epoch"] + 1, 0
        else:
            self.epoch, self._resume_at = state["epoch"], state["yielded"]


class SceneDataset(Dataset):
    """Scene i of a split -> (image tensor, groups of (token ids, prompt length)), sampling which texts."""

    def __init__(self, split: str, cfg: DataConfig, tokenizer: Tokenizer, transform: Callable[[Image.Image], Tensor],
                 image_size: int, seed: int = 0):
        self.split, self.cfg, self.tokenizer, self.transform = split, cfg, tokenizer, transform
        self.image_size, self.seed = image_size, seed
        self.num_scenes = cfg.train_scenes if split == "train" else cfg.val_scenes

    def __len__(self) -> int:
        return self.num_scenes

    def references(self, index: int) -> dict:
        """Scene ``index``'s texts to score generations against: all captions, and each question's answers."""
        scene = make_scene(index, self.split, self.cfg.seed, self.image_size)
        return {"captions": list(scene.captions),
                "questions": [{"question": q.question, "answers": list(q.answers), "kind": q.question_type}
                              for q in scene.questions]}

    def sequences(self, key: Key) -> list[list[TrainingSequence]]:
        """Item ``key`` without its image (training from cached features)."""
        return self[key][1]

    def __getitem__(self, key: Key) -> Item:
        """The image and its sequences in two groups: captions, then question-answer pairs."""
        index, _ = split_key(key)
        scene = make_scene(index, self.split, self.cfg.seed, self.image_size)
        rng = draw_rng(self.seed, key)  # training draws fresh texts every epoch; validation always the same ones
        tok, size = self.tokenizer, scene.image.size
        regions = [(o.phrase, fraction_box(o.box, size)) for o in scene.objects]
        captions = [caption_sequence(tok, scene.captions[i], regions)
                    for i in _draw(rng, len(scene.captions), self.cfg.captions_per_image)]
        questions = [question_sequence(tok, scene.questions[i].question, scene.questions[i].answer)
                     for i in _draw(rng, len(scene.questions), self.cfg.questions_per_image)]
        return self.transform(scene.image), [captions, questions], index


class SceneDataModule(L.LightningDataModule):
    """The built-in scenes; ``seed`` (the run's, ``trainer.seed``) sets the training order and draws."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, transform: Callable[[Image.Image], Tensor],
                 image_size: int, seed: int = 0):
        super().__init__()
        self.cfg, self.seed = cfg, seed
        self.pad_id = tokenizer.pad_id
        self.train_set = SceneDataset("train", cfg, tokenizer, transform, image_size, seed)
        self.val_set = SceneDataset("val", cfg, tokenizer, transform, image_size)

    def _loader(self, dataset: Dataset, sampler: TrainOrder | None = None) -> DataLoader:
        # Stateful: a checkpoint records the data position, so a resumed run continues the same batches.
        return StatefulDataLoader(
            dataset, batch_size=self.cfg.batch_size, sampler=sampler, num_workers=self.cfg.num_workers,
            collate_fn=partial(collate, pad_id=self.pad_id), drop_last=sampler is not None,
            persistent_workers=self.cfg.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, TrainOrder(len(self.train_set), self.seed, self.cfg.batch_size))

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)
