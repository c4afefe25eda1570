"""Export a model to ONNX: the image encoder and the decoder step with its key/value cache, maps kept.

An ONNX export is a directory:

- ``encoder.onnx``: ``pixels`` (B, 3, H, W) -> ``image_keys``, ``image_values`` (L, B, H, N, hd): every decoder
  layer's cross-attention keys/values, computed once per image (as `VisionLanguageModel.encode`).
- ``decoder.onnx``: one decoder step. Inputs ``input_ids`` and ``positions`` (R, t), ``self_mask`` (R, 1, t, P + t)
  (True where a new token may attend), ``past_keys``/``past_values`` (L, R, H, P, hd) (P = 0 at the first step),
  ``image_keys``/``image_values`` of B images (row r reads image r // (R // B)); outputs ``logits`` (R, V) of the
  last position, ``present_keys``/``present_values`` (L, R, H, P + t, hd), and with ``maps`` the cross-attention
  weights ``cross_attentions`` (R, t, L, H, N) and self-attention weights ``self_attentions`` (R, t, L, H, P + t) of
  the new positions (raw maps and rollout).
- ``config.json`` and ``tokenizer.json``: as in an exported torch model (`vlm.checkpoint`);
- ``onnx.json``: the export's own facts: opset, maps, quantization, patch grid, image preprocessing, and each
  ONNX file's size and SHA-256 (so a damaged or swapped file is refused by name).

Batch, rows (beams or samples per image), new positions and cache length are dynamic axes: one export serves
every batch size and beam width (the cache may be empty: the first step reads the prompt). The exporter is
torch's TorchScript-based one (``dynamo=False``, deprecated in torch 2.x but present): it traces the same Python the
torch path runs (``TextDecoder.forward`` with a cache object that concatenates) and exports the tiny test model's
two graphs in under a second; the dynamo exporter (``dynamo=True``, onnxscript) also exports both graphs, with
``torch.export.Dim`` axes, but took 15 s for the same model, which the tests (four exports) cannot afford.
A ViT resized on the fly (timm's ``dynamic_img_size``) needs an antialiased bicubic resize that opset 17 lacks: export
such a model with a fixed ``img_size`` in ``encoder.model_args``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from vlm.checkpoint import save_model
from vlm.errors import VLMError
from vlm.model.vlm import VisionLanguageModel
from vlm.text.tokenizer import Tokenizer

OPSET = 17
"""ONNX opset of the export: LayerNormalization is native from 17, and every ONNX Runtime since 1.13 runs it."""
ONNX_FORMAT_VERSION = 1
ENCODER, DECODER, ONNX_CONFIG = "encoder.onnx", "decoder.onnx", "onnx.json"


class _ConcatCache:
    """A stand-in for `KVCache` inside the exported step: each layer's past keys/values with the new ones
    appended, kept as the step's present outputs."""

    def __init__(self, past_keys: Tensor, past_values: Tensor):
        self.past_keys, self.past_values = past_keys, past_values
        self.length = past_keys.shape[3]
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        k = torch.cat([self.past_keys[layer], k], dim=2)
        v = torch.cat([self.past_values[layer], v], dim=2)
        self.keys.append(k)
        self.values.append(v)
        return k, v

    def advance(self, steps: int) -> None:
        pass


class EncoderGraph(nn.Module):
    """Pixels -> every decoder layer's cross-attention keys and values, stacked (L, B, H, N, hd)."""

    def __init__(self, model: VisionLanguageModel):
        super().__init__()
        self.model = model

    def forward(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        image_kv, _ = self.model.encode(pixels)
        return torch.stack([k for k, _ in image_kv]), torch.stack([v for _, v in image_kv])


class DecoderStepGraph(nn.Module):
    """One decoder step over new tokens, the self-attention cache as explicit inputs and outputs."""

    def __init__(self, model: VisionLanguageModel, maps: bool):
        super().__init__()
        self.decoder, self.maps = model.decoder, maps

    def forward(self, input_ids: Tensor, positions: Tensor, self_mask: Tensor, past_keys: Tensor,
                past_values: Tensor, image_keys: Tensor, image_values: Tensor) -> tuple[Tensor, ...]:
        cache = _ConcatCache(past_keys, past_values)
        image_kv = list(zip(image_keys.unbind(0), image_values.unbind(0), strict=True))
        out = self.decoder(input_ids, image_kv, positions=positions, self_mask=self_mask, cache=cache,
                           need_weights=self.maps, need_self_weights=self.maps)
        outputs = (out.logits[:, -1], torch.stack(cache.keys), torch.stack(cache.values))
        if self.maps:
            # (R, H, L, t, N) -> (R, t, L, H, N), and the same for the self-attention over all P + t positions
            outputs += tuple(torch.stack(w, dim=2).transpose(1, 3) for w in (out.cross_attentions, out.self_attentions))
        return outputs


def export_onnx(model: VisionLanguageModel, tokenizer: Tokenizer, out_dir: str | os.PathLike, *, maps: bool = False,
                quantize: str | None = None, data_config: dict | None = None) -> Path:
    """Write the ONNX export of model (see the module docstring) to out_dir; onnx.checker checks both graphs.

    quantize: None, or "int8" (ONNX Runtime's dynamic quantization of the linear layers' weights, activations
    quantized per call). data_config: the image preprocessing (timm's mean, std, interpolation), default the
    trunk's.
    """
    import onnx

    if quantize not in (None, "int8"):
        raise VLMError(f"--quantize: expected int8, got {quantize!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    cfg = model.cfg
    size = cfg.encoder.image_size
    height, width = (size, size) if isinstance(size, int) else size
    pixels = torch.randn(2, 3, height, width)
    with torch.no_grad():
        image_kv, grid = model.encode(pixels)
    L = len(image_kv)
    H, hd = image_kv[0][0].shape[1], image_kv[0][0].shape[3]
    image_keys, image_values = torch.stack([k for k, _ in image_kv]), torch.stack([v for _, v in image_kv])
    R, P, t = 4, 3, 2  # 2 rows per image, 3 cached positions, 2 new ones: no axis of size 1 to be specialised on
    ids = torch.randint(0, model.vocab_size, (R, t))
    positions = torch.arange(P, P + t).expand(R, t).contiguous()
    self_mask = torch.ones(R, 1, t, P + t, dtype=torch.bool)
    past = torch.randn(L, R, H, P, hd)
    with warnings.catch_warnings(), _one_line_errors():  # the exporter's deprecation notice and tracer remarks
        warnings.simplefilter("ignore")
        torch.onnx.export(
            EncoderGraph(model).eval(), (pixels,), out / ENCODER, dynamo=False, opset_version=OPSET,
            input_names=["pixels"], output_names=["image_keys", "image_values"],
            dynamic_axes={"pixels": {0: "images"}, "image_keys": {1: "images"}, "image_values": {1: "images"}},
        )
        outputs = ["logits", "present_keys", "present_values"] + (["cross_attentions", "self_attentions"] if maps
                                                                   else [])
        axes = {"input_ids": {0: "rows", 1: "new"}, "positions": {0: "rows", 1: "new"},
                "self_mask": {0: "rows", 2: "new", 3: "total"}, "past_keys": {1: "rows", 3: "past"},
                "past_values": {1: "rows", 3: "past"}, "image_keys": {1: "images"}, "image_values": {1: "images"},
                "logits": {0: "rows"}, "present_keys": {1: "rows", 3: "total"},
                "present_values": {1: "rows", 3: "total"}, "cross_attentions": {0: "rows", 1: "new"},
                "self_attentions": {0: "rows", 1: "new", 4: "total"}}
        torch.onnx.export(
            DecoderStepGraph(model, maps).eval(),
            (ids, positions, self_mask, past, past.clone(), image_keys, image_values), out / DECODER,
            dynamo=False, opset_version=OPSET,
            input_names=["input_ids", "positions", "self_mask", "past_keys", "past_values", "image_keys",
                         "image_values"],
            output_names=outputs, dynamic_axes={k: v for k, v in axes.items() if maps or not k.endswith("_attentions")},
        )
    for name in (ENCODER, DECODER):
        onnx.checker.check_model(str(out / name), full_check=True)
        if quantize == "int8":
            _quantize_int8(out / name)
    save_model(model, tokenizer, out)
    (out / "model.safetensors").unlink()  # the ONNX files are the weights; config.json and tokenizer.json stay
    if data_config is None:
        import timm.data

        data_config = timm.data.resolve_data_config({}, model=model.encoder.trunk)
    facts = {"format": "vlm-onnx", "onnx_format_version": ONNX_FORMAT_VERSION, "opset": OPSET, "maps": maps,
             "quantize": quantize, "grid": list(grid),
             "num_prefix": int(getattr(model.encoder, "num_prefix", 0)), "layers": L, "heads": H, "head_dim": hd,
             "vocab_size": model.vocab_size,
             "data_config": {k: data_config[k] for k in ("mean", "std", "interpolation")},
             "files": {name: file_facts(out / name) for name in (ENCODER, DECODER)}}
    (out / ONNX_CONFIG).write_text(json.dumps(facts, indent=2))
    return out


@contextmanager
def _one_line_errors():
    """An operator the exporter cannot write (e.g. a ViT's on-the-fly position resize) as one VLMError line."""
    try:
        yield
    except torch.onnx.errors.OnnxExporterError as e:
        raise VLMError(f"cannot export to ONNX opset {OPSET}: {' '.join(str(e).split())[:300]}") from None


def _quantize_int8(path: Path) -> None:
    """ONNX Runtime's dynamic int8 quantization of the graph's matrix products (weights int8, activations per call)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = path.with_suffix(".fp32.onnx")
    path.rename(tmp)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to run its shape-inference pre-processing first, logged every time
    try:
        quantize_dynamic(tmp, path, op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
        tmp.unlink()


def file_facts(path: Path) -> dict:
    """A file's size and SHA-256, as onnx.json records them."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}
