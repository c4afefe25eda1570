"""The batch layout shared by every dataset: training sequences, items, and the `Batch` that `collate` makes.

An item is one image with several token sequences (captions and question-answer pairs); the batch
encodes each image once and decodes all its sequences.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from vlm.data.boxes import PixelBox
from vlm.text.tokenizer import Tokenizer

IGNORE_INDEX = -100
TASKS = ("caption", "vqa")  # the order of an item's sequence groups
Grounded = list[tuple[int, PixelBox]]
"""Of each caption token that belongs to a named region's phrase: the input position that predicts it, and the box
(in an item: in pixels of the model's input image, see `Batch.grounded`)."""
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
    """Per group (G, 2) [sequence row, input position] of its grounded tokens, and their boxes (G, 4): `PixelBox`es
    in pixels of the model's input image (after the resize and any flip), also when ``images`` holds features."""
    index: Tensor | None = None
    """(B,) each image's index in its dataset (to gather and de-duplicate results across processes)."""
    features: bool = False
    """True when ``images`` holds the encoder trunk's cached maps (B, C, h, w) instead of pixels."""


def caption_sequence(tokenizer: Tokenizer, caption: str, regions: Sequence[tuple[str, PixelBox]]
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


def map_boxes(groups: list[list[TrainingSequence]], box_map: Callable[[PixelBox], PixelBox]
              ) -> list[list[TrainingSequence]]:
    """An item's groups with every grounded token's box mapped by ``box_map`` (e.g. into the model's input image)."""
    return [[(ids, prompt_len, [(p, box_map(box)) for p, box in grounded]) for ids, prompt_len, grounded in group]
            for group in groups]


def question_sequence(tokenizer: Tokenizer, question: str, answer: str) -> TrainingSequence:
    """``[BOS] question [SEP] answer [EOS]``, learning the answer."""
    return *tokenizer.training_pair(tokenizer.question_prompt(question), answer), []


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
