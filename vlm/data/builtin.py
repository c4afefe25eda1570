"""Training and validation items from the built-in scenes, in the layout of `vlm.data.batch`."""

from __future__ import annotations

from collections.abc import Callable

from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from vlm.config import DataConfig
from vlm.data.batch import Item, TrainingSequence, caption_sequence, question_sequence
from vlm.data.boxes import resized_box
from vlm.data.draws import Key, draw_indices, draw_rng, split_key
from vlm.data.scenes import make_scene
from vlm.text.tokenizer import Tokenizer


def scene_texts(num_scenes: int, seed: int, family: str = "shapes") -> list[str]:
    """Captions, questions and answers of the first training scenes of a family, to train the tokenizer on."""
    texts = []
    for i in range(num_scenes):
        scene = make_scene(i, "train", seed, family=family)
        texts += scene.captions + [t for q in scene.questions for t in (q.question, q.answer)]
    return texts


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
                    for i in draw_indices(rng, len(scene.captions), self.cfg.captions_per_image)]
        questions = [question_sequence(tok, scene.questions[i].question, scene.questions[i].answer)
                     for i in draw_indices(rng, len(scene.questions), self.cfg.questions_per_image)]
        return image, [captions, questions], index
