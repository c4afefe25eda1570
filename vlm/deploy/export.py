"""Export a model to ONNX: the image encoder and the decoder step with its key/value cache, maps kept.

An ONNX export is a directory:

- ``encoder.onnx``: ``pixels`` (B, 3, H, W) -> ``image_keys_values`` (2, L, B, H, N, hd): every decoder layer's
  cross-attention keys, then values, computed once per image (as `VisionLanguageModel.encode`).
- ``decoder.onnx``: one decoder step over a key/value cache of fixed capacity C (prompt + new tokens, as the torch
  path sizes its cache). Inputs ``input_ids`` and ``positions`` (R, t), ``self_mask`` (R, 1, t, C + t) (True where a
  new token may attend: the cache's C slots, then the t new positions), each layer's ``past_key_l``/``past_value_l``
  (R, H, C, hd) (the slots not yet filled are masked out) and ``image_key_l``/``image_value_l`` (B, H, N, hd) of B
  images (row r reads image r // (R // B)); outputs ``logits`` (R, V) of the last position, ``new_keys``/``new_values``
  (L, R, t, H * hd) of the new positions only (the runtime writes them into its cache in place), and with ``maps`` the
  cross-attention weights ``cross_attentions`` (R, t, L, H, N) and self-attention weights ``self_attentions``
  (R, t, L, H, C + t) of the new positions (raw maps and rollout). Each attention is one ONNX Runtime operator
  (``com.microsoft`` MultiHeadAttention), which reads the image keys where they are: the graph runs on ONNX
  Runtime (the ``onnx`` extra's), not on every ONNX runtime.
- ``config.json`` and ``tokenizer.json``: as in an exported torch model (`vlm.checkpoint`);
- ``onnx.json``: the export's own facts: opset, maps, quantization, patch grid, image preprocessing, and each
  ONNX file's size and SHA-256 (so a damaged or swapped file is refused by name).

Batch, rows (beams or samples per image), new positions and cache capacity are dynamic axes: one export serves
every batch size and beam width (the capacity may be 0: a teacher-forced run reads a whole sequence). The exporter is
torch's TorchScript-based one (``dynamo=False``, deprecated in torch 2.x but present): it traces the same Python the
torch path runs (``TextDecoder.forward``, with a cache object that keeps the new keys/values and an attention that
the graph gets as ONNX Runtime's operator, `_StepAttention`) and exports the tiny test model's
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
import torch.nn.functional as F
from torch import Tensor, nn

from vlm.checkpoint import save_model
from vlm.errors import VLMError
from vlm.model.attention import Attention
from vlm.model.vlm import VisionLanguageModel
from vlm.text.tokenizer import Tokenizer

OPSET = 17
"""ONNX opset of the export: LayerNormalization is native from 17, and every ONNX Runtime since 1.13 runs it."""
ONNX_FORMAT_VERSION = 3
"""3: attention as ONNX Runtime's operator, one encoder output, new keys/values (L, R, t, H * hd) (2: attention
written out in ONNX operators; 1: the whole cache in and out, concatenated)."""
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


class _OrtMultiHeadAttention(torch.autograd.Function):
    """ONNX Runtime's fused attention operator (``com.microsoft`` MultiHeadAttention) in the exported step: one
    kernel for the scores, mask, softmax and weighted values of every head. Written out in ONNX's own operators
    (products, transposes, reshapes, slices, a softmax), the benchmark model's step ran 202 kernels at batch 1, 116
    with this operator, and small kernels are what a batch-1 step costs. Queries (B, T, D) as projected;
    keys/values either the new positions' (B, T, D) after ``past`` keys/values (B, H, C, hd), with ``bias``
    (B, 1, T, C + T: 0 where a query may attend, -inf elsewhere) added to the scores, or an image's (B, H, N, hd)
    with no mask. Returns the output (B, T, D) and, with ``weights``, the
    operator's masked, scaled scores (B, H, T, C + T or N), whose softmax is the attention weights.

    forward computes the same with torch (what the trace runs); the graph gets the operator, and `_omit_unused`
    then leaves out the inputs and outputs it does not use."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, num_heads: int, weights: bool, bias: Tensor | None = None,
                past_k: Tensor | None = None, past_v: Tensor | None = None) -> tuple[Tensor, Tensor]:
        B, T, D = q.shape

        def heads(x: Tensor) -> Tensor:
            return x.reshape(B, -1, num_heads, D // num_heads).transpose(1, 2)

        if past_k is not None:
            k, v = torch.cat([past_k, heads(k)], 2), torch.cat([past_v, heads(v)], 2)
        scores = heads(q) @ k.transpose(-2, -1) * (D // num_heads) ** -0.5
        if bias is not None:
            scores = scores + bias
        y = scores.softmax(-1) @ v  # (B, H, T, hd)
        return y.transpose(1, 2).reshape(B, T, D), scores

    @staticmethod
    def symbolic(g, q, k, v, num_heads: int, weights: bool, bias=None, past_k=None, past_v=None):
        inputs = [q, k, v]
        if past_k is not None:
            empty = g.op("Constant", value_t=torch.zeros(0))  # placeholders for inputs 3 (bias), 4 (padding mask)
            inputs += [empty, empty, bias, past_k, past_v]
        # outputs: y, present keys/values (with a past they are asked for though unused: ONNX Runtime 1.32's CPU
        # kernel attends to wrong values without them, measured), scores (with weights)
        y, *rest = g.op("com.microsoft::MultiHeadAttention", *inputs, num_heads_i=num_heads,
                        outputs=4 if weights else 3)
        y.setType(q.type().with_sizes([None] * 3))  # every output typed: the exporter warns of any that is not
        for out in rest:
            out.setType(q.type().with_sizes([None] * 4))
        return y, rest[2] if weights else y  # without weights, forward's scores are never read


def _omit_unused(path: Path) -> None:
    """MultiHeadAttention nodes as ONNX writes optional inputs and outputs left out (an empty name), which the
    TorchScript exporter cannot write itself: the placeholder inputs 3 and 4, and the present keys/values of a
    cross-attention (no past)."""
    import onnx

    graph = onnx.load(str(path))
    placeholders = set()
    for node in graph.graph.node:
        if node.op_type != "MultiHeadAttention":
            continue
        if len(node.input) > 3:
            placeholders.update(node.input[3:5])
            node.input[3] = node.input[4] = ""
        elif len(node.output) > 1:
            node.output[1] = node.output[2] = ""
    kept = [n for n in graph.graph.node if not set(n.output) & placeholders]
    del graph.graph.node[:]
    graph.graph.node.extend(kept)
    onnx.save(graph, str(path))


class _StepAttention(Attention):
    """`Attention.forward` as the exported step computes it: ONNX Runtime's fused attention (`_OrtMultiHeadAttention`),
    with weights the softmax of its scores. In self-attention ``past`` is set (the step's mask as a bias, then the
    fixed-capacity cache's keys/values (R, H, C, hd)), and stands for forward's mask; the keys/values of the new
    positions stay (B, T, D), heads not split, as the step outputs them."""

    past: tuple[Tensor, Tensor, Tensor] | None = None  # bias, keys, values

    def keys_values(self, source: Tensor) -> tuple[Tensor, Tensor]:
        k, v = self.kv(source).split(self.num_heads * self.head_dim, dim=-1)  # 2 x (B, S, D)
        return k, v

    def forward(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, is_causal: bool = False,
                need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        past = self.past or ()
        y, scores = _OrtMultiHeadAttention.apply(self.q(x), k, v, self.num_heads, need_weights, *past)
        return self.proj(y), scores.softmax(-1) if need_weights else None


class EncoderGraph(nn.Module):
    """Pixels -> every decoder layer's cross-attention keys and values, (2, L, B, H, N, hd): the patch features'
    product with all layers' key/value weights at once (one product and one transpose, not one of each per layer and
    a stack), as `TextDecoder.image_keys_values` computes them layer by layer."""

    def __init__(self, model: VisionLanguageModel):
        super().__init__()
        self.model = model

    def forward(self, pixels: Tensor) -> Tensor:
        memory, _ = self.model.encoder(pixels)  # (B, N, D)
        kv = [block.cross_attn.kv for block in self.model.decoder.blocks]
        attn = self.model.decoder.blocks[0].cross_attn
        B, N, _ = memory.shape
        every = F.linear(memory, torch.cat([p.weight for p in kv]), torch.cat([p.bias for p in kv]))  # (B, N, L*2*D)
        return every.reshape(B, N, len(kv), 2, attn.num_heads, attn.head_dim).permute(3, 2, 0, 4, 1, 5)


class DecoderStepGraph(nn.Module):
    """One decoder step over new tokens, the fixed-capacity self-attention cache and the image keys/values per layer
    as inputs, the new positions' keys/values as outputs (the module docstring's ``decoder.onnx``).

    It runs a copy of the model's decoder whose attention modules are `_StepAttention`s: the same weights and the
    same ``TextDecoder.forward``, each attention one ONNX Runtime operator in the graph."""

    def __init__(self, model: VisionLanguageModel, maps: bool):
        super().__init__()
        self.decoder, self.maps = copy.deepcopy(model.decoder), maps
        for block in self.decoder.blocks:
            block.self_attn.__class__ = block.cross_attn.__class__ = _StepAttention

    def forward(self, input_ids: Tensor, positions: Tensor, self_mask: Tensor, *layers: Tensor) -> tuple[Tensor, ...]:
        L = len(self.decoder.blocks)  # layers: L past keys, L past values, L image keys, L image values
        past_k, past_v, image_k, image_v = (layers[i * L:(i + 1) * L] for i in range(4))
        bias = torch.where(self_mask, 0.0, float("-inf"))  # the mask, as the attention operator adds it
        for block, k, v in zip(self.decoder.blocks, past_k, past_v, strict=True):
            block.self_attn.past = (bias, k, v)
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
            input_names=["pixels"], output_names=["image_keys_values"],
            dynamic_axes={"pixels": {0: "images"}, "image_keys_values": {2: "images"}},
        )
        outputs = ["logits", "new_keys", "new_values"] + (["cross_attentions", "self_attentions"] if maps else [])
        names = step_input_names(L)
        axes = {"input_ids": {0: "rows", 1: "new"}, "positions": {0: "rows", 1: "new"},
                "self_mask": {0: "rows", 2: "new", 3: "capacity_and_new"},
                **{name: {0: "rows", 2: "capacity"} for name in names if name.startswith("past_")},
                **{name: {0: "images"} for name in names if name.startswith("image_")},
                "logits": {0: "rows"}, "new_keys": {1: "rows", 2: "new"}, "new_values": {1: "rows", 2: "new"},
                "cross_attentions": {0: "rows", 1: "new"},
                "self_attentions": {0: "rows", 1: "new", 4: "capacity_and_new"}}
        torch.onnx.export(
            DecoderStepGraph(model, maps).eval(),
            (ids, positions, self_mask, *past, *image_keys.unbind(0), *image_values.unbind(0)), out / DECODER,
            dynamo=False, opset_version=OPSET, input_names=names, output_names=outputs,
            dynamic_axes={k: v for k, v in axes.items() if maps or not k.endswith("_attentions")},
        )
    _omit_unused(out / DECODER)
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
    SkipLayerNormalization, bias and GELU one BiasGelu. Attention it does not fuse (in the timm encoder, in HF's
    decoders): the decoder step is exported with ONNX Runtime's attention operator already (`_StepAttention`).
    scripts/bench.py runs it on the HF baseline's graphs too, as optimum's ORTOptimizer would."""
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
