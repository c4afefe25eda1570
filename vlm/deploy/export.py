"""Export a model to ONNX: the image encoder and the decoder step with its key/value cache, maps kept.

An ONNX export is a directory:

- ``encoder.onnx``: ``pixels`` (B, 3, H, W) -> ``image_keys_values`` (2, L, B, H, N, hd): every decoder layer's
  cross-attention keys, then values, computed once per image (as `VisionLanguageModel.encode`); a timm ViT trunk's
  self-attention is ONNX Runtime's attention operator too (`_TrunkAttention`).
- ``decoder.onnx``: one decoder step over a key/value cache of capacity C (prompt + new tokens, as the torch path
  sizes its cache), updated in place. Inputs ``input_ids`` and ``positions`` (R, t), ``key_mask`` (R, F + t) int32
  (1 for each real key among the F filled slots and the t new positions; left padding is 0), ``filled`` (1,) int32
  (F: the slots already filled), ``beam_index`` (B, K, C) int32 (row k of image b reads slot j from the image's row
  ``beam_index[b, k, j]``: beam search reorders this table, not the cache), each layer's
  ``past_key_l``/``past_value_l`` (R, H, C, hd) and ``image_key_l``/``image_value_l`` (B, H, N, hd) of B images
  (row r reads image r // K, K = R // B); outputs ``logits`` (R, V) of the last position, each layer's
  ``present_key_l``/``present_value_l``: the same buffers with the new positions written at slots F..F+t-1 (bound to
  the past buffers, ONNX Runtime writes them in place), and with ``maps`` the cross-attention weights
  ``cross_attentions`` (B, H, L * K * t, N) (layer, row of the image, new position) and self-attention weights
  ``self_attentions`` (R, H, L * t, F + t) (layer, new position) of the new positions (raw maps and rollout), as the
  attention operators lay them out: the runtime regroups them. Each attention is one ONNX Runtime operator
  (``com.microsoft`` MultiHeadAttention), which reads the image keys where they are and, for a one-token step, only
  the filled slots of the cache through ``beam_index`` (ONNX Runtime's decoder-masked path): the graph runs on ONNX
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

from vlm.checkpoint import WEIGHTS, save_model
from vlm.errors import VLMError
from vlm.model.attention import Attention
from vlm.model.linear import OneDNNLinear
from vlm.model.vlm import VisionLanguageModel
from vlm.text.tokenizer import Tokenizer

OPSET = 17
"""ONNX opset of the export: LayerNormalization is native from 17, and every ONNX Runtime since 1.13 runs it."""
ONNX_FORMAT_VERSION = 5
"""5: maps in the attention operators' layout (4: regrouped to (R, t, L, H, N) in the graph); 4: the cache updated in
place, read through a beam index table, with a key mask (3: a (R, 1, t, C + t) mask and
new keys/values out (L, R, t, H * hd); 2: attention written out in ONNX operators; 1: the whole cache in and out,
concatenated)."""
ENCODER, DECODER, ONNX_CONFIG = "encoder.onnx", "decoder.onnx", "onnx.json"


class _NewKeysValues:
    """A stand-in for `KVCache` inside the exported step: hands each layer's new keys/values (B, T, D) on as they
    are; the layer's `_StepAttention` writes them into its cache input (the attention operator does)."""

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return k, v

    def advance(self, steps: int) -> None:
        pass


class _OrtMultiHeadAttention(torch.autograd.Function):
    """ONNX Runtime's fused attention operator (``com.microsoft`` MultiHeadAttention) in the exported step: one
    kernel for the scores, mask, softmax and weighted values of every head. Written out in ONNX's own operators
    (products, transposes, reshapes, slices, a softmax), the benchmark model's step ran 202 kernels at batch 1, 116
    with this operator, and small kernels are what a batch-1 step costs. Queries (B, T, D) as projected, already
    multiplied by head_dim ** -0.5 (the operator's scale is 1: see `_StepAttention`); keys/values either an image's
    (B, H, N, hd) or the encoder's (B, N, D) with no mask, or the new positions' (B, T, D) with ``past``:
    ``key_mask`` (B, F + T) int32, the cache ``past_k``/``past_v`` (B, H, C, hd) of which F slots are filled,
    ``filled`` (1,) int32 = F and ``beam_index`` (images, K, C) int32 (row k of an image reads slot j from the
    image's row beam_index[., k, j]). The operator then writes the new keys/values into the cache at slots
    F..F+T-1 (its present outputs are the past buffers, bound by the runtime), attends causally among the new
    positions and, for T = 1, reads only the F filled slots (ONNX Runtime's decoder-masked path). Returns the output
    (B, T, D), with ``past`` the present keys/values (B, H, C, hd), and with ``weights`` the masked scores (B, H, T,
    F + T or N), whose softmax is the attention weights.

    forward computes the same with torch (what the trace runs); the graph gets the operator, and `_omit_unused`
    then leaves out the inputs and outputs it does not use."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, num_heads: int, weights: bool, key_mask: Tensor | None = None,
                past_k: Tensor | None = None, past_v: Tensor | None = None, filled: Tensor | None = None,
                beam_index: Tensor | None = None) -> tuple[Tensor, ...]:
        B, T, D = q.shape

        def heads(x: Tensor) -> Tensor:
            return x.reshape(B, -1, num_heads, D // num_heads).transpose(1, 2)

        if past_k is None:
            if k.dim() == 3:  # keys/values (B, N, D) as projected, heads not split
                k, v = heads(k), heads(v)
            scores = heads(q) @ k.transpose(-2, -1)
            return (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D), scores
        F_, C = int(filled[0]), past_k.shape[2]
        K = beam_index.shape[1]
        rows = torch.arange(B)[:, None] // K * K + beam_index.reshape(B, C)  # (B, C): the row holding each slot
        present_k, present_v = past_k.clone(), past_v.clone()
        present_k[:, :, F_:F_ + T], present_v[:, :, F_:F_ + T] = heads(k), heads(v)
        slots = torch.arange(F_ + T)
        own = slots >= F_  # the new positions: the row's own
        keys = torch.where(own[None, None, :, None], present_k[:, :, :F_ + T],
                           present_k[rows[:, :F_ + T], :, slots].transpose(1, 2))
        values = torch.where(own[None, None, :, None], present_v[:, :, :F_ + T],
                             present_v[rows[:, :F_ + T], :, slots].transpose(1, 2))
        scores = heads(q) @ keys.transpose(-2, -1)  # (B, H, T, F + T)
        causal = slots[None, :] <= F_ + torch.arange(T)[:, None]  # (T, F + T)
        scores = scores.masked_fill(~causal, float("-inf")).masked_fill(key_mask[:, None, None, :] == 0, -1e4)
        y = (scores.softmax(-1) @ values).transpose(1, 2).reshape(B, T, D)
        return y, present_k, present_v, scores

    @staticmethod
    def symbolic(g, q, k, v, num_heads: int, weights: bool, key_mask=None, past_k=None, past_v=None, filled=None,
                 beam_index=None):
        if past_k is None:
            y, *rest = g.op("com.microsoft::MultiHeadAttention", q, k, v, num_heads_i=num_heads, scale_f=1.0,
                            outputs=4 if weights else 3)
        else:
            empty = g.op("Constant", value_t=torch.zeros(0))  # placeholders for inputs 3 (bias), 5 (attention bias)
            y, *rest = g.op("com.microsoft::MultiHeadAttention", q, k, v, empty, key_mask, empty, past_k, past_v,
                            filled, beam_index, num_heads_i=num_heads, scale_f=1.0, unidirectional_i=1,
                            outputs=4 if weights else 3)
        y.setType(q.type().with_sizes([None] * 3))  # every output typed: the exporter warns of any that is not
        for out in rest:
            out.setType(q.type().with_sizes([None] * 4))
        if past_k is None:
            return y, rest[2] if weights else y  # without weights, forward's scores are never read
        return y, rest[0], rest[1], rest[2] if weights else y


def _omit_unused(path: Path) -> None:
    """MultiHeadAttention nodes as ONNX writes optional inputs and outputs left out (an empty name), which the
    TorchScript exporter cannot write itself: the placeholder inputs 3 and 5 of a self-attention, and the present
    keys/values of an attention without past (the decoder's cross-attention, the encoder's)."""
    import onnx

    graph = onnx.load(str(path))
    placeholders = set()
    for node in graph.graph.node:
        if node.op_type != "MultiHeadAttention":
            continue
        if len(node.input) > 3:
            placeholders.update((node.input[3], node.input[5]))
            node.input[3] = node.input[5] = ""
        elif len(node.output) > 1:
            node.output[1] = node.output[2] = ""
    kept = [n for n in graph.graph.node if not set(n.output) & placeholders]
    del graph.graph.node[:]
    graph.graph.node.extend(kept)
    onnx.save(graph, str(path))


def _share_shapes(path: Path) -> None:
    """The decoder step's Shape nodes of graph inputs declared with the same shape (every layer's image keys and
    values: (images, H, N, hd)) all read the first of them, so that ONNX Runtime's common subexpression elimination
    computes that shape, and what each block derives from it (the image count of the reshape around its
    cross-attention), once: the benchmark model's step then runs 114 kernels, not 126 (1.02x at one image, 1.03x at
    32, paired)."""
    import onnx

    graph = onnx.load(str(path))
    declared = {}
    for info in graph.graph.input:
        dims = info.type.tensor_type.shape.dim
        declared[info.name] = tuple(d.dim_param or d.dim_value for d in dims)
    first: dict[tuple, str] = {}
    for node in graph.graph.node:
        if node.op_type == "Shape" and node.input[0] in declared and all(declared[node.input[0]]):
            node.input[0] = first.setdefault(declared[node.input[0]], node.input[0])
    onnx.save(graph, str(path))


def _prescale_queries(q: nn.Linear, head_dim: int) -> None:
    """A query projection's weights (and bias) multiplied by head_dim ** -0.5, in place, so that the attention
    operator runs with scale 1 (see `_StepAttention`)."""
    with torch.no_grad():
        q.weight *= head_dim ** -0.5
        if q.bias is not None:
            q.bias *= head_dim ** -0.5


class _StepAttention(Attention):
    """`Attention.forward` as the exported step computes it: ONNX Runtime's fused attention (`_OrtMultiHeadAttention`).
    In self-attention ``past`` is set (the key mask, the cache's keys and values, the filled slots and the beam index
    table) and stands for forward's mask; the operator writes the new positions' keys/values (B, T, D), heads not
    split, into the cache, whose present buffers the layer keeps in ``present``. It returns no weights: with
    ``keep_scores`` it keeps the operator's scores (B, H, T, S) in ``scores``, of which `DecoderStepGraph` makes the
    maps of all layers at once.

    Its query projection multiplies by head_dim ** -0.5 (`convert` scales its weights) and the operator's scale is
    1: ONNX Runtime multiplies a one-token query by the keys without copying them only when that product is
    unscaled, which made the benchmark model's cross-attention 1.5x faster at 16 rows (and its batch-1 generation
    1.1x)."""

    past: tuple[Tensor, ...] | None = None  # key mask, keys, values, filled, beam index
    present: tuple[Tensor, Tensor] | None = None
    keep_scores = False
    scores: Tensor | None = None

    @classmethod
    def convert(cls, attn: Attention) -> None:
        """attn, a copy of the model's, as a `_StepAttention`: its query projection's weights scaled."""
        attn.__class__ = cls
        _prescale_queries(attn.q, attn.head_dim)

    def keys_values(self, source: Tensor) -> tuple[Tensor, Tensor]:
        k, v = self.kv(source).split(self.num_heads * self.head_dim, dim=-1)  # 2 x (B, S, D)
        return k, v

    def forward(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, is_causal: bool = False,
                need_weights: bool = False) -> tuple[Tensor, None]:
        if self.past is None:
            y, self.scores = _OrtMultiHeadAttention.apply(self.q(x), k, v, self.num_heads, self.keep_scores)
        else:
            y, *self.present, self.scores = _OrtMultiHeadAttention.apply(self.q(x), k, v, self.num_heads,
                                                                        self.keep_scores, *self.past)
        return self.proj(y), None


class _FlatLinear(nn.Linear):
    """`nn.Linear` over a fixed number of tokens (B, N, D) as one product of (B * N, D) rows: ONNX Runtime folds a
    2D product and its bias into one Gemm, while a 3D product keeps a separate Add. N is the module's ``tokens``, a
    constant of the graph (so no shape operators): what it saw at the export's image size (`_flatten_linears`)."""

    tokens: int

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.reshape(-1, self.in_features), self.weight, self.bias).reshape(-1, self.tokens,
                                                                                         self.out_features)


def _flatten_linears(encoder: nn.Module, pixels: Tensor) -> None:
    """The encoder's linear layers that see tokens (B, N, D), always the same N, as `_FlatLinear`s (one dry run on
    ``pixels`` tells each its N); any other stays as it is."""
    seen: dict[nn.Module, set] = {}

    def record(module: nn.Module, args: tuple) -> None:
        seen.setdefault(module, set()).add(args[0].shape[1] if args[0].dim() == 3 else None)

    linears = [m for m in encoder.modules() if type(m) in (nn.Linear, OneDNNLinear)]
    hooks = [m.register_forward_pre_hook(record) for m in linears]
    with torch.no_grad():
        encoder(pixels)
    for hook in hooks:
        hook.remove()
    for module, tokens in seen.items():
        if len(tokens) == 1 and None not in tokens:
            module.__class__, module.tokens = _FlatLinear, next(iter(tokens))


class _TrunkAttention(nn.Module):
    """timm's ViT self-attention (`timm.models.vision_transformer.Attention`, without query/key norms, output norm
    or gate) as the exported encoder computes it: the queries, keys and values projected by three products of the
    fused projection's weights (the queries' prescaled, `_prescale_queries`) and attended by one
    ONNX Runtime operator (`_OrtMultiHeadAttention`), instead of the projection's split, the heads' transposes, two
    batched products and a softmax (in the benchmark model's 4 blocks: 16 Transposes, 4 Splits, 8 MatMuls and 4
    Softmaxes). Paired runs on one thread: ViT-B/16 at 224 px, 8 images, 1.02x; the benchmark model's encoder (4
    blocks, 65 tokens), 16 images, 1.00-1.02x."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.num_heads, self.proj = attn.num_heads, attn.proj
        D = attn.num_heads * attn.head_dim
        weights = attn.qkv.weight.detach().split(D)
        biases = attn.qkv.bias.detach().split(D) if attn.qkv.bias is not None else (None,) * 3
        self.q, self.k, self.v = (nn.Linear(attn.qkv.in_features, D, bias=b is not None) for b in biases)
        with torch.no_grad():
            for linear, w, b in zip((self.q, self.k, self.v), weights, biases, strict=True):
                linear.weight.copy_(w)
                if b is not None:
                    linear.bias.copy_(b)
        _prescale_queries(self.q, attn.head_dim)

    @staticmethod
    def replaceable(module: nn.Module) -> bool:
        from timm.models.vision_transformer import Attention as TimmAttention

        return type(module) is TimmAttention and all(isinstance(getattr(module, name, None), (nn.Identity, type(None)))
                                                     for name in ("q_norm", "k_norm", "norm", "gate"))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise VLMError("cannot export a ViT whose attention is masked to ONNX")
        y, _ = _OrtMultiHeadAttention.apply(self.q(x), self.k(x), self.v(x), self.num_heads, False)
        return self.proj(y)


def _replace_trunk_attention(encoder: nn.Module) -> None:
    """The encoder's timm ViT attention modules that `_TrunkAttention` computes, replaced by it."""
    for parent in list(encoder.modules()):
        for name, child in parent.named_children():
            if _TrunkAttention.replaceable(child):
                setattr(parent, name, _TrunkAttention(child))


class EncoderGraph(nn.Module):
    """Pixels -> every decoder layer's cross-attention keys and values, (2, L, B, H, N, hd): the patch features'
    product with all layers' key/value weights at once (one product and one transpose, not one of each per layer and
    a stack), as `TextDecoder.image_keys_values` computes them layer by layer. It runs a copy of the encoder whose
    linear layers over tokens are `_FlatLinear`s (for ``pixels`` of the export's size)."""

    def __init__(self, model: VisionLanguageModel, pixels: Tensor):
        super().__init__()
        self.model, self.encoder = model, copy.deepcopy(model.encoder)
        _replace_trunk_attention(self.encoder)
        _flatten_linears(self.encoder, pixels)

    def forward(self, pixels: Tensor) -> Tensor:
        memory, _ = self.encoder(pixels)  # (B, N, D)
        kv = [block.cross_attn.kv for block in self.model.decoder.blocks]
        attn = self.model.decoder.blocks[0].cross_attn
        B, N, _ = memory.shape
        every = F.linear(memory.flatten(0, 1), torch.cat([p.weight for p in kv]),
                         torch.cat([p.bias for p in kv]))  # (B * N, L*2*D)
        return every.reshape(B, N, len(kv), 2, attn.num_heads, attn.head_dim).permute(3, 2, 0, 4, 1, 5)


class DecoderStepGraph(nn.Module):
    """One decoder step over new tokens, the cache (updated in place), its beam index table and the image
    keys/values per layer as inputs (the module docstring's ``decoder.onnx``).

    It runs a copy of the model's decoder whose attention modules are `_StepAttention`s: the same weights (the
    queries' scaled) and the same ``TextDecoder.forward``, each attention one ONNX Runtime operator in the graph;
    with maps, the operators' scores of all layers become the maps at once: one concatenation and one softmax each
    for cross and self, in the operators' layout. Regrouped in the graph (rows and positions first, then layers), the
    maps took 32 more kernels than the plain step, mostly shape arithmetic, 9% of a batch-1 step; now 4."""

    def __init__(self, model: VisionLanguageModel, maps: bool):
        super().__init__()
        self.decoder, self.maps = copy.deepcopy(model.decoder), maps
        for block in self.decoder.blocks:
            for attn in (block.self_attn, block.cross_attn):
                _StepAttention.convert(attn)
                attn.keep_scores = maps

    def forward(self, input_ids: Tensor, positions: Tensor, key_mask: Tensor, filled: Tensor, beam_index: Tensor,
                *layers: Tensor) -> tuple[Tensor, ...]:
        L = len(self.decoder.blocks)  # layers: L past keys, L past values, L image keys, L image values
        past_k, past_v, image_k, image_v = (layers[i * L:(i + 1) * L] for i in range(4))
        for block, k, v in zip(self.decoder.blocks, past_k, past_v, strict=True):
            block.self_attn.past = (key_mask, k, v, filled, beam_index)
        out = self.decoder(input_ids, list(zip(image_k, image_v, strict=True)), positions=positions,
                           cache=_NewKeysValues())
        presents = [block.self_attn.present for block in self.decoder.blocks]
        outputs = (out.logits[:, -1], *[k for k, _ in presents], *[v for _, v in presents])
        if self.maps:  # every layer's weights at once: each image's K rows are one query sequence of its cross-
            # attention, (B, H, K * t, N) a layer, so (B, H, L * K * t, N); self-attention (R, H, L * t, F + t)
            outputs += tuple(torch.cat([b.scores for b in attns], dim=2).softmax(-1) for attns in (
                [b.cross_attn for b in self.decoder.blocks], [b.self_attn for b in self.decoder.blocks]))
        return outputs


def step_input_names(layers: int) -> list[str]:
    """The decoder step graph's inputs, in order."""
    return ["input_ids", "positions", "key_mask", "filled", "beam_index"] + [
        f"{kind}_{i}" for kind in ("past_key", "past_value", "image_key", "image_value") for i in range(layers)]


def step_output_names(layers: int, maps: bool) -> list[str]:
    """The decoder step graph's outputs, in order: the logits, every layer's present keys, then values (the cache
    buffers, written in place), with maps the attention weights."""
    return ["logits"] + [f"present_{kind}_{i}" for kind in ("key", "value") for i in range(layers)] + (
        ["cross_attentions", "self_attentions"] if maps else [])


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
    if (out / WEIGHTS).exists():  # the export writes its config.json and tokenizer.json there, and no weights
        raise VLMError(f"--out {out}: holds a torch model ({WEIGHTS}), which the ONNX export would overwrite and "
                       f"delete: choose another directory")
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
    # 2 images of 2 rows, a cache of 6 slots with 3 filled, 2 new positions: no axis of size 1 to be specialised on
    R, C, filled, t = 4, 6, 3, 2
    ids = torch.randint(0, model.vocab_size, (R, t))
    positions = torch.arange(filled, filled + t).expand(R, t).contiguous()
    key_mask = torch.ones(R, filled + t, dtype=torch.int32)
    beam_index = torch.randint(0, R // 2, (2, R // 2, C), dtype=torch.int32)
    past = [torch.randn(R, H, C, hd) for _ in range(2 * L)]
    with warnings.catch_warnings(), _one_line_errors():  # the exporter's deprecation notice and tracer remarks
        warnings.simplefilter("ignore")
        torch.onnx.export(
            EncoderGraph(model, pixels).eval(), (pixels,), out / ENCODER, dynamo=False, opset_version=OPSET,
            input_names=["pixels"], output_names=["image_keys_values"],
            dynamic_axes={"pixels": {0: "images"}, "image_keys_values": {2: "images"}},
        )
        names, outputs = step_input_names(L), step_output_names(L, maps)
        axes = {"input_ids": {0: "rows", 1: "new"}, "positions": {0: "rows", 1: "new"},
                "key_mask": {0: "rows", 1: "filled_and_new"}, "beam_index": {0: "images", 1: "rows_per_image",
                                                                           2: "capacity"},
                **{name: {0: "rows", 2: "capacity"} for name in names + outputs if name.startswith(("past_",
                                                                                                   "present_"))},
                **{name: {0: "images"} for name in names if name.startswith("image_")},
                "logits": {0: "rows"}, "cross_attentions": {0: "images", 2: "layers_rows_new"},
                "self_attentions": {0: "rows", 2: "layers_new", 3: "filled_and_new"}}
        torch.onnx.export(
            DecoderStepGraph(model, maps).eval(),
            (ids, positions, key_mask, torch.tensor([filled], dtype=torch.int32), beam_index, *past,
             *image_keys.unbind(0), *image_values.unbind(0)), out / DECODER,
            dynamo=False, opset_version=OPSET, input_names=names, output_names=outputs,
            dynamic_axes={k: v for k, v in axes.items() if maps or not k.endswith("_attentions")},
        )
    _omit_unused(out / ENCODER)
    _omit_unused(out / DECODER)
    _share_shapes(out / DECODER)
    for name in (ENCODER, DECODER):
        onnx.checker.check_model(str(out / name), full_check=True)
        if quantize == "int8":
            _quantize_int8(out / name)
        fuse(out / name)
    save_model(model, tokenizer, out)
    (out / WEIGHTS).unlink()  # the ONNX files are the weights; config.json and tokenizer.json stay
    if data_config is None:
        import timm.data

        data_config = timm.data.resolve_data_config({}, model=model.encoder.trunk)
    facts = {"format": "vlm-onnx", "onnx_format_version": ONNX_FORMAT_VERSION, "opset": OPSET, "maps": maps,
             "quantize": quantize, "grid": list(grid),
             "num_prefix": int(getattr(model.encoder, "num_prefix", 0)), "layers": L, "heads": H, "head_dim": hd,
             "vocab_size": model.vocab_size, "max_length": model.cfg.decoder.max_length,
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
    it writes ONNX Runtime's own operators): bias and GELU become one BiasGelu. Residual sums and LayerNorms stay
    apart: its SkipLayerNormalization made the benchmark model's decoder step 9% (16 rows) to 12% (48 rows) slower
    on one thread, and its encoder 3%, against the Add and the LayerNormalization it replaces. Attention it does not
    fuse (in the timm encoder, in HF's decoders): the decoder step is exported with ONNX Runtime's attention operator
    already (`_StepAttention`). scripts/bench.py runs it on the HF baseline's graphs too, as optimum's ORTOptimizer
    would."""
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions("bert")
    options.enable_skip_layer_norm = options.enable_bias_skip_layer_norm = False
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its shape inference's remarks on our dynamic axes
    try:
        with redirect_stdout(io.StringIO()):  # and the line it prints when that inference gives up (int8 graphs)
            optimizer.optimize_model(str(path), model_type="bert", num_heads=0, hidden_size=0, opt_level=0,
                                     optimization_options=options).save_model_to_file(str(path))
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
