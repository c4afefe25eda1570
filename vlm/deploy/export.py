"""Export a model to ONNX: the image encoder and the decoder step with its key/value cache, maps kept.

An ONNX export is a directory:

- ``encoder.onnx``: ``pixels`` (B, 3, H, W) -> ``image_keys``, ``image_values`` (L, B, H, N, hd): every decoder
  layer's cross-attention keys/values, computed once per image (as `VisionLanguageModel.encode`).
- ``decoder.onnx``: one decoder step over a key/value cache of fixed capacity C (prompt + new tokens, as the torch
  path sizes its cache). Inputs ``input_ids`` and ``positions`` (R, t), ``self_mask`` (R, 1, t, C + t) (True where a
  new token may attend: the cache's C slots, then the t new positions), each layer's ``past_key_l``/``past_value_l``
  (R, H, C, hd) (the slots not yet filled are masked out) and ``image_key_l``/``image_value_l`` (B, H, N, hd) of B
  images (row r reads image r // (R // B)); outputs ``logits`` (R, V) of the last position, ``new_keys``/``new_values``
  (L, R, H, t, hd) of the new positions only (the runtime writes them into its cache in place), and with ``maps`` the
  cross-attention weights ``cross_attentions`` (R, t, L, H, N) and self-attention weights ``self_attentions``
  (R, t, L, H, C + t) of the new positions (raw maps and rollout). Nothing the size of the cache or of the image
  keys is copied in a step: attention reads the past and the image keys where they are (scores of the past and of
  the new positions side by side, one softmax), so a step costs what its new tokens cost.
- ``config.json`` and ``tokenizer.json``: as in an exported torch model (`vlm.checkpoint`);
- ``onnx.json``: the export's own facts: opset, maps, quantization, patch grid, image preprocessing, and each
  ONNX file's size and SHA-256 (so a damaged or swapped file is refused by name).

Batch, rows (beams or samples per image), new positions and cache capacity are dynamic axes: one export serves
every batch size and beam width (the capacity may be 0: a teacher-forced run reads a whole sequence). The exporter is
torch's TorchScript-based one (``dynamo=False``, deprecated in torch 2.x but present): it traces the same Python the
torch path runs (``TextDecoder.forward``, with a cache object that keeps the new keys/values and an attention written
for the graph, `_StepAttention`) and exports the tiny test model's
two graphs in under a second; the dynamo exporter (``dynamo=True``, onnxscript) also exports both graphs, with
``torch.export.Dim`` axes, but took 15 s for the same model, which the tests (four exports) cannot afford.
A ViT resized on the fly (timm's ``dynamic_img_size``) needs an antialiased bicubic resize that opset 17 lacks: export
such a model with a fixed ``img_size`` in ``encoder.model_args``.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import os
import warnings
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import torch
from torch import Tensor, nn

from vlm.checkpoint import save_model
from vlm.errors import VLMError
from vlm.model.attention import Attention
from vlm.model.vlm import VisionLanguageModel
from vlm.text.tokenizer import Tokenizer

OPSET = 17
"""ONNX opset of the export: LayerNormalization is native from 17, and every ONNX Runtime since 1.13 runs it."""
ONNX_FORMAT_VERSION = 2
"""2: fixed-capacity cache in per-layer inputs, new keys/values out (1: the whole cache in and out, concatenated)."""
ENCODER, DECODER, ONNX_CONFIG = "encoder.onnx", "decoder.onnx", "onnx.json"


class _NewKeysValues:
    """A stand-in for `KVCache` inside the exported step: keeps each layer's new keys/values (the step's outputs)
    and hands them on alone; the layer's `_StepAttention` reads the past from its own input."""

    def __init__(self):
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.keys.append(k)
        self.values.append(v)
        return k, v

    def advance(self, steps: int) -> None:
        pass


class _Reshape(torch.autograd.Function):
    """``x.reshape(shape)`` where 0 keeps x's size on that axis and -1 (one, which torch's exporter needs) is
    inferred, as ONNX's Reshape reads them: the graph gets one Reshape with a constant shape instead of the
    Shape/Gather/Unsqueeze/Concat chain that a traced ``view(B, T, ...)`` makes (80 of the step's 360 nodes)."""

    @staticmethod
    def forward(ctx, x: Tensor, shape: tuple[int, ...]) -> Tensor:
        return x.reshape([x.shape[i] if n == 0 else n for i, n in enumerate(shape)])

    @staticmethod
    def symbolic(g, x, shape: tuple[int, ...]):
        return g.op("Reshape", x, g.op("Constant", value_t=torch.tensor(shape, dtype=torch.int64)))


class _StepAttention(Attention):
    """`Attention.forward` as the exported step computes it: the explicit softmax path, laid out for ONNX Runtime.

    Queries are scaled before the product and keys enter it transposed, so the runtime fuses the transpose into the
    product and reads the image keys (or the past) in place rather than copying them at every step. With ``past``
    (self-attention over the fixed-capacity cache: keys/values (R, H, C, hd)), the scores over the past and over
    the new keys stand side by side under one mask and one softmax, and the values are weighted in two parts: the
    cache is never concatenated with the new positions.
    """

    past: tuple[Tensor, Tensor, int] | None = None  # keys, values, capacity (read once for every layer)

    def keys_values(self, source: Tensor) -> tuple[Tensor, Tensor]:
        # (B, S, 2H, hd): the keys' heads, then the values'; one transpose and one split (not one each)
        kv = _Reshape.apply(self.kv(source), (0, -1, 2 * self.num_heads, self.head_dim)).transpose(1, 2)
        k, v = kv.split([self.num_heads, self.num_heads], dim=1)  # 2 x (B, H, S, hd); sizes constant in the graph
        return k, v

    def queries(self, x: Tensor) -> Tensor:
        return _Reshape.apply(self.q(x), (0, -1, self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, is_causal: bool = False,
                need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        T = x.shape[1]
        q = self.queries(x) * self.head_dim ** -0.5  # (B, H, T, hd)
        scores = q @ k.transpose(-2, -1)  # (B, H, T, S)
        if self.past is not None:
            past_k, past_v, C = self.past
            scores = torch.cat([q @ past_k.transpose(-2, -1), scores], dim=-1)  # (B, H, T, C + S)
        if is_causal:
            mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril()
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = scores.softmax(dim=-1)
        if self.past is not None:
            y = weights[..., :C] @ past_v + weights[..., C:] @ v
        else:
            y = weights @ v  # (B, H, T, hd)
        y = _Reshape.apply(y.transpose(1, 2), (0, -1, self.num_heads * self.head_dim))  # (B, T, D)
        return self.proj(y), weights if need_weights else None


class EncoderGraph(nn.Module):
    """Pixels -> every decoder layer's cross-attention keys and values, stacked (L, B, H, N, hd)."""

    def __init__(self, model: VisionLanguageModel):
        super().__init__()
        self.model = model

    def forward(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        image_kv, _ = self.model.encode(pixels)
        return torch.stack([k for k, _ in image_kv]), torch.stack([v for _, v in image_kv])


class DecoderStepGraph(nn.Module):
    """One decoder step over new tokens, the fixed-capacity self-attention cache and the image keys/values per layer
    as inputs, the new positions' keys/values as outputs (the module docstring's ``decoder.onnx``).

    It runs a copy of the model's decoder whose attention modules are `_StepAttention`s: the same weights and the
    same ``TextDecoder.forward``, the attention arithmetic reordered for the graph."""

    def __init__(self, model: VisionLanguageModel, maps: bool):
        super().__init__()
        self.decoder, self.maps = copy.deepcopy(model.decoder), maps
        for block in self.decoder.blocks:
            block.self_attn.__class__ = block.cross_attn.__class__ = _StepAttention

    def forward(self, input_ids: Tensor, positions: Tensor, self_mask: Tensor, *layers: Tensor) -> tuple[Tensor, ...]:
        L = len(self.decoder.blocks)  # layers: L past keys, L past values, L image keys, L image values
        past_k, past_v, image_k, image_v = (layers[i * L:(i + 1) * L] for i in range(4))
        capacity = past_k[0].shape[2]
        for block, k, v in zip(self.decoder.blocks, past_k, past_v, strict=True):
            block.self_attn.past = (k, v, capacity)
        cache = _NewKeysValues()
        out = self.decoder(input_ids, list(zip(image_k, image_v, strict=True)), positions=positions,
                           self_mask=self_mask, cache=cache, need_weights=self.maps, need_self_weights=self.maps)
        outputs = (out.logits[:, -1], torch.stack(cache.keys), torch.stack(cache.values))
        if self.maps:
            # (R, H, L, t, N) -> (R, t, L, H, N), and the same for the self-attention over all C + t positions
            outputs += tuple(torch.stack(w, dim=2).transpose(1, 3) for w in (out.cross_attentions, out.self_attentions))
        return outputs


def step_input_names(layers: int) -> list[str]:
    """The decoder step graph's inputs, in order."""
    return ["input_ids", "positions", "self_mask"] + [f"{kind}_{i}" for kind in ("past_key", "past_value", "image_key",
                                                                             "image_value") for i in range(layers)]


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
    R, C, t = 4, 3, 2  # 2 rows per image, a cache of 3 slots, 2 new positions: no axis of size 1 to be specialised on
    ids = torch.randint(0, model.vocab_size, (R, t))
    positions = torch.arange(C, C + t).expand(R, t).contiguous()
    self_mask = torch.ones(R, 1, t, C + t, dtype=torch.bool)
    past = [torch.randn(R, H, C, hd) for _ in range(2 * L)]
    with warnings.catch_warnings(), _one_line_errors():  # the exporter's deprecation notice and tracer remarks
        warnings.simplefilter("ignore")
        torch.onnx.export(
            EncoderGraph(model).eval(), (pixels,), out / ENCODER, dynamo=False, opset_version=OPSET,
            input_names=["pixels"], output_names=["image_keys", "image_values"],
            dynamic_axes={"pixels": {0: "images"}, "image_keys": {1: "images"}, "image_values": {1: "images"}},
        )
        outputs = ["logits", "new_keys", "new_values"] + (["cross_attentions", "self_attentions"] if maps else [])
        names = step_input_names(L)
        axes = {"input_ids": {0: "rows", 1: "new"}, "positions": {0: "rows", 1: "new"},
                "self_mask": {0: "rows", 2: "new", 3: "capacity_and_new"},
                **{name: {0: "rows", 2: "capacity"} for name in names if name.startswith("past_")},
                **{name: {0: "images"} for name in names if name.startswith("image_")},
                "logits": {0: "rows"}, "new_keys": {1: "rows", 3: "new"}, "new_values": {1: "rows", 3: "new"},
                "cross_attentions": {0: "rows", 1: "new"},
                "self_attentions": {0: "rows", 1: "new", 4: "capacity_and_new"}}
        torch.onnx.export(
            DecoderStepGraph(model, maps).eval(),
            (ids, positions, self_mask, *past, *image_keys.unbind(0), *image_values.unbind(0)), out / DECODER,
            dynamo=False, opset_version=OPSET, input_names=names, output_names=outputs,
            dynamic_axes={k: v for k, v in axes.items() if maps or not k.endswith("_attentions")},
        )
    for name in (ENCODER, DECODER):
        onnx.checker.check_model(str(out / name), full_check=True)
        if quantize == "int8":
            _quantize_int8(out / name)
        fuse(out / name)
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


def fuse(path: str | os.PathLike) -> None:
    """ONNX Runtime's transformer optimizer on an ONNX graph, in place (after onnx.checker and quantization, since
    it writes ONNX Runtime's own operators): each residual sum and the LayerNorm after it become one
    SkipLayerNormalization, bias and GELU one BiasGelu. It finds no attention to fuse in ours (not BERT's
    pattern). scripts/bench.py runs it on the HF baseline's graphs too, as optimum's ORTOptimizer would."""
    from onnxruntime.transformers import optimizer

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its shape inference's remarks on our dynamic axes
    try:
        with redirect_stdout(io.StringIO()):  # and the line it prints when that inference gives up (int8 graphs)
            optimizer.optimize_model(str(path), model_type="bert", num_heads=0, hidden_size=0,
                                     opt_level=0).save_model_to_file(str(path))
    finally:
        root.setLevel(level)


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
