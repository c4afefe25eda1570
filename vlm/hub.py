"""Import pretrained captioners from the Hugging Face Hub (or a local copy of a Hub model) into vlm.

Supported: ``BlipForConditionalGeneration`` (a ViT vision tower and a BERT-style text decoder with
cross-attention in every layer) and ``VisionEncoderDecoderModel`` with a ViT encoder and a GPT-2 or BERT decoder.
Anything else is refused in one line naming its architecture. What a model needs is set by `vlm.config` options
(never by its name): the encoder is timm's VisionTransformer with the source's weights and LayerNorm epsilon,
read with ``features: final`` (the final tokens after the final norm, class token included, unprojected, no added
positions); the decoder is vlm's with post-norm blocks, embedding norm, output transform and bias (BERT, BLIP) or
pre-norm blocks and tanh GELU (GPT-2), with cross-attention keys and values from the encoder's width.

Exact re-parametrisations, not approximations: BERT's token-type embedding (type 0 is the only one a decoder
sees) is added into every position embedding; GPT-2's Conv1D weights are transposed into linear layers; a
VisionEncoderDecoder's ``enc_to_dec_proj`` (a linear map of the encoder's tokens) is folded into every layer's
cross-attention keys and values; separate query/key/value weights are concatenated as vlm's layers hold them.

The tokenizer is the model's own ``tokenizer.json`` (read with `tokenizers`), and the config names which of its
tokens play vlm's roles (`ModelConfig.special_tokens`): BLIP starts from its decoder-start token ([DEC], its
text config's bos_token_id) and stops at [SEP]; a VisionEncoderDecoder starts from decoder_start_token_id and stops
at eos_token_id. Image mean, std and interpolation come from ``preprocessor_config.json``; the image size is the
vision config's (its position embeddings are trained for it). Weights are read from safetensors, or from a
``.bin`` only through ``torch.load(weights_only=True)``; no code from the model's repository is ever run.

Imported captioners answer no questions (``answers_questions: false``): vlm's ask refuses them in one line.
Per-token maps are the decoder's cross-attention over the patches with the class-token column removed and each
row renormalised over the patches (`vlm.grounding.methods`).
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer as HFTokenizer
from torch import Tensor

from vlm.checkpoint import save_model
from vlm.config import DecoderConfig, EncoderConfig, ModelConfig
from vlm.errors import VLMError
from vlm.model.vlm import VisionLanguageModel
from vlm.text.tokenizer import Tokenizer

PREFIX = "hf:"
SUPPORTED = ("BlipForConditionalGeneration, and VisionEncoderDecoderModel with a ViT encoder and a GPT-2 or BERT "
             "decoder")
VIT_NAME = "vit_base_patch16_224"  # a timm ViT whose every size is then set by model_args
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}  # PIL's codes
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def import_model(source: str, out: str | os.PathLike) -> Path:
    """Convert ``hf:NAME_OR_DIR`` (a Hub model name, downloaded, or a local directory) into an exported vlm model
    directory at out (`vlm.checkpoint` format); returns out. Out may not be the source directory: its
    config.json, tokenizer.json and model.safetensors would be overwritten."""
    path = resolve(source)
    if Path(out).resolve() == path.resolve():
        raise VLMError(f"--out {out}: is the directory of {source} itself, whose files the import would overwrite: "
                       f"choose another directory")
    model, tokenizer = _load_dir(path)
    return save_model(model, tokenizer, out)


def load_hf(source: str) -> tuple[VisionLanguageModel, Tokenizer]:
    """The vlm model (CPU, train mode as built) and tokenizer converted from ``hf:NAME_OR_DIR``."""
    return _load_dir(resolve(source))


def _load_dir(path: Path) -> tuple[VisionLanguageModel, Tokenizer]:
    """`load_hf` of the Hub model's local directory (`resolve`)."""
    raw = _read_json(path / "config.json")
    cfg, state, tokenizer = convert(path, raw)
    model = VisionLanguageModel(cfg, len(tokenizer))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:  # a mapping bug, never the user's input
        raise VLMError(f"{path}: converted weights do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model, tokenizer


def resolve(source: str) -> Path:
    """A local directory for ``hf:NAME_OR_DIR``: the directory itself, or the Hub model's downloaded snapshot."""
    name = source[len(PREFIX):] if source.startswith(PREFIX) else source
    if not name:
        raise VLMError(f"{source!r}: give a Hub model name or a directory after {PREFIX}")
    if Path(name).is_dir():
        return Path(name)
    if Path(name).exists():
        raise VLMError(f"{name}: not a model directory")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise VLMError(f"{PREFIX}{name}: downloading needs huggingface_hub: pip install 'vlm[hub]'") from None
    try:  # configs, tokenizer and safetensors weights; .bin weights only when there are no safetensors
        local = Path(snapshot_download(name, allow_patterns=["*.json", "*.txt", "*.safetensors"]))
        if not any(local.glob("*.safetensors")):
            local = Path(snapshot_download(name, allow_patterns=["*.json", "*.txt", "pytorch_model*.bin"]))
    except Exception as e:  # no network, no such repository, a gated one, a malformed name
        raise VLMError(f"{PREFIX}{name}: not a local directory, and cannot download it from the Hugging Face Hub "
                       f"({_one_line(e)})") from None
    return local


def convert(path: Path, raw: dict) -> tuple[ModelConfig, dict[str, Tensor], Tokenizer]:
    """vlm's model config, state dict and tokenizer from a Hub model directory with config.json ``raw``."""
    model_type = raw.get("model_type")
    arch = (raw.get("architectures") or [model_type or "unknown"])[0]
    if model_type == "blip" and arch == "BlipForConditionalGeneration":
        return _convert_blip(path, raw)
    if model_type == "vision-encoder-decoder":
        enc, dec = raw.get("encoder", {}).get("model_type"), raw.get("decoder", {}).get("model_type")
        if enc == "vit" and dec in ("gpt2", "bert"):
            return _convert_vision_encoder_decoder(path, raw)
        arch = f"{arch} with a {enc} encoder and a {dec} decoder"
    raise VLMError(f"{path}: unsupported architecture {arch}; vlm imports {SUPPORTED}")


# ------------------------------------------------------------------------------------------------- families


def _convert_blip(path: Path, raw: dict) -> tuple[ModelConfig, dict[str, Tensor], Tokenizer]:
    from transformers import BlipConfig

    config = BlipConfig.from_dict(raw)
    vision, text = config.vision_config, config.text_config
    weights = _Weights(path)
    state = _vit(weights, "vision_model.", vision, blip=True)
    prefix = "text_decoder."
    state |= _bert_decoder(weights, prefix, text, token_type=False)
    weights.done()
    specials = _specials(path, bos=text.bos_token_id, eos=text.sep_token_id, pad=text.pad_token_id)
    tokenizer = _tokenizer(path, specials)
    cfg = ModelConfig(encoder=_vit_config(path, vision), decoder=_bert_config(text, vision.hidden_size),
                      special_tokens=tokenizer.special_tokens, answers_questions=False)
    return cfg, _fit_vocab(state, len(tokenizer), path), tokenizer


def _convert_vision_encoder_decoder(path: Path, raw: dict) -> tuple[ModelConfig, dict[str, Tensor], Tokenizer]:
    from transformers import VisionEncoderDecoderConfig

    config = VisionEncoderDecoderConfig.from_dict(raw)
    vision, text = config.encoder, config.decoder
    if not text.add_cross_attention:
        raise VLMError(f"{path}: the {text.model_type} decoder has no cross-attention (add_cross_attention false)")
    weights = _Weights(path)
    state = _vit(weights, "encoder.", vision, blip=False)
    if text.model_type == "gpt2":
        state |= _gpt2_decoder(weights, "decoder.", text, path)
        decoder = _gpt2_config(text, vision.hidden_size)
    else:
        state |= _bert_decoder(weights, "decoder.", text, token_type=True)
        decoder = _bert_config(text, vision.hidden_size)
    if weights.has("enc_to_dec_proj.weight"):  # kv(P x + p) = (W P) x + (W p + b): folded into each layer
        proj_w, proj_b = weights.take("enc_to_dec_proj.weight"), weights.take("enc_to_dec_proj.bias")
        for i in range(decoder.depth):
            w, b = state[f"decoder.blocks.{i}.cross_attn.kv.weight"], state[f"decoder.blocks.{i}.cross_attn.kv.bias"]
            state[f"decoder.blocks.{i}.cross_attn.kv.weight"] = w @ proj_w
            state[f"decoder.blocks.{i}.cross_attn.kv.bias"] = w @ proj_b + b
    weights.done()
    generation = _read_json(path / "generation_config.json") if (path / "generation_config.json").is_file() else {}

    def token_id(*keys: str) -> int | None:
        for source in (generation, raw, raw.get("decoder", {})):
            for key in keys:
                if source.get(key) is not None:
                    value = source[key]
                    return value[0] if isinstance(value, list) else value
        return None

    bos, eos = token_id("decoder_start_token_id", "bos_token_id"), token_id("eos_token_id")
    if bos is None or eos is None:
        raise VLMError(f"{path}: config.json gives no decoder_start_token_id or eos_token_id")
    pad = token_id("pad_token_id")
    specials = _specials(path, bos=bos, eos=eos, pad=eos if pad is None else pad)
    tokenizer = _tokenizer(path, specials)
    cfg = ModelConfig(encoder=_vit_config(path, vision), decoder=decoder, special_tokens=tokenizer.special_tokens,
                      answers_questions=False)
    return cfg, _fit_vocab(state, len(tokenizer), path), tokenizer


# -------------------------------------------------------------------------------------------- the encoder


def _vit_config(path: Path, vision: Any) -> EncoderConfig:
    if vision.hidden_act != "gelu":
        raise VLMError(f"{path}: vision activation {vision.hidden_act!r} is not supported (gelu is)")
    size = vision.image_size if isinstance(vision.image_size, int) else list(vision.image_size)
    patch = vision.patch_size if isinstance(vision.patch_size, int) else list(vision.patch_size)
    processor = _processor(path)
    return EncoderConfig(
        name=VIT_NAME, pretrained=False, image_size=size, features="final", norm_eps=vision.layer_norm_eps,
        model_args={"img_size": size, "patch_size": patch, "embed_dim": vision.hidden_size,
                    "depth": vision.num_hidden_layers, "num_heads": vision.num_attention_heads,
                    "mlp_ratio": vision.intermediate_size / vision.hidden_size,
                    "qkv_bias": bool(getattr(vision, "qkv_bias", True)), "num_classes": 0},
        **processor,
    )


def _processor(path: Path) -> dict:
    """Image mean, std and interpolation from preprocessor_config.json."""
    file = path / "preprocessor_config.json"
    if not file.is_file():
        raise VLMError(f"{path}: no preprocessor_config.json (the image mean, std and resize of the model)")
    proc = _read_json(file)
    if proc.get("do_normalize", True) is False or proc.get("do_rescale", True) is False or \
            abs(proc.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-9:
        raise VLMError(f"{file}: only images rescaled by 1/255 and normalised are supported")
    try:
        mean, std = [float(v) for v in proc["image_mean"]], [float(v) for v in proc["image_std"]]
    except (KeyError, TypeError, ValueError):
        raise VLMError(f"{file}: needs image_mean and image_std lists") from None
    resample = proc.get("resample", 2)
    return {"mean": mean, "std": std, "interpolation": RESAMPLE.get(resample, "bicubic")}


def _vit(weights: _Weights, prefix: str, vision: Any, blip: bool) -> dict[str, Tensor]:
    """timm VisionTransformer keys (under encoder.trunk.) from BLIP's vision model or HF's ViTModel."""
    out = {}
    t = "encoder.trunk."
    if blip:
        emb = prefix + "embeddings."
        out[t + "cls_token"] = weights.take(emb + "class_embedding")
        out[t + "pos_embed"] = weights.take(emb + "position_embedding")
        for p in ("weight", "bias"):
            out[t + f"patch_embed.proj.{p}"] = weights.take(emb + f"patch_embedding.{p}")
            out[t + f"norm.{p}"] = weights.take(prefix + f"post_layernorm.{p}")
        for i in range(vision.num_hidden_layers):
            src, dst = f"{prefix}encoder.layers.{i}.", f"{t}blocks.{i}."
            for a, b in (("layer_norm1", "norm1"), ("self_attn.qkv", "attn.qkv"), ("self_attn.projection", "attn.proj"),
                         ("layer_norm2", "norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                for p in ("weight", "bias"):
                    out[f"{dst}{b}.{p}"] = weights.take(f"{src}{a}.{p}")
        return out
    emb = prefix + "embeddings."
    out[t + "cls_token"] = weights.take(emb + "cls_token")
    out[t + "pos_embed"] = weights.take(emb + "position_embeddings")
    for p in ("weight", "bias"):
        out[t + f"patch_embed.proj.{p}"] = weights.take(emb + f"patch_embeddings.projection.{p}")
        out[t + f"norm.{p}"] = weights.take(prefix + f"layernorm.{p}")
    weights.ignore(prefix + "pooler.", emb + "mask_token")
    for i in range(vision.num_hidden_layers):
        src, dst = f"{prefix}encoder.layer.{i}.", f"{t}blocks.{i}."
        parts = ("query", "key", "value")
        out[dst + "attn.qkv.weight"] = torch.cat([weights.take(f"{src}attention.attention.{q}.weight") for q in parts])
        if vision.qkv_bias:
            out[dst + "attn.qkv.bias"] = torch.cat([weights.take(f"{src}attention.attention.{q}.bias") for q in parts])
        for a, b in (("layernorm_before", "norm1"), ("attention.output.dense", "attn.proj"),
                     ("layernorm_after", "norm2"), ("intermediate.dense", "mlp.fc1"), ("output.dense", "mlp.fc2")):
            for p in ("weight", "bias"):
                out[f"{dst}{b}.{p}"] = weights.take(f"{src}{a}.{p}")
    return out


# -------------------------------------------------------------------------------------------- the decoders


def _bert_config(text: Any, cross_width: int) -> DecoderConfig:
    if getattr(text, "position_embedding_type", "absolute") not in (None, "absolute"):
        raise VLMError(f"position_embedding_type {text.position_embedding_type!r} is not supported (absolute is)")
    return DecoderConfig(
        width=text.hidden_size, depth=text.num_hidden_layers, num_heads=text.num_attention_heads,
        mlp_ratio=text.intermediate_size / text.hidden_size, dropout=float(text.hidden_dropout_prob),
        max_length=text.max_position_embeddings, norm="post", norm_eps=text.layer_norm_eps,
        activation=_activation(text.hidden_act), embed_norm=True, head_transform=True, head_bias=True,
        cross_width=cross_width,
    )


def _bert_decoder(weights: _Weights, prefix: str, text: Any, token_type: bool) -> dict[str, Tensor]:
    """vlm decoder keys from a BERT-style LM head model with cross-attention (BLIP's text decoder, BertLMHeadModel)."""
    out, d = {}, "decoder."
    emb = prefix + "bert.embeddings."
    words = weights.take(emb + "word_embeddings.weight")
    out[d + "tok_emb.weight"] = words
    positions = weights.take(emb + "position_embeddings.weight")
    if token_type:  # a decoder only ever sees token type 0: its embedding joins every position's
        positions = positions + weights.take(emb + "token_type_embeddings.weight")[0]
    out[d + "pos_emb.weight"] = positions
    for p in ("weight", "bias"):
        out[d + f"emb_norm.{p}"] = weights.take(emb + f"LayerNorm.{p}")
    for i in range(text.num_hidden_layers):
        src, dst = f"{prefix}bert.encoder.layer.{i}.", f"{d}blocks.{i}."
        for a, b in (("attention", "self_attn"), ("crossattention", "cross_attn")):
            for p in ("weight", "bias"):
                out[f"{dst}{b}.q.{p}"] = weights.take(f"{src}{a}.self.query.{p}")
                out[f"{dst}{b}.kv.{p}"] = torch.cat([weights.take(f"{src}{a}.self.key.{p}"),
                                                     weights.take(f"{src}{a}.self.value.{p}")])
                out[f"{dst}{b}.proj.{p}"] = weights.take(f"{src}{a}.output.dense.{p}")
                out[f"{dst}ln_{b.split('_')[0]}.{p}"] = weights.take(f"{src}{a}.output.LayerNorm.{p}")
        for p in ("weight", "bias"):
            out[f"{dst}mlp.0.{p}"] = weights.take(f"{src}intermediate.dense.{p}")
            out[f"{dst}mlp.2.{p}"] = weights.take(f"{src}output.dense.{p}")
            out[f"{dst}ln_mlp.{p}"] = weights.take(f"{src}output.LayerNorm.{p}")
    head = prefix + "cls.predictions."
    for p in ("weight", "bias"):
        out[d + f"head_transform.0.{p}"] = weights.take(head + f"transform.dense.{p}")
        out[d + f"head_transform.2.{p}"] = weights.take(head + f"transform.LayerNorm.{p}")
    bias = weights.take(head + "bias") if weights.has(head + "bias") else weights.take(head + "decoder.bias")
    out[d + "head_bias"] = bias
    weights.tied(head + "decoder.weight", words)
    weights.tied(head + "decoder.bias", bias)
    weights.ignore(prefix + "bert.pooler.")
    return out


def _gpt2_config(text: Any, cross_width: int) -> DecoderConfig:
    if getattr(text, "scale_attn_by_inverse_layer_idx", False) or not getattr(text, "scale_attn_weights", True):
        raise VLMError("GPT-2 attention scaling other than 1/sqrt(head width) is not supported")
    inner = text.n_inner or 4 * text.n_embd
    return DecoderConfig(
        width=text.n_embd, depth=text.n_layer, num_heads=text.n_head, mlp_ratio=inner / text.n_embd,
        dropout=float(text.resid_pdrop), max_length=text.n_positions, norm="pre", norm_eps=text.layer_norm_epsilon,
        activation=_activation(text.activation_function), cross_width=cross_width,
    )


def _gpt2_decoder(weights: _Weights, prefix: str, text: Any, path: Path) -> dict[str, Tensor]:
    """vlm decoder keys from GPT2LMHeadModel with cross-attention; Conv1D weights (in, out) are transposed."""
    out, d, src = {}, "decoder.", prefix + "transformer."
    D = text.n_embd

    def conv(name: str) -> tuple[Tensor, Tensor]:
        return weights.take(name + ".weight").t(), weights.take(name + ".bias")

    words = weights.take(src + "wte.weight")
    out[d + "tok_emb.weight"] = words
    out[d + "pos_emb.weight"] = weights.take(src + "wpe.weight")
    for i in range(text.n_layer):
        s, t = f"{src}h.{i}.", f"{d}blocks.{i}."
        w, b = conv(s + "attn.c_attn")  # (3D, D): queries, keys, values
        out[t + "self_attn.q.weight"], out[t + "self_attn.q.bias"] = w[:D], b[:D]
        out[t + "self_attn.kv.weight"], out[t + "self_attn.kv.bias"] = w[D:], b[D:]
        out[t + "self_attn.proj.weight"], out[t + "self_attn.proj.bias"] = conv(s + "attn.c_proj")
        out[t + "cross_attn.q.weight"], out[t + "cross_attn.q.bias"] = conv(s + "crossattention.q_attn")
        out[t + "cross_attn.kv.weight"], out[t + "cross_attn.kv.bias"] = conv(s + "crossattention.c_attn")
        out[t + "cross_attn.proj.weight"], out[t + "cross_attn.proj.bias"] = conv(s + "crossattention.c_proj")
        out[t + "mlp.0.weight"], out[t + "mlp.0.bias"] = conv(s + "mlp.c_fc")
        out[t + "mlp.2.weight"], out[t + "mlp.2.bias"] = conv(s + "mlp.c_proj")
        for a, b in (("ln_1", "ln_self"), ("ln_cross_attn", "ln_cross"), ("ln_2", "ln_mlp")):
            for p in ("weight", "bias"):
                out[f"{t}{b}.{p}"] = weights.take(f"{s}{a}.{p}")
        weights.ignore(s + "attn.bias", s + "attn.masked_bias", s + "crossattention.bias",
                       s + "crossattention.masked_bias")
    for p in ("weight", "bias"):
        out[d + f"ln_f.{p}"] = weights.take(f"{src}ln_f.{p}")
    weights.tied(prefix + "lm_head.weight", words)
    return {k: v.contiguous() for k, v in out.items()}


def _activation(name: str) -> str:
    if name not in ACTIVATIONS:
        raise VLMError(f"decoder activation {name!r} is not supported ({', '.join(ACTIVATIONS)} are)")
    return ACTIVATIONS[name]


def _fit_vocab(state: dict[str, Tensor], tokens: int, path: Path) -> dict[str, Tensor]:
    """Embedding rows past the tokenizer's last id (padding some models add, to a multiple of at most 128) are
    dropped: no text holds them. More rows than that is another model's tokenizer, whose captions would be wrong."""
    rows = state["decoder.tok_emb.weight"].shape[0]
    if rows < tokens:
        raise VLMError(f"{path}: the tokenizer has {tokens} tokens, the model's embedding only {rows}")
    if rows - tokens >= 128:
        raise VLMError(f"{path}: the tokenizer has {tokens} tokens, the model's embedding {rows} rows: not this "
                       f"model's tokenizer (padding adds fewer than 128 rows)")
    if rows > tokens:
        state["decoder.tok_emb.weight"] = state["decoder.tok_emb.weight"][:tokens].contiguous()
        if "decoder.head_bias" in state:
            state["decoder.head_bias"] = state["decoder.head_bias"][:tokens].contiguous()
    return state


# -------------------------------------------------------------------------------------- tokenizer and weights


def _specials(path: Path, *, bos: int, eos: int, pad: int | None) -> dict[str, int]:
    ids = {"bos": bos, "eos": eos, "pad": eos if pad is None else pad}
    for key in ("unk_token",):  # the tokenizer's own unknown token, when it has one
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (path / name).is_file():
                value = _read_json(path / name).get(key)
                value = value.get("content") if isinstance(value, dict) else value
                if isinstance(value, str):
                    ids["unk"] = value  # a token string, resolved below
                    break
    return ids


def _tokenizer(path: Path, specials: dict[str, int | str]) -> Tokenizer:
    """The model's own tokenizer.json (or, failing that, the fast tokenizer transformers builds from its vocabulary
    files), with each role's token named."""
    file = path / "tokenizer.json"
    if file.is_file():
        try:
            hf = HFTokenizer.from_file(str(file))
        except Exception as e:
            raise VLMError(f"{file}: cannot read the tokenizer ({_one_line(e)})") from None
    else:
        try:
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False).backend_tokenizer
        except Exception as e:
            raise VLMError(f"{path}: no tokenizer.json, and no tokenizer transformers can build ({_one_line(e)})"
                           ) from None
    tokens = {}
    for role, value in specials.items():
        token = hf.id_to_token(value) if isinstance(value, int) else value
        if token is None or hf.token_to_id(token) is None:
            if role == "unk":
                continue
            raise VLMError(f"{path}: the {role} token id {value} is not in the tokenizer")
        tokens[role] = token
    return Tokenizer(hf, tokens)


class _Weights:
    """The source's state dict; every tensor must be taken (or known to be ignorable), so nothing is dropped
    silently."""

    def __init__(self, path: Path):
        self.path = path
        self.state = _read_weights(path)
        self.taken: set[str] = set()
        self.ignored: list[str] = ["position_ids"]

    def has(self, key: str) -> bool:
        return key in self.state

    def take(self, key: str) -> Tensor:
        if key not in self.state:
            raise VLMError(f"{self.path}: the weights lack {key}")
        self.taken.add(key)
        return self.state[key].float()

    def tied(self, key: str, value: Tensor) -> None:
        """A tensor tied to one already taken (an output head to the embedding): absent or equal, else refused."""
        if key in self.state:
            if not torch.equal(self.take(key), value):
                raise VLMError(f"{self.path}: {key} is not tied to its embedding; vlm's output head is tied")

    def ignore(self, *prefixes: str) -> None:
        self.ignored += prefixes

    def done(self) -> None:
        left = [k for k in self.state if k not in self.taken and not any(p in k for p in self.ignored)]
        if left:
            raise VLMError(f"{self.path}: weights vlm does not map: {', '.join(sorted(left)[:3])}"
                           f"{', ...' if len(left) > 3 else ''}")


def _read_weights(path: Path) -> dict[str, Tensor]:
    """The state dict from model.safetensors (or its shards), else pytorch_model.bin read as weights only."""
    for name, index in (("model.safetensors", "model.safetensors.index.json"),
                        ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (path / index).is_file():
            files = sorted(set(_read_json(path / index).get("weight_map", {}).values()))
        elif (path / name).is_file():
            files = [name]
        else:
            continue
        state = {}
        for file in files:
            state |= _load(path / file)
        return state
    raise VLMError(f"{path}: no model.safetensors or pytorch_model.bin")


def _load(file: Path) -> dict[str, Tensor]:
    if file.suffix == ".safetensors":
        try:
            return load_file(file)
        except Exception as e:
            raise VLMError(f"{file}: cannot read safetensors weights ({_one_line(e)})") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise VLMError(f"{file}: refused to unpickle: weights may hold only tensors ({_one_line(e)[:200]})") from None
    except Exception as e:
        raise VLMError(f"{file}: cannot read weights ({_one_line(e)})") from None
    if not isinstance(state, dict):
        raise VLMError(f"{file}: expected a state dict, got {type(state).__name__}")
    return state


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise VLMError(f"{file}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VLMError(f"{file}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise VLMError(f"{file}: expected a JSON object")
    return data


def _one_line(e: Exception) -> str:
    return f"{e.__class__.__name__}: {' '.join(str(e).split())[:300]}"
