"""The Python API: load a trained model, caption images, answer questions, show where it looked.

    from vlm import load
    model = load("runs/default/model")
    model.caption(["a.png", "b.png"])
    model.ask(["a.png"], ["what color is the circle ?"])
    model.attend("a.png").save("out/")
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlm.allocator import keep_freed_memory
from vlm.checkpoint import load_model, save_model
from vlm.config import DecodingConfig, MapConfig
from vlm.data.images import ImageLike, is_single_image, load_image
from vlm.data.transforms import image_transform
from vlm.errors import VLMError
from vlm.grounding.methods import token_maps
from vlm.grounding.overlay import write_attention
from vlm.model.decoder import KeysValues
from vlm.model.generate import Generation, generate
from vlm.model.vlm import VisionLanguageModel
from vlm.text.clean import clean_text
from vlm.text.tokenizer import Tokenizer


@dataclass
class Attended:
    """A generated caption or answer with each token's map over the image's patch grid."""

    image: Image.Image
    question: str | None
    text: str
    tokens: list[str]
    maps: np.ndarray
    """(T, h, w): each generated token's map over the patch grid, made as the `vlm.config.MapConfig` said."""

    def save(self, out_dir: str | os.PathLike) -> dict:
        """Per-token overlay PNGs, a labelled grid PNG and attention.json, all inside out_dir."""
        return write_attention(out_dir, self.image, self.tokens, self.maps, text=self.text, question=self.question)


class Captioner:
    """A trained model with its tokenizer and image transform, ready for inference."""

    def __init__(self, model: VisionLanguageModel, tokenizer: Tokenizer, device: str | torch.device | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cpu":
            keep_freed_memory()  # inference's activations reuse freed memory (`vlm.allocator`)
        self.model = model.eval().to(self.device)
        self.tokenizer = tokenizer
        self.transform = image_transform(model.encoder.trunk, model.cfg.encoder.image_size)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = None, runtime: str = "torch",
             threads: int | None = None) -> Captioner:
        """Load an exported model directory, a Lightning checkpoint (.ckpt) or ``hf:NAME_OR_DIR`` (a Hugging Face
        captioner, converted in memory), never running its code (`vlm.checkpoint`); with ``runtime="onnx"``, an ONNX
        export (``vlm export --format onnx``) on ONNX Runtime (`OnnxCaptioner`, CPU, ``threads`` intra-op threads,
        default all cores)."""
        if runtime == "onnx":
            from vlm.deploy.runtime import OnnxModel

            return OnnxCaptioner(*OnnxModel.load(path, threads))
        if runtime != "torch":
            raise VLMError(f"runtime: expected torch or onnx, got {runtime!r}")
        return cls(*read_model(path), device)

    @property
    def makes_maps(self) -> bool:
        """Whether it makes per-token maps (`attend`, `text_maps`): an ONNX export made without ``--maps`` does not,
        and what needs them (grounding scores, overlays) is then left out with `NO_MAPS` as the reason."""
        return True

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Export safetensors weights, config.json and tokenizer.json to out_dir (`vlm.checkpoint`)."""
        return save_model(self.model, self.tokenizer, out_dir)

    def _encode(self, images: Sequence[ImageLike]) -> tuple[list[Image.Image], list[KeysValues], tuple[int, int]]:
        """The images loaded, transformed and encoded once: each layer's cross-attention keys/values and the grid."""
        pil = [load_image(im) for im in images]
        pixels = torch.stack([self.transform(im) for im in pil]).to(self.device)
        with torch.no_grad():
            image_kv, grid = self.model.encode(pixels)
        return pil, image_kv, grid

    def _generate(self, image_kv: list[KeysValues], prompts: list[list[int]], decoding: DecodingConfig) -> Generation:
        try:
            return generate(self.model, image_kv, prompts, eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id,
                            config=decoding)
        except ValueError as e:  # a token budget the prompt leaves no room for, seeds for the wrong number of images
            raise VLMError(str(e)) from None

    def caption(self, images: ImageLike | Sequence[ImageLike], decoding: DecodingConfig | None = None,
                batch_size: int = 64, prompt: str | None = None, **options) -> list[str]:
        """One caption per image (a path, bytes, a binary file or a PIL image, or a list of them); with
        ``num_samples`` k, k captions per image, image after image. With a ``prompt`` ("a picture of"), each
        caption continues it, and the caption returned begins with it.

        decoding: how text is generated (`vlm.config.DecodingConfig`; default greedy, at most 30 tokens). Its
        fields may also be given as keywords (``caption(images, beam_size=3)``), over ``decoding``. A sampled
        image i uses seed + i, whatever the batch size.
        """
        images = _as_list(images)
        decoding = _config(DecodingConfig, decoding, options)
        start = self.caption_prompt(prompt)
        captions = []
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            _, image_kv, _ = self._encode(chunk)
            gen = self._generate(image_kv, [start] * len(chunk), _from(decoding, i, len(chunk), len(images)))
            captions += [self.tokenizer.decode([*start[1:], *t]) for t in gen.tokens]
        return captions

    def caption_prompt(self, prompt: str | None = None) -> list[int]:
        """The token ids a caption starts from: the start token, then the text prompt's tokens (if any)."""
        if prompt is not None and not prompt.strip():
            prompt = None
        return self.tokenizer.caption_prompt(clean_text(prompt, "prompt") if prompt is not None else None)

    def ask(self, images: ImageLike | Sequence[ImageLike], questions: str | Sequence[str],
            decoding: DecodingConfig | None = None, batch_size: int = 64, **options) -> list[str]:
        """The answer to each (image, question) pair, decoded as in `caption` (an answer has at most 8 tokens
        unless ``max_new_tokens`` says otherwise).

        Control characters in a question count as spaces; an empty question is a `VLMError`; one longer than
        half the model's ``max_length`` is cut to fit, with a warning.
        """
        self.check_answers()
        images, questions = _as_list(images), [questions] if isinstance(questions, str) else list(questions)
        if len(images) != len(questions):
            raise VLMError(f"{len(images)} images but {len(questions)} questions")
        decoding = _config(DecodingConfig, decoding, options)
        decoding = replace(decoding, max_new_tokens=decoding.token_budget(answer=True))
        all_prompts = self._question_prompts(questions)
        answers = []
        for i in range(0, len(images), batch_size):
            _, image_kv, _ = self._encode(images[i:i + batch_size])
            prompts = all_prompts[i:i + batch_size]
            gen = self._generate(image_kv, prompts, _from(decoding, i, len(prompts), len(images)))
            answers += [self.tokenizer.decode(t) for t in gen.tokens]
        return answers

    def attend(self, image: ImageLike, question: str | None = None, decoding: DecodingConfig | None = None,
               maps: MapConfig | None = None, prompt: str | None = None, **options) -> Attended:
        """Caption the image (continuing ``prompt``, if given, as in `caption`) or answer the question, decoded
        as in `caption`, and return each generated token's map; the image is encoded once, for both.

        maps: how a map is made (`vlm.config.MapConfig`: raw cross-attention, rollout through the decoder or
        chefer relevancy; from the given decoder layers, default the model's ``attention_layers``, else all;
        heads averaged or one ``head``). Keyword options may be fields of either dataclass, e.g.
        ``attend(image, beam_size=3, method="rollout")``.
        """
        if question is not None:
            if prompt is not None:
                raise VLMError("give a question or a caption prompt, not both")
            self.check_answers()
            question = clean_text(question, "question")
        decoding = _config(DecodingConfig, decoding, {k: v for k, v in options.items() if k not in MAP_FIELDS})
        maps = _config(MapConfig, maps, {k: v for k, v in options.items() if k in MAP_FIELDS})
        if decoding.num_samples > 1:
            raise VLMError(f"attend makes one text: num_samples must be 1, got {decoding.num_samples}")
        if question is None:
            start = self.caption_prompt(prompt)
            lead = start[1:]  # the caption's text begins with the prompt's
        else:
            start = self._question_prompts([question])[0]
            lead = []
            decoding = replace(decoding, max_new_tokens=decoding.token_budget(answer=True))
        (pil,), image_kv, grid = self._encode([image])
        ids = self._generate(image_kv, [start], decoding).tokens[0]
        (token_maps,) = self._maps(image_kv, grid, [start], [ids], maps)  # (T, h, w)
        return Attended(pil, question, self.tokenizer.decode([*lead, *ids]), self.tokenizer.tokens(ids), token_maps)

    def text_maps(self, images: Sequence[ImageLike], texts: Sequence[str], maps: MapConfig | None = None,
                  questions: Sequence[str | None] | None = None, per_layer: bool = False, batch_size: int = 64,
                  **options) -> list[np.ndarray]:
        """Feed each text through the decoder after the caption prompt (or, for an answer, after its question);
        the map (T, h, w) of each of its tokens, made as ``maps`` (or its fields as keywords) says, as in `attend`.

        A token's map comes from the position that predicts it, as for generated tokens. With ``per_layer``,
        each layer's part (L, T, h, w) instead (`vlm.grounding.methods.token_maps`; ``layers`` is not used).
        """
        if len(images) != len(texts) or (questions is not None and len(questions) != len(texts)):
            raise VLMError(f"{len(images)} images, {len(texts)} texts and {len(questions or texts)} questions")
        maps = _config(MapConfig, maps, options)
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
        out: list[np.ndarray] = []
        for i in range(0, len(images), batch_size):
            _, image_kv, grid = self._encode(images[i:i + batch_size])
            out += self._maps(image_kv, grid, prompts[i:i + batch_size], targets[i:i + batch_size], maps, per_layer)
        return out

    def _maps(self, image_kv: list[KeysValues], grid: tuple[int, int], prompts: Sequence[list[int]],
              targets: Sequence[list[int]], maps: MapConfig, per_layer: bool = False) -> list[np.ndarray]:
        try:
            made = token_maps(self.model, image_kv, grid, prompts, targets, maps, per_layer=per_layer)
        except ValueError as e:  # a layer or head out of range
            raise VLMError(str(e)) from None
        return [m.cpu().numpy() for m in made]

    def check_answers(self) -> None:
        """A one-line error for a model that takes no questions (an imported captioner)."""
        if not self.model.cfg.answers_questions:
            raise VLMError("this model is a captioner and answers no questions (its config's answers_questions is "
                           "false): caption or attend instead, with a prompt to lead the caption")

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


class OnnxCaptioner(Captioner):
    """A Captioner whose model is an ONNX export on ONNX Runtime (`vlm.deploy.runtime.OnnxModel`): the same API
    and the same decoding loop (`vlm.model.generate.decode` with the ONNX decoder step), on the CPU.

    Maps are raw cross-attention or rollout, from the export's attention outputs (export with ``--maps``); chefer
    needs autograd and is refused in one line.
    """

    def __init__(self, model, tokenizer: Tokenizer):
        self.device = torch.device("cpu")
        keep_freed_memory()
        self.model, self.tokenizer = model, tokenizer
        preprocessing = torch.nn.Module()  # timm reads the mean, std and interpolation from pretrained_cfg
        preprocessing.pretrained_cfg = model.facts["data_config"]
        self.transform = image_transform(preprocessing, model.cfg.encoder.image_size)

    @property
    def makes_maps(self) -> bool:
        return self.model.maps

    def save(self, out_dir: str | os.PathLike) -> Path:
        raise VLMError("an ONNX export is not saved as a torch model: export it from the torch model directory")

    def _encode(self, images: Sequence[ImageLike]) -> tuple[list[Image.Image], Any, tuple[int, int]]:
        pil = [load_image(im) for im in images]
        encoded, grid = self.model.encode(torch.stack([self.transform(im) for im in pil]))
        return pil, encoded, grid

    def _generate(self, image_kv: Any, prompts: list[list[int]], decoding: DecodingConfig) -> Generation:
        from vlm.deploy.runtime import OnnxBackend

        try:
            return OnnxBackend(self.model, self.tokenizer).generate(image_kv, prompts, decoding)
        except ValueError as e:  # as Captioner._generate
            raise VLMError(str(e)) from None

    def _maps(self, image_kv: Any, grid: tuple[int, int], prompts: Sequence[list[int]],
              targets: Sequence[list[int]], maps: MapConfig, per_layer: bool = False) -> list[np.ndarray]:
        try:
            return [m.numpy() for m in self.model.token_maps(image_kv, prompts, targets, maps, per_layer=per_layer)]
        except ValueError as e:  # another method than raw, a layer or head out of range
            raise VLMError(str(e)) from None


def read_model(path: str | os.PathLike) -> tuple[VisionLanguageModel, Tokenizer]:
    """The model (CPU, train mode as built) and tokenizer of what every command's MODEL names: an exported directory
    or a Lightning .ckpt (`vlm.checkpoint.load_model`), or ``hf:NAME_OR_DIR``, a Hugging Face captioner converted in
    memory (`vlm.hub.load_hf`); never running the source's code."""
    if str(path).startswith("hf:"):
        from vlm.hub import load_hf

        return load_hf(str(path))
    return load_model(path)


MAP_FIELDS = {f.name for f in fields(MapConfig)}
NO_MAPS = "skipped: the ONNX export has no maps (export it with vlm export --maps)"
"""Why grounding scores and overlays are left out for a captioner that makes no maps (`Captioner.makes_maps`)."""


def _config(cls: type, given: Any, options: dict[str, Any]) -> Any:
    """``given`` (or the dataclass's defaults) with keyword options, each named by its field, put over it."""
    unknown = sorted(set(options) - {f.name for f in fields(cls)})
    if unknown:
        raise VLMError(f"unknown option {unknown[0]!r}: not a field of {cls.__name__}")
    try:
        return replace(given or cls(), **options)
    except ValueError as e:  # an option out of range
        raise VLMError(str(e)) from None


def _from(decoding: DecodingConfig, first: int, count: int, total: int) -> DecodingConfig:
    """`DecodingConfig.for_images`, a list of seeds of the wrong length as one VLMError line."""
    try:
        return decoding.for_images(first, count, total)
    except ValueError as e:
        raise VLMError(str(e)) from None


def _as_list(images: ImageLike | Sequence[ImageLike]) -> list[ImageLike]:
    return [images] if is_single_image(images) else list(images)


load = Captioner.load
