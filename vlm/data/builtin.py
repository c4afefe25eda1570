"""Training and validation batches from the built-in scenes.

An item is one image with several token sequences (captions and question-answer pairs); the batch
encodes each image once and decodes all its sequences, as ``image_index`` says.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from vlm.config import DataConfig
from vlm.data.scenes import make_scene
from vlm.text.tokenizer import Tokenizer

IGNORE_INDEX = -100


@dataclass
class Batch:
    """Images and the token sequences that read them, in groups of similar length (less padding)."""

    images: Tensor
    """(B, 3, H, W)"""
    ids: list[Tensor]
    """Per group (S, T) decoder inputs, right-padded."""
    labels: list[Tensor]
    """Per group (S, T) next tokens; IGNORE_INDEX on prompts and padding."""
    image_index: list[Tensor]
    """Per group (S,) which image each sequence reads."""


def scene_texts(num_scenes: int, seed: int) -> list[str]:
    """Captions, questions and answers of the first training scenes, to train the tokenizer on."""
    texts = []
    for i in range(num_scenes):
        scene = make_scene(i, "train", seed)
        texts += scene.captions + [t for q in scene.questions for t in (q.question, q.answer)]
    return texts


class SceneDataset(Dataset):
    """Scene i of a split -> (image tensor, [(token ids, prompt length), ...]), sampling which texts."""

    def __init__(self, split: str, cfg: DataConfig, tokenizer: Tokenizer, transform: Callable[[Image.Image], Tensor],
                 image_size: int):
        self.split, self.cfg, self.tokenizer, self.transform = split, cfg, tokenizer, transform
        self.image_size = image_size
        self.num_scenes = cfg.train_scenes if split == "train" else cfg.val_scenes

    def __len__(self) -> int:
        return self.num_scenes

    def __getitem__(self, index: int) -> tuple[Tensor, list[tuple[list[int], int]]]:
        scene = make_scene(index, self.split, self.cfg.seed, self.image_size)
        # Training draws fresh texts every epoch; validation always the same ones.
        seed = int(torch.randint(2**31, ())) if self.split == "train" else index
        rng = np.random.default_rng(seed)
        tok = self.tokenizer
        seqs = [tok.training_pair(tok.caption_prompt(), str(c))
                for c in rng.choice(scene.captions, self.cfg.captions_per_image)]
        for q in rng.choice(len(scene.questions), self.cfg.questions_per_image):
            qa = scene.questions[q]
            seqs.append(tok.training_pair(tok.question_prompt(qa.question), qa.answer))
        return self.transform(scene.image), seqs


def collate(items: list[tuple[Tensor, list[tuple[list[int], int]]]], pad_id: int, groups: int = 2) -> Batch:
    """Stack images; sort sequences by length and pad each of `groups` slices to its own longest."""
    images = torch.stack([image for image, _ in items])
    seqs = sorted(((s, n, i) for i, (_, ss) in enumerate(items) for s, n in ss), key=lambda x: len(x[0]))
    size = -(-len(seqs) // groups)
    batch = Batch(images, [], [], [])
    for start in range(0, len(seqs), size):
        chunk = seqs[start:start + size]
        T = len(chunk[-1][0]) - 1
        ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), T), IGNORE_INDEX, dtype=torch.long)
        for row, (s, prompt_len, _) in enumerate(chunk):
            s = torch.tensor(s)
            ids[row, : len(s) - 1] = s[:-1]
            labels[row, prompt_len - 1 : len(s) - 1] = s[prompt_len:]  # learn what follows the prompt
        batch.ids.append(ids)
        batch.labels.append(labels)
        batch.image_index.append(torch.tensor([i for _, _, i in chunk]))
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
        return DataLoader(
            dataset, batch_size=self.cfg.batch_size, shuffle=shuffle, num_workers=self.cfg.num_workers,
            collate_fn=partial(collate, pad_id=self.pad_id), drop_last=shuffle,
            persistent_workers=self.cfg.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)
