"""The export format of a trained model, and loading a model from it or from a Lightning checkpoint.

An exported model is a directory of three files:

- ``model.safetensors``: the `VisionLanguageModel` state dict (safetensors: loading runs no code);
- ``config.json``: ``{"format_version": 1, "vocab_size": V, "model": <ModelConfig as a dict>}``;
- ``tokenizer.json``: the `tokenizers` tokenizer, with the special tokens of `vlm.text.tokenizer` (or, for a model
  imported by `vlm.hub`, its source's tokenizer, whose tokens of each role the config's ``special_tokens`` names).

Version policy. ``format_version`` names the layout of these files and the meaning of their keys, not the
weights. Adding a `ModelConfig` field with a default that reproduces the old behaviour keeps the version (an old
config.json lacks the key and gets the default). Anything that would load an old directory differently (renamed
or removed files, config keys or state-dict keys; a changed meaning of a value) raises the version, and this
module then keeps reading every earlier version, converting it on load, so that a model exported by any earlier
vlm loads and captions the same (`tests/fixtures/format_v1` is a version 1 model with its expected captions).
A directory of a version newer than this vlm knows is refused with a one-line error rather than guessed at.

A Lightning checkpoint (``.ckpt``, written by `vlm train`) holds the same model under ``state_dict`` (keys
prefixed ``model.``) and its config and tokenizer JSON under ``hyper_parameters``; it is read with
``torch.load(weights_only=True)``, which refuses any pickled object other than tensors and plain data.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vlm.config import ModelConfig, model_config_from_dict
from vlm.errors import VLMError
from vlm.model.vlm import VisionLanguageModel
from vlm.text.tokenizer import Tokenizer

FORMAT_VERSION = 1
WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"
ONNX_COMMANDS = ("caption", "ask", "attend", "eval", "ground", "predict", "demo", "serve")
"""The `vlm` commands with ``--runtime onnx``: the error for an ONNX export where a torch model is needed names
them, so that it is true of every command (tests/test_cli.py checks them against the commands' options)."""


def save_model(model: VisionLanguageModel, tokenizer: Tokenizer, out_dir: str | os.PathLike) -> Path:
    """Export the model's safetensors weights, config.json and tokenizer.json to out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, out / WEIGHTS)
    os.chmod(out / WEIGHTS, file_mode())  # safetensors writes it private (0600), whatever the umask
    config = {"format_version": FORMAT_VERSION, "vocab_size": len(tokenizer), "model": asdict(model.cfg)}
    (out / CONFIG).write_text(json.dumps(config, indent=2))
    tokenizer.save(str(out / TOKENIZER))
    return out


def file_mode() -> int:
    """The mode the umask gives a new file (0o666 masked), for files written private (0600) by their writer."""
    umask = os.umask(0)  # reading the umask means setting it
    os.umask(umask)
    return 0o666 & ~umask


def load_model(path: str | os.PathLike) -> tuple[VisionLanguageModel, Tokenizer]:
    """The model (on the CPU, in train mode as built) and tokenizer of an exported directory or a .ckpt file.

    Every problem (a missing file, a bad config, weights that do not fit it, a pickle that is not plain data)
    is a `VLMError` of one line naming the file.
    """
    path = Path(path)
    if path.is_dir():
        return _load_exported(path)
    if path.is_file():
        return _load_checkpoint(path)
    raise VLMError(f"{path}: no such model directory or checkpoint")


def state_from_checkpoint(path: str | os.PathLike) -> tuple[dict, dict, str]:
    """(model state dict, model config dict, tokenizer JSON) from a Lightning checkpoint, safely."""
    with warnings.catch_warnings():  # torch's remarks on pickle protocols; a refusal still raises
        warnings.simplefilter("ignore")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    hp = ckpt["hyper_parameters"]
    prefix = "model."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    return state, hp["model"], hp["tokenizer"]


def _load_exported(path: Path) -> tuple[VisionLanguageModel, Tokenizer]:
    if not (path / WEIGHTS).is_file() and (path / "onnx.json").is_file():
        commands = ", ".join(ONNX_COMMANDS[:-1]) + f" and {ONNX_COMMANDS[-1]}"
        raise VLMError(f"{path}: an ONNX export (vlm export): vlm {commands} run it with --runtime onnx (Python: "
                       f"load(path, runtime='onnx')); every other use needs the torch model it was exported from")
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
    try:
        model_cfg = model_config_from_dict(config["model"])
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise VLMError(f"{path / CONFIG}: bad 'model' section ({_one_line(e)})") from None
    tokenizer = _tokenizer(lambda: Tokenizer.from_file(str(path / TOKENIZER), model_cfg.special_tokens),
                           path / TOKENIZER)
    if config.get("vocab_size") != len(tokenizer):
        raise VLMError(f"{path}: tokenizer has {len(tokenizer)} tokens, config says {config.get('vocab_size')}")
    try:
        state = load_file(path / WEIGHTS)
    except Exception as e:  # not safetensors, truncated, corrupt header
        raise VLMError(f"{path / WEIGHTS}: cannot read safetensors weights ({_one_line(e)})") from None
    return _build(model_cfg, tokenizer, state, path), tokenizer


def _load_checkpoint(path: Path) -> tuple[VisionLanguageModel, Tokenizer]:
    if path.suffix == ".safetensors":
        raise VLMError(f"{path}: pass the exported model's directory ({path.parent}), not its weights file")
    try:
        state, model_dict, tokenizer_json = state_from_checkpoint(path)
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
    tokenizer = _tokenizer(lambda: Tokenizer.from_str(tokenizer_json, model_cfg.special_tokens), path)
    return _build(model_cfg, tokenizer, state, path), tokenizer


def _build(model_cfg: ModelConfig, tokenizer: Tokenizer, state: dict, source: Path) -> VisionLanguageModel:
    try:
        model = VisionLanguageModel(model_cfg, len(tokenizer), pretrained=False)  # the saved weights replace them
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
