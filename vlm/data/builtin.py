"""Training and validation batches from the built-in scenes.

An item is one image with several token sequences (captions and question-answer pairs); the batch
encodes each image once and decodes all its sequences.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from vlm.config import DataConfig
from vlm.data.scenes import make_scene
from vlm.text.tokenizer import Tokenizer

# torchdata's StatefulDataLoader calls a deprecated torch function on every iteration; the warning is not ours.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")

IGNORE_INDEX = -100
TASKS = ("caption", "vqa")  # the order of an item's sequence groups
UnitBox = tuple[float, float, float, float]
"""(x0, y0, x1, y1) as fractions of the image's width and height."""
Grounded = list[tuple[int, UnitBox]]
"""Of each caption token that belongs to a named region's phrase: the input position that predicts it, and the box."""
TrainingSequence = tuple[list[int], int, Grounded]
"""Token ids, prompt length (not learned), grounded positions."""
Item = tuple[Tensor, list[list[TrainingSequence]], int]
"""A dataset item: image tensor, groups of sequences per task, the item's index."""


@dataclass
class Batch:
    """Images and the token sequences that read them: a group of captions and a group of questions.

    Within a group every image has the same number k of sequences, image-major (sequence s reads image
    s // k), so each image is encoded once and its patches are attended by all its sequences at once.
    """

    images: Tensor
    """(B, 3, H, W)"""
    ids: list[Tensor]
    """Per group (k * B, T) decoder inputs, right-padded."""
    labels: list[Tensor]
    """Per group (k * B, T) next tokens; IGNORE_INDEX on prompts and padding."""
    tasks: list[str]
    """Per group its task: "caption" or "vqa"."""
    grounded: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    """Per group (G, 2) [sequence row, input position] of its grounded tokens, and their boxes (G, 4) (`UnitBox`)."""
    index: Tensor | None = None
    """(B,) each image's index in its dataset (to gather and de-duplicate results across processes)."""
    features: bool = False
    """True when ``images`` holds the encoder trunk's cached maps (B, C, h, w) instead of pixels."""


def scene_texts(num_scenes: int, seed: int) -> list[str]:
    """Captions, questions and answers of the first training scenes, to train the tokenizer on."""
    texts = []
    for i in range(num_scenes):
        scene = make_scene(i, "train", seed)
        texts += scene.captions + [t for q in scene.questions for t in (q.question, q.answer)]
    return texts


def fraction_box(bbox: tuple[float, float, float, float], size: tuple[int, int]) -> UnitBox:
    """A pixel box (x, y, w, h) in an image of size (width, height) as a `UnitBox`, clipped to the image."""
    (x, y, w, h), (W, H) = bbox, size
    return (min(max(x / W, 0.0), 1.0), min(max(y / H, 0.0), 1.0),
            min(max((x + w) / W, 0.0), 1.0), min(max((y + h) / H, 0.0), 1.0))


def caption_sequence(tokenizer: Tokenizer, caption: str, regions: Sequence[tuple[str, UnitBox]]
                     ) -> TrainingSequence:
    """``[BOS] caption [EOS]`` with the positions that predict each region's phrase where the caption names it.

    A phrase that two regions share, or that the caption names twice, is left out: which box it means is unknown.
    """
    ids, prompt_len = tokenizer.training_pair(tokenizer.caption_prompt(), caption)
    names = [" ".join(phrase.lower().split()) for phrase, _ in regions]
    count = Counter(names)
    grounded: Grounded = []
    for (phrase, box), name in zip(regions, names, strict=True):
        if count[name] > 1:
            continue
        spans = tokenizer.phrase_tokens(caption, phrase)
        if len(spans) == 1:  # token i of the caption sits at prompt_len + i; the position before predicts it
            grounded += [(prompt_len - 1 + i, box) for i in spans[0]]
    return ids, prompt_len, grounded


def question_sequence(tokenizer: Tokenizer, question: str, answer: str) -> TrainingSequence:
    """``[BOS] question [SEP] answer [EOS]``, learning the answer."""
    return *tokenizer.training_pair(tokenizer.question_prompt(question), answer), []


def _draw(rng: np.random.Generator, n: int, k: int) -> list[int]:
    """k indices below n: without repeats while k <= n, then every index and the rest at random."""
    if k <= n:
        return rng.choice(n, k, replace=False).tolist()
    return [*range(n), *rng.choice(n, k - n).tolist()]


class SceneDataset(Dataset):
    """Scene i of a split -> (image tensor, groups of (token ids, prompt length)), sampling which texts."""

    def __init__(self, split: str, cfg: DataConfig, tokenizer: Tokenizer, transform: Callable[[Image.Image], Tensor],
                 image_size: int):
        self.split, self.cfg, self.tokenizer, self.transform = split, cfg, tokenizer, transform
        self.image_size = image_size
        self.num_scenes = cfg.train_scenes if split == "train" else cfg.val_scenes

    def __len__(self) -> int:
        return self.num_scenes

    def references(self, index: int) -> dict:
        """Scene ``index``'s texts to score generations against: all captions, and each question's answers."""
        scene = make_scene(index, self.split, self.cfg.seed, self.image_size)
        return {"captions": list(scene.captions),
                "questions": [{"question": q.question, "answers": [q.answer], "kind": q.kind} for q in scene.questions]}

    def sequences(self, index: int) -> list[list[TrainingSequence]]:
        """Item ``index`` without its image (training from cached features)."""
        return self[index][1]

    def __getitem__(self, index: int) -> Item:
        """The image and its sequences in two groups: captions, then question-answer pairs."""
        scene = make_scene(index, self.split, self.cfg.seed, self.image_size)
        # Training draws fresh texts every epoch; validation always the same ones.
        seed = int(torch.randint(2**31, ())) if self.split == "train" else index
        rng = np.random.default_rng(seed)
        tok, size = self.tokenizer, scene.image.size
        regions = [(o.phrase, fraction_box(o.box, size)) for o in scene.objects]
        captions = [caption_sequence(tok, scene.captions[i], regions)
                    for i in _draw(rng, len(scene.captions), self.cfg.captions_per_image)]
        questions = [question_sequence(tok, scene.questions[i].question, scene.questions[i].answer)
                     for i in _draw(rng, len(scene.questions), self.cfg.questions_per_image)]
        return self.transform(scene.image), [captions, questions], index


def collate(items: list[Item], pad_id: int, features: bool = False) -> Batch:
    """Stack images (or cached features); pad each group of sequences (captions, questions) to its own longest."""
    images = torch.stack([image for image, _, _ in items])
    batch = Batch(images, [], [], [], index=torch.tensor([index for _, _, index in items]), features=features)
    for task, group in zip(TASKS, zip(*(groups for _, groups, _ in items), strict=True), strict=True):
        k = max(len(per_image) for per_image in group)
        if k == 0:
            continue
        # Every image needs k sequences; an image with fewer (e.g. no questions) gets empty rows that learn nothing.
        seqs = [seq for per_image in group for seq in [*per_image, *[([pad_id], 1, [])] * (k - len(per_image))]]
        T = max(len(s) for s, _, _ in seqs) - 1
        ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
        for row, (s, prompt_len, _) in enumerate(seqs):
            s = torch.tensor(s)
            ids[row, : len(s) - 1] = s[:-1]
            labels[row, prompt_len - 1 : len(s) - 1] = s[prompt_len:]  # learn what follows the prompt
        grounded = [(row, position, box) for row, (_, _, g) in enumerate(seqs) for position, box in g]
        batch.ids.append(ids)
        batch.labels.append(labels)
        batch.tasks.append(task)
        batch.grounded.append((torch.tensor([g[:2] for g in grounded], dtype=torch.long).reshape(-1, 2),
                               torch.tensor([g[2] for g in grounded], dtype=torch.float32).reshape(-1, 4)))
    return batch


class SceneDataModule(L.LightningDataModule):
    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, transform: Callable[[Image.Image], Tensor],
                 image_size: int):
        super().__init__()
        self.cfg = cfg
        self.pad_id = tokenizer.pad_id
        self.train_set = SceneDataset("train", cfg, tokenizer, transform, image_size)
        self.val_set = SceneDataset("val", cfg, tokenizer, transform, image_size)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        # Stateful: a checkpoint records the data position, so a resumed run continues the same batches.
        return StatefulDataLoader(
            dataset, batch_size=self.cfg.batch_size, shuffle=shuffle, num_workers=self.cfg.num_workers,
            collate_fn=partial(collate, pad_id=self.pad_id), drop_last=shuffle,
            persistent_workers=self.cfg.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)
