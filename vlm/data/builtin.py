"""Training and validation items from the built-in scenes, in the layout of `vlm.data.batch`."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from vlm.config import DataConfig
from vlm.data.batch import Item, TrainingSequence, caption_sequence, question_sequence
from vlm.data.boxes import resized_box
from vlm.data.scenes import make_scene
from vlm.text.tokenizer import Tokenizer

Key = int | tuple[int, int]
"""What a dataset is indexed with: an index (validation: always the same draws), or in training (index, epoch)
from `vlm.data.module.TrainOrder`, whose draws (texts, flip, crop) are seeded by the run's seed, the epoch and the
index."""


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


def scene_texts(num_scenes: int, seed: int, family: str = "shapes") -> list[str]:
    """Captions, questions and answers of the first training scenes of a family, to train the tokenizer on."""
    texts = []
    for i in range(num_scenes):
        scene = make_scene(i, "train", seed, family=family)
        texts += scene.captions + [t for q in scene.questions for t in (q.question, q.answer)]
    return texts


def _draw(rng: np.random.Generator, n: int, k: int) -> list[int]:
    """k indices below n: without repeats while k <= n, then every index and the rest at random."""
    if k <= n:
        return rng.choice(n, k, replace=False).tolist()
    return [*range(n), *rng.choice(n, k - n).tolist()]


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
        scene = make_scene(index, self.split, self.cfg.seed, self.image_size, self.cfg.scenes)
        return {"captions": list(scene.captions),
                "questions": [{"question": q.question, "answers": list(q.answers), "kind": q.question_type}
                              for q in scene.questions]}

    def sequences(self, key: Key, input_size: tuple[int, int]) -> list[list[TrainingSequence]]:
        """Item ``key`` without its image (training from cached features of input images of ``input_size``,
        (width, height))."""
        return self._item(key, input_size)[1]

    def __getitem__(self, key: Key) -> Item:
        """The image and its sequences in two groups: captions, then question-answer pairs."""
        return self._item(key)

    def _item(self, key: Key, input_size: tuple[int, int] | None = None) -> Item:
        """The item, its boxes in pixels of the model's input image (of ``input_size``, or the transform's)."""
        index, _ = split_key(key)
        scene = make_scene(index, self.split, self.cfg.seed, self.image_size, self.cfg.scenes)
        rng = draw_rng(self.seed, key)  # training draws fresh texts every epoch; validation always the same ones
        image = self.transform(scene.image) if input_size is None else None
        tok, size = self.tokenizer, input_size or (image.shape[-1], image.shape[-2])
        regions = [(o.phrase, resized_box(o.box, scene.image.size, size)) for o in scene.objects]
        captions = [caption_sequence(tok, scene.captions[i], regions)
                    for i in _draw(rng, len(scene.captions), self.cfg.captions_per_image)]
        questions = [question_sequence(tok, scene.questions[i].question, scene.questions[i].answer)
                     for i in _draw(rng, len(scene.questions), self.cfg.questions_per_image)]
        return image, [captions, questions], index
