"""The Python API: load a trained model, caption images, answer questions, show where it looked.

    from vlm import load
    model = load("runs/default/model")
    model.caption(["a.png", "b.png"])
    model.ask(["a.png"], ["what color is the circle ?"])
    model.attend("a.png").save("out/")
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from vlm.config import ModelConfig, model_config_from_dict
from vlm.data.images import ImageLike, load_image
from vlm.data.transforms import image_transform
from vlm.errors import VLMError
from vlm.grounding.overlay import write_attention
from vlm.model.generate import Generation, generate
from vlm.model.vlm import VisionLanguageModel
from vlm.text.tokenizer import Tokenizer

FORMAT_VERSION = 1
WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"


@dataclass
class Attended:
    """A generated caption or answer with each token's map over the image's patch grid."""

    image: Image.Image
    question: str | None
    text: str
    tokens: list[str]
    maps: np.ndarray
    """(T, h, w): cross-attention of each generated token, heads and the configured layers averaged."""

    def save(self, out_dir: str | os.PathLike) -> dict:
        """Per-token overlay PNGs, a labelled grid PNG and attention.json, all inside out_dir."""
        return write_attention(out_dir, self.image, self.tokens, self.maps, text=self.text, question=self.question)


class Captioner:
    """A trained model with its tokenizer and image transform, ready for inference."""

    def __init__(self, model: VisionLanguageModel, tokenizer: Tokenizer, device: str | torch.device | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.eval().to(self.device)
        self.tokenizer = tokenizer
        self.transform = image_transform(model.encoder.trunk, model.cfg.encoder.image_size)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = None) -> Captioner:
        """Load an exported model directory or a Lightning checkpoint (.ckpt), never running its code."""
        path = Path(path)
        if path.is_dir():
            model, tokenizer = _load_exported(path)
        elif path.is_file():
            model, tokenizer = _load_checkpoint(path)
        else:
            raise VLMError(f"{path}: no such model directory or checkpoint")
        return cls(model, tokenizer, device)

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Export safetensors weights, config.json and tokenizer.json to out_dir."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, out / WEIGHTS)
        config = {"format_version": FORMAT_VERSION, "vocab_size": len(self.tokenizer),
                  "model": asdict(self.model.cfg)}
        (out / CONFIG).write_text(json.dumps(config, indent=2))
        self.tokenizer.save(str(out / TOKENIZER))
        return out

    def _images(self, images: Sequence[ImageLike]) -> tuple[list[Image.Image], torch.Tensor]:
        pil = [load_image(im) for im in images]
        return pil, torch.stack([self.transform(im) for im in pil]).to(self.device)

    def _generate(self, images: Sequence[ImageLike], prompts: list[list[int]], beam_size: int,
                  max_new_tokens: int, return_attention: bool) -> tuple[list[Image.Image], Generation]:
        pil, pixels = self._images(images)
        gen = generate(self.model, pixels, prompts, eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id,
                       max_new_tokens=max_new_tokens, beam_size=beam_size, return_attention=return_attention)
        return pil, gen

    def caption(self, images: ImageLike | Sequence[ImageLike], beam_size: int = 1, max_new_tokens: int = 30,
                batch_size: int = 64) -> list[str]:
        """One caption per image (a path or a PIL image, or a list of them)."""
        images = _as_list(images)
        captions = []
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            prompts = [self.tokenizer.caption_prompt()] * len(chunk)
            _, gen = self._generate(chunk, prompts, beam_size, max_new_tokens, return_attention=False)
            captions += [self.tokenizer.decode(t) for t in gen.tokens]
        return captions

    def ask(self, images: ImageLike | Sequence[ImageLike], questions: str | Sequence[str], beam_size: int = 1,
            max_new_tokens: int = 8, batch_size: int = 64) -> list[str]:
        """The answer to each (image, question) pair."""
        images, questions = _as_list(images), [questions] if isinstance(questions, str) else list(questions)
        if len(images) != len(questions):
            raise VLMError(f"{len(images)} images but {len(questions)} questions")
        answers = []
        for i in range(0, len(images), batch_size):
            prompts = [self._question_prompt(q) for q in questions[i:i + batch_size]]
            _, gen = self._generate(images[i:i + batch_size], prompts, beam_size, max_new_tokens, False)
            answers += [self.tokenizer.decode(t) for t in gen.tokens]
        return answers

    def attend(self, image: ImageLike, question: str | None = None, beam_size: int = 1,
               max_new_tokens: int = 30, layers: Sequence[int] | None = None) -> Attended:
        """Caption the image (or answer the question) and return each generated token's map.

        A map averages the heads of the cross-attention of the given decoder layers (default: the model's
        ``attention_layers``, else all layers).
        """
        prompt = self.tokenizer.caption_prompt() if question is None else self._question_prompt(question)
        (pil,), gen = self._generate([image], [prompt], beam_size, max_new_tokens, return_attention=True)
        ids = gen.tokens[0]
        attn = gen.attentions[0]  # (T, L, H, N)
        maps = self._token_maps(attn.permute(1, 0, 2, 3), gen.grid, layers)  # (T, h, w)
        return Attended(pil, question, self.tokenizer.decode(ids), self.tokenizer.tokens(ids), maps)

    def text_maps(self, images: Sequence[ImageLike], texts: Sequence[str],
                  layers: Sequence[int] | None = None) -> list[np.ndarray]:
        """Feed each caption through the decoder; the map (T, h, w) of each of its tokens.

        A token's map is the cross-attention of the position that predicts it, as for generated tokens.
        """
        tok = self.tokenizer
        seqs = [tok.training_pair(tok.caption_prompt(), t)[0] for t in texts]
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), tok.pad_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
        _, pixels = self._images(images)
        with torch.no_grad():
            out = self.model(pixels, ids[:, :-1].to(self.device), need_weights=True)
        attn = torch.stack(out.cross_attentions)  # (L, S, H, T, N)
        maps = []
        for i, s in enumerate(seqs):
            n = len(s) - 2  # tokens after the prompt, without the end token
            maps.append(self._token_maps(attn[:, i, :, :n].transpose(1, 2), out.grid, layers))
        return maps

    def _token_maps(self, attn: torch.Tensor, grid: tuple[int, int], layers: Sequence[int] | None) -> np.ndarray:
        """(L, T, H, N) cross-attention -> (T, h, w): heads and the chosen layers averaged."""
        layers = list(layers or self.model.cfg.attention_layers or range(attn.shape[0]))
        if not all(-attn.shape[0] <= i < attn.shape[0] for i in layers):
            raise VLMError(f"attention layers {layers} out of range: the decoder has {attn.shape[0]} layers")
        maps = attn[layers].float().mean(dim=(0, 2))  # (T, N)
        return maps.reshape(-1, *grid).cpu().numpy()

    def _question_prompt(self, question: str) -> list[int]:
        prompt = self.tokenizer.question_prompt(question.strip())
        limit = self.model.cfg.decoder.max_length // 2
        if len(prompt) > limit:  # keep room for the answer
            prompt = prompt[:limit - 1] + [self.tokenizer.sep_id]
        return prompt


def _as_list(images: ImageLike | Sequence[ImageLike]) -> list[ImageLike]:
    if isinstance(images, (str, os.PathLike, Image.Image)):
        return [images]
    return list(images)


def _build(model_cfg: ModelConfig, tokenizer: Tokenizer, state: dict, source: Path) -> VisionLanguageModel:
    model = VisionLanguageModel(model_cfg, len(tokenizer))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes differ
        detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e))
        raise VLMError(f"{source}: weights do not match the model config ({detail})") from None
    problems = [f"missing {k}" for k in missing] + [f"unexpected {k}" for k in unexpected]
    if problems:
        raise VLMError(f"{source}: weights do not match the model config ({', '.join(problems[:3])}"
                       f"{', ...' if len(problems) > 3 else ''})")
    return model


def _load_exported(path: Path) -> tuple[VisionLanguageModel, Tokenizer]:
    for name in (WEIGHTS, CONFIG, TOKENIZER):
        if not (path / name).is_file():
            raise VLMError(f"{path}: not an exported vlm model (missing {name})")
    try:
        config = json.loads((path / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise VLMError(f"{path / CONFIG}: invalid JSON ({e})") from None
    if config.get("format_version") != FORMAT_VERSION:
        raise VLMError(f"{path / CONFIG}: format_version {config.get('format_version')!r}, "
                       f"this vlm reads {FORMAT_VERSION}")
    tokenizer = Tokenizer.from_file(str(path / TOKENIZER))
    if config.get("vocab_size") != len(tokenizer):
        raise VLMError(f"{path}: tokenizer has {len(tokenizer)} tokens, config says {config.get('vocab_size')}")
    try:
        model_cfg = model_config_from_dict(config["model"])
    except (KeyError, ValueError) as e:
        raise VLMError(f"{path / CONFIG}: {e}") from None
    return _build(model_cfg, tokenizer, load_file(path / WEIGHTS), path), tokenizer


def _load_checkpoint(path: Path) -> tuple[VisionLanguageModel, Tokenizer]:
    from vlm.train.module import state_from_checkpoint

    try:
        state, model_dict, tokenizer_json = state_from_checkpoint(str(path))
    except Exception as e:  # unpickling refused, not a checkpoint, truncated, ...
        raise VLMError(f"{path}: cannot load checkpoint ({e.__class__.__name__}: {str(e).splitlines()[0]})") from None
    try:
        model_cfg = model_config_from_dict(model_dict)
    except ValueError as e:
        raise VLMError(f"{path}: {e}") from None
    tokenizer = Tokenizer.from_str(tokenizer_json)
    return _build(model_cfg, tokenizer, state, path), tokenizer


load = Captioner.load
