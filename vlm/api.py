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
import pickle
import re
import unicodedata
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from vlm.config import ModelConfig, model_config_from_dict
from vlm.data.images import ImageLike, is_single_image, load_image
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
                  max_new_tokens: int, return_attention: bool, **options) -> tuple[list[Image.Image], Generation]:
        pil, pixels = self._images(images)
        try:
            gen = generate(self.model, pixels, prompts, eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id,
                           max_new_tokens=max_new_tokens, beam_size=beam_size, return_attention=return_attention,
                           **options)
        except ValueError as e:  # a bad decoding option or token budget
            raise VLMError(str(e)) from None
        return pil, gen

    def caption(self, images: ImageLike | Sequence[ImageLike], beam_size: int = 1, max_new_tokens: int = 30,
                batch_size: int = 64, **options) -> list[str]:
        """One caption per image (a path, bytes, a binary file or a PIL image, or a list of them).

        options: the decoding options of `vlm.model.generate.generate` (length_penalty, no_repeat_ngram_size,
        min_new_tokens, sample, temperature, top_k, top_p, seed). A sampled image i uses seed + i, whatever
        the batch size.
        """
        images = _as_list(images)
        captions = []
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            prompts = [self.tokenizer.caption_prompt()] * len(chunk)
            _, gen = self._generate(chunk, prompts, beam_size, max_new_tokens, False, **_from(options, i))
            captions += [self.tokenizer.decode(t) for t in gen.tokens]
        return captions

    def ask(self, images: ImageLike | Sequence[ImageLike], questions: str | Sequence[str], beam_size: int = 1,
            max_new_tokens: int = 8, batch_size: int = 64, **options) -> list[str]:
        """The answer to each (image, question) pair, decoded with ``options`` as in `caption`.

        Control characters in a question count as spaces; an empty question is a `VLMError`; one longer than
        half the model's ``max_length`` is cut to fit, with a warning.
        """
        images, questions = _as_list(images), [questions] if isinstance(questions, str) else list(questions)
        if len(images) != len(questions):
            raise VLMError(f"{len(images)} images but {len(questions)} questions")
        all_prompts = self._question_prompts(questions)
        answers = []
        for i in range(0, len(images), batch_size):
            prompts = all_prompts[i:i + batch_size]
            _, gen = self._generate(images[i:i + batch_size], prompts, beam_size, max_new_tokens, False,
                                    **_from(options, i))
            answers += [self.tokenizer.decode(t) for t in gen.tokens]
        return answers

    def attend(self, image: ImageLike, question: str | None = None, beam_size: int = 1,
               max_new_tokens: int = 30, layers: Sequence[int] | None = None, method: str = "raw",
               head: int | None = None, **options) -> Attended:
        """Caption the image (or answer the question), decoded with ``options`` as in `caption`, and return
        each generated token's map.

        ``method`` says how a map is made (`vlm.grounding.methods`: "raw" cross-attention, "rollout" through the
        decoder, or "chefer" gradient-weighted relevancy) from the given decoder layers (default: the model's
        ``attention_layers``, else all layers), heads averaged or the chosen ``head``.
        """
        if question is not None:
            question = clean_text(question, "question")
        prompt = self.tokenizer.caption_prompt() if question is None else self._question_prompts([question])[0]
        (pil,), gen = self._generate([image], [prompt], beam_size, max_new_tokens, False, **options)
        ids = gen.tokens[0]
        (maps,) = self._method_maps([pil], [prompt], [ids], method, layers, head)  # (T, h, w)
        return Attended(pil, question, self.tokenizer.decode(ids), self.tokenizer.tokens(ids), maps)

    def text_maps(self, images: Sequence[ImageLike], texts: Sequence[str], layers: Sequence[int] | None = None,
                  method: str = "raw", head: int | None = None,
                  questions: Sequence[str | None] | None = None, per_layer: bool = False) -> list[np.ndarray]:
        """Feed each text through the decoder after the caption prompt (or, for an answer, after its question);
        the map (T, h, w) of each of its tokens, made as in `attend`.

        A token's map comes from the position that predicts it, as for generated tokens. With ``per_layer``,
        each layer's part (L, T, h, w) instead (`vlm.grounding.methods.layer_maps`; ``layers`` is not used).
        """
        if len(images) != len(texts) or (questions is not None and len(questions) != len(texts)):
            raise VLMError(f"{len(images)} images, {len(texts)} texts and {len(questions or texts)} questions")
        tok = self.tokenizer
        questions = list(questions) if questions is not None else [None] * len(texts)
        asked = [i for i, q in enumerate(questions) if q is not None]
        prompts = [tok.caption_prompt()] * len(texts)
        for i, prompt in zip(asked, self._question_prompts([questions[i] for i in asked]), strict=True):
            prompts[i] = prompt
        targets = [tok.encode(clean_text(t, f"text {i}")) for i, t in enumerate(texts)]
        room = [self.model.cfg.decoder.max_length - len(p) for p in prompts]
        long = sum(len(t) > r for t, r in zip(targets, room, strict=True))
        if long:
            warnings.warn(f"{long} text(s) longer than the model's max_length "
                          f"{self.model.cfg.decoder.max_length} tokens were truncated", stacklevel=2)
        targets = [t[:r] for t, r in zip(targets, room, strict=True)]
        pil = [load_image(im) for im in images]
        return self._method_maps(pil, prompts, targets, method, layers, head, per_layer)

    def _method_maps(self, images: Sequence[Image.Image], prompts: Sequence[list[int]],
                     targets: Sequence[list[int]], method: str, layers: Sequence[int] | None,
                     head: int | None, per_layer: bool = False, batch_size: int = 64) -> list[np.ndarray]:
        """(len(target), h, w) maps of each target's tokens, read after its prompt (`vlm.grounding.methods`);
        (L, len(target), h, w) per-layer parts with ``per_layer``."""
        from vlm.grounding.methods import layer_maps, token_maps

        maps: list[np.ndarray] = []
        for start in range(0, len(images), batch_size):
            chunk = range(start, min(start + batch_size, len(images)))
            seqs = [[*prompts[i], *targets[i]] for i in chunk]
            ids = torch.full((len(seqs), max(len(s) for s in seqs)), self.tokenizer.pad_id, dtype=torch.long)
            for row, seq in enumerate(seqs):
                ids[row, :len(seq)] = torch.tensor(seq)
            queries = [range(len(prompts[i]) - 1, len(prompts[i]) - 1 + len(targets[i])) for i in chunk]
            pixels = torch.stack([self.transform(images[i]) for i in chunk]).to(self.device)
            try:
                if per_layer:
                    out, grid = layer_maps(self.model, pixels, ids.to(self.device), queries, method, head)
                else:
                    out, grid = token_maps(self.model, pixels, ids.to(self.device), queries, method, layers, head)
            except ValueError as e:  # an unknown method, layer or head
                raise VLMError(str(e)) from None
            maps += [m.float().reshape(*m.shape[:-1], *grid).cpu().numpy() for m in out]
        return maps

    def _question_prompts(self, questions: Sequence[str]) -> list[list[int]]:
        """Question prompts, each cut to half the model's max_length (room for the answer); one warning if any is."""
        limit = self.model.cfg.decoder.max_length // 2
        prompts = [self.tokenizer.question_prompt(clean_text(q, f"question {i}" if len(questions) > 1 else "question"))
                   for i, q in enumerate(questions)]
        long = sum(len(p) > limit for p in prompts)
        if long:
            warnings.warn(f"{long} question(s) longer than the model's limit of {limit - 2} tokens were truncated",
                          stacklevel=3)
        return [self.tokenizer.cut_prompt(p, limit) for p in prompts]


def clean_text(text: str, what: str = "text") -> str:
    """User text with control and other non-printing characters as spaces, runs of spaces as one; empty is an error."""
    if not isinstance(text, str):
        raise VLMError(f"{what}: expected text, got {type(text).__name__}")
    cleaned = " ".join("".join(" " if unicodedata.category(c).startswith("C") else c for c in text).split())
    if not cleaned:
        raise VLMError(f"{what} is empty" + (" (only whitespace or control characters)" if text else ""))
    return cleaned


def _from(options: dict, first: int) -> dict:
    """Decoding options for a chunk starting at image ``first``: an int seed moves along, so image i keeps seed + i."""
    seed = options.get("seed")
    return {**options, "seed": seed + first} if isinstance(seed, int) else options


def _as_list(images: ImageLike | Sequence[ImageLike]) -> list[ImageLike]:
    return [images] if is_single_image(images) else list(images)


def _build(model_cfg: ModelConfig, tokenizer: Tokenizer, state: dict, source: Path) -> VisionLanguageModel:
    try:
        model = VisionLanguageModel(model_cfg, len(tokenizer))
    except Exception as e:  # a config value of the wrong type or range, an unknown timm model, ...
        raise VLMError(f"{source}: cannot build a model from its config ({_one_line(e)})") from None
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
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VLMError(f"{path / CONFIG}: invalid JSON ({e})") from None
    if not isinstance(config, dict):
        raise VLMError(f"{path / CONFIG}: expected a JSON object, got {type(config).__name__}")
    if config.get("format_version") != FORMAT_VERSION:
        raise VLMError(f"{path / CONFIG}: format_version {config.get('format_version')!r}, "
                       f"this vlm reads {FORMAT_VERSION}")
    tokenizer = _tokenizer(lambda: Tokenizer.from_file(str(path / TOKENIZER)), path / TOKENIZER)
    if config.get("vocab_size") != len(tokenizer):
        raise VLMError(f"{path}: tokenizer has {len(tokenizer)} tokens, config says {config.get('vocab_size')}")
    try:
        model_cfg = model_config_from_dict(config["model"])
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise VLMError(f"{path / CONFIG}: bad 'model' section ({_one_line(e)})") from None
    try:
        state = load_file(path / WEIGHTS)
    except Exception as e:  # not safetensors, truncated, corrupt header
        raise VLMError(f"{path / WEIGHTS}: cannot read safetensors weights ({_one_line(e)})") from None
    return _build(model_cfg, tokenizer, state, path), tokenizer


def _load_checkpoint(path: Path) -> tuple[VisionLanguageModel, Tokenizer]:
    from vlm.train.module import state_from_checkpoint

    if path.suffix == ".safetensors":
        raise VLMError(f"{path}: pass the exported model's directory ({path.parent}), not its weights file")
    try:
        state, model_dict, tokenizer_json = state_from_checkpoint(str(path))
    except KeyError as e:
        if not (e.args and isinstance(e.args[0], str)):  # torch's legacy reader on a file that is not a checkpoint
            raise VLMError(f"{path}: cannot load checkpoint (not a torch checkpoint)") from None
        raise VLMError(f"{path}: not a vlm checkpoint (no {e} entry)") from None
    except pickle.UnpicklingError as e:  # torch's weights-only unpickler met something else
        if "weights_only" not in str(e):
            raise VLMError(f"{path}: cannot load checkpoint ({_one_line(e)})") from None
        raise VLMError(f"{path}: refused to unpickle: a checkpoint may hold only tensors and plain data "
                       f"({_unpickling_reason(e)})") from None
    except Exception as e:  # truncated, not a torch file, an unreadable file, ...
        raise VLMError(f"{path}: cannot load checkpoint ({_one_line(e)})") from None
    try:
        model_cfg = model_config_from_dict(model_dict)
    except (ValueError, TypeError, AttributeError) as e:
        raise VLMError(f"{path}: bad model config ({_one_line(e)})") from None
    tokenizer = _tokenizer(lambda: Tokenizer.from_str(tokenizer_json), path)
    return _build(model_cfg, tokenizer, state, path), tokenizer


def _tokenizer(make, source: Path) -> Tokenizer:
    try:
        return make()
    except Exception as e:  # not tokenizer JSON, or without our special tokens
        raise VLMError(f"{source}: not a vlm tokenizer ({_one_line(e)})") from None


def _unpickling_reason(e: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler refused, without its advice to unpickle unsafely."""
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", str(e)) if p.strip()]
    reason = paragraphs[-2] if len(paragraphs) >= 3 else paragraphs[-1] if paragraphs else "refused"
    return reason.split("WeightsUnpickler error: ")[-1][:300]


def _one_line(e: Exception) -> str:
    return f"{e.__class__.__name__}: {' '.join(str(e).split())[:300]}"


load = Captioner.load
