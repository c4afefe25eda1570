"""Training and generation speed, side by side with transformers' VisionEncoderDecoderModel.

Both models are built from scratch with the same dimensions: 128 px images in 16 px patches, width 256,
4 encoder and 4 decoder layers, 4 heads, MLP 1024, vocabulary 1000, dropout 0. Ours: a timm ViT read at
its last block and our decoder; theirs: a ViT encoder and a BERT decoder with cross-attention. Both train
with the same AdamW; both generate exactly --new-tokens tokens (the end token is forbidden before).

    .venv/bin/python scripts/bench.py                      # CPU, about 5 minutes on 2 cores
    .venv/bin/python scripts/bench.py --device cuda        # bf16 autocast on both sides
    .venv/bin/python scripts/bench.py --only onnx --json /tmp/onnx_speed.json   # the ONNX Runtime rows alone

ONNX rows (skip with --no-onnx): our model exported (`vlm export --format onnx`: fp32, fp32 with maps, int8) on
ONNX Runtime with the same threads (the runtime's own choice: a call over several images in one-thread lanes side by
side, a batch-1 decoder step on one thread), decoding with the same loop, against HF eager and against HF's model on
ONNX Runtime with its key/value cache (`HFOnnxSide`: exported here with torch.onnx, since optimum cannot export a
BERT decoder with a cache); the ceilings are ours over HF eager, as above, with HF eager as timed beside each ONNX row
(int8 is held to fp32's least time).

Timings alternate the two sides over --reps repetitions and report medians. The ceiling of each ratio is
a roofline bound, HF's time over the least time our work could take: for training, our counted FLOPs at the
measured matmul peak; for generation, the encoder's FLOPs at that peak plus, for each generated token, the
longer of the step's FLOPs at that peak and the time to read every decoder weight once, which a decode step of
any batch must do (measured as one sum over a buffer of all of them: the memory's own rate). The time torch's
one-row products take to stream the same weights is reported beside it.
Peak training memory: on CPU, the rise of the process's peak resident memory (VmHWM) over its
resident memory once the model, the optimiser and the batch exist, measured for each side in a fresh
subprocess over 3 training steps, and the rise of live tensor memory over 2 more steps from torch's memory
timeline; on CUDA, torch's peak allocated memory. The matmul peak is the median
rate of a large fp32 (CPU) or bf16 (CUDA) matrix product (on the CPU, the faster of torch's and oneDNN's, which our
layers use: `vlm.model.linear`); FLOPs are counted by torch's FlopCounterMode.
The ONNX rows' ceilings take the higher of that peak and ONNX Runtime's own (`onnx_matmul_peak`: its product on the
large square and on the model's largest shape), since their products run on ONNX Runtime.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from _bench import add_json_option, alternate, paired_overhead, peak_resident_bytes, report, sync, timed
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlm.config import DecoderConfig, DecodingConfig, EncoderConfig, ModelConfig  # noqa: E402
from vlm.model.generate import decode, generate  # noqa: E402
from vlm.model.linear import ReorderedWeight, linear  # noqa: E402
from vlm.model.vlm import VisionLanguageModel  # noqa: E402
from vlm.train.module import adamw  # noqa: E402

PAD, BOS, EOS = 0, 1, 2
DIMS = dict(image=128, patch=16, width=256, enc_layers=4, dec_layers=4, heads=4, mlp=1024, vocab=1000, max_length=32)
BATCH1_REPS_FACTOR, BATCH32_REPS_FACTOR = 6, 3


def build_ours(device: torch.device) -> VisionLanguageModel:
    d = DIMS
    encoder = EncoderConfig(
        name="vit_tiny_patch16_224", feature_level=-1, image_size=d["image"],
        model_args=dict(img_size=d["image"], patch_size=d["patch"], embed_dim=d["width"], depth=d["enc_layers"],
                        num_heads=d["heads"], mlp_ratio=d["mlp"] / d["width"]),
    )
    decoder = DecoderConfig(width=d["width"], depth=d["dec_layers"], num_heads=d["heads"],
                            mlp_ratio=d["mlp"] / d["width"], dropout=0.0, max_length=d["max_length"])
    return VisionLanguageModel(ModelConfig(encoder=encoder, decoder=decoder), d["vocab"]).to(device)


def build_hf(device: torch.device):
    from transformers import BertConfig, VisionEncoderDecoderConfig, VisionEncoderDecoderModel, ViTConfig

    d = DIMS
    enc = ViTConfig(image_size=d["image"], patch_size=d["patch"], hidden_size=d["width"],
                    num_hidden_layers=d["enc_layers"], num_attention_heads=d["heads"], intermediate_size=d["mlp"],
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    dec = BertConfig(vocab_size=d["vocab"], hidden_size=d["width"], num_hidden_layers=d["dec_layers"],
                     num_attention_heads=d["heads"], intermediate_size=d["mlp"], hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, max_position_embeddings=d["max_length"], is_decoder=True,
                     add_cross_attention=True)
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = BOS, PAD, EOS
    return VisionEncoderDecoderModel(config=cfg).to(device)


def make_batch(batch: int, length: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, DIMS["image"], DIMS["image"], generator=g).to(device)
    labels = torch.randint(3, DIMS["vocab"], (batch, length), generator=g).to(device)
    inputs = torch.cat([torch.full((batch, 1), BOS, device=device), labels[:, :-1]], dim=1)  # shifted right
    return images, inputs, labels


class Side:
    """One model with its training step and generation call."""

    def __init__(self, name: str, model, device: torch.device, autocast):
        self.name, self.model, self.device, self.autocast = name, model, device, autocast
        self.optimizer = adamw([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def loss(self, images, inputs, labels):
        with self.autocast():
            if self.name == "ours":
                logits = self.model(images, inputs).logits  # (B, T, V)
                return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
            return self.model(pixel_values=images, labels=labels).loss

    def train_step(self, images, inputs, labels) -> None:
        self.model.train()
        loss = self.loss(images, inputs, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    @torch.no_grad()
    def generate(self, images, new_tokens: int, beams: int = 1, attention: bool = False):
        self.model.eval()
        with self.autocast():
            if self.name == "ours":
                image_kv, _ = self.model.encode(images)
                return generate(self.model, image_kv, [[BOS]] * images.shape[0], eos_id=EOS, pad_id=PAD,
                                config=DecodingConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                      beam_size=beams), return_attention=attention)
            return self.model.generate(images, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                       num_beams=beams, do_sample=False)


class OnnxSide:
    """Our model exported to ONNX (`vlm.deploy.export`) on ONNX Runtime with --threads threads, generating as the
    runtime does (`vlm.deploy.runtime.generate`: the same loop as torch, `vlm.model.generate.decode`, with the
    exported step; a call over several images in --threads lanes of one-thread runs, a batch-1 step on one thread):
    fp32 without maps, fp32 with maps, int8 (dynamic quantization) without maps."""

    def __init__(self, model: VisionLanguageModel, folder: Path, threads: int):
        from vlm.deploy.export import export_onnx
        from vlm.deploy.runtime import OnnxModel
        from vlm.text.tokenizer import Tokenizer

        data = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear")
        tokenizer = Tokenizer.train(["a b c"])  # only copied into the export; decoding here reads no text
        self.models = {}
        for name, options in {"fp32": {}, "maps": dict(maps=True), "int8": dict(quantize="int8")}.items():
            export_onnx(model, tokenizer, folder / name, data_config=data, **options)
            _patch_vocab(folder / name, model.vocab_size)
            self.models[name] = OnnxModel(folder / name, threads)

    def generate(self, images, new_tokens: int, beams: int = 1, attention: bool = False, variant: str = "fp32"):
        from vlm.deploy.runtime import generate as generate_onnx

        onnx = self.models["maps" if attention else variant]
        encoded, _ = onnx.encode(images)
        return generate_onnx(onnx, encoded, [[BOS]] * images.shape[0], eos_id=EOS, pad_id=PAD,
                             config=DecodingConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                   beam_size=beams), return_attention=attention)


class HFOnnxSide:
    """transformers' model on ONNX Runtime with its key/value cache: the strongest thing an HF user would do.

    optimum cannot export this BERT decoder with a cache (it silently exports one without), and optimum-onnx pins
    an older transformers, so the graphs are exported here with torch.onnx (TorchScript exporter, opset 17) the way
    optimum lays them out: the ViT encoder; the decoder's first step, which also returns every layer's
    cross-attention keys/values; and the decoder step with past, self- and cross-attention caches as inputs. The
    steps run in our decoding loop (`decode`, with HF's per-beam copies of the encoder output and of the
    cross-attention cache, reordered with the beams as HF does): a faster loop than HF's generate, so this
    baseline is, if anything, flattered. Its graphs get the fusions ours get (`vlm.deploy.export.fuse`, ONNX
    Runtime's transformer optimizer, as optimum's ORTOptimizer would apply) and run with our session options.
    Checked against HF eager greedy tokens before timing."""

    def __init__(self, hf, folder: Path, threads: int):
        import warnings

        import onnxruntime as ort
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        from vlm.deploy.export import fuse
        from vlm.deploy.runtime import session_options

        decoder = hf.decoder

        class Encoder(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.hf = hf

            def forward(self, pixels):
                return self.hf.encoder(pixel_values=pixels).last_hidden_state

        class First(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.decoder = decoder

            def forward(self, ids, states):
                out = self.decoder(input_ids=ids, encoder_hidden_states=states, use_cache=True,
                                   cache=EncoderDecoderCache(DynamicCache(), DynamicCache()))
                own, cross = out.past_key_values.self_attention_cache.layers, \
                    out.past_key_values.cross_attention_cache.layers
                return (out.logits[:, -1], *(torch.stack([getattr(x, a) for x in layers])
                                             for layers in (own, cross) for a in ("keys", "values")))

        class Next(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.decoder = decoder

            def forward(self, ids, states, keys, values, cross_keys, cross_values):
                cache = EncoderDecoderCache(DynamicCache(list(zip(keys.unbind(0), values.unbind(0), strict=True))),
                                            DynamicCache(list(zip(cross_keys.unbind(0), cross_values.unbind(0),
                                                                  strict=True))))
                out = self.decoder(input_ids=ids, encoder_hidden_states=states, cache=cache, use_cache=True)
                own = out.past_key_values.self_attention_cache.layers
                return out.logits[:, -1], torch.stack([x.keys for x in own]), torch.stack([x.values for x in own])

        images = torch.randn(2, 3, DIMS["image"], DIMS["image"])
        ids = torch.full((2, 1), BOS)
        rows, cache_axes = {0: "rows"}, {1: "rows", 3: "length"}
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(Encoder().eval(), (images,), folder / "encoder.onnx", dynamo=False, opset_version=17,
                              input_names=["pixels"], output_names=["states"],
                              dynamic_axes={"pixels": rows, "states": rows})
            states = Encoder()(images)
            torch.onnx.export(First().eval(), (ids, states), folder / "first.onnx", dynamo=False, opset_version=17,
                              input_names=["ids", "states"], output_names=["logits", "k", "v", "ck", "cv"],
                              dynamic_axes={"ids": rows, "states": rows, "logits": rows, "k": cache_axes,
                                            "v": cache_axes, "ck": {1: "rows"}, "cv": {1: "rows"}})
            past = First()(torch.full((2, 3), BOS), states)[1:]
            torch.onnx.export(Next().eval(), (ids, states, *past), folder / "next.onnx", dynamo=False,
                              opset_version=17, input_names=["ids", "states", "pk", "pv", "ck", "cv"],
                              output_names=["logits", "k", "v"],
                              dynamic_axes={"ids": rows, "states": rows, "pk": cache_axes, "pv": cache_axes,
                                            "ck": {1: "rows"}, "cv": {1: "rows"}, "logits": rows, "k": cache_axes,
                                            "v": cache_axes})
        for name in ("encoder", "first", "next"):
            fuse(folder / f"{name}.onnx")  # the fusions ours gets (optimum's ORTOptimizer would make them)
        options = session_options(threads)  # ours: same threads, same sleeping pools
        self.sessions = {name: ort.InferenceSession(str(folder / f"{name}.onnx"), options,
                                                    providers=["CPUExecutionProvider"])
                         for name in ("encoder", "first", "next")}

    def generate(self, images, new_tokens: int, beams: int = 1):
        from vlm.deploy.runtime import one_torch_thread

        states = self.sessions["encoder"].run(None, {"pixels": images.numpy()})[0]
        with one_torch_thread():  # as ours
            return decode(_HFOrtDecoder(self.sessions, states), [[BOS]] * images.shape[0], eos_id=EOS, pad_id=PAD,
                          config=DecodingConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                beam_size=beams))


class _HFOrtDecoder:
    """HF's ONNX decoder steps as a backend of our decoding loop (`vlm.model.generate.DecoderBackend`)."""

    def __init__(self, sessions: dict, states):
        self.sessions, self.states = sessions, states
        self.num_images, self.vocab_size, self.max_length = states.shape[0], DIMS["vocab"], DIMS["max_length"]
        self.device = torch.device("cpu")
        self.cache: list | None = None
        self.inputs = {i.name for i in sessions["next"].get_inputs()}

    def start(self, rows: int, length: int, maps: bool) -> None:
        import numpy as np

        self.rows_states = np.repeat(self.states, rows // self.num_images, axis=0)  # HF expands per beam
        self.cache = None

    @property
    def cached(self) -> int:
        return 0 if self.cache is None else self.cache[0].shape[3]

    def step(self, ids, positions, self_mask):
        if self.cache is None:
            logits, *self.cache = self.sessions["first"].run(None, {"ids": ids.numpy(), "states": self.rows_states})
        else:
            feed = {"ids": ids.numpy(), "states": self.rows_states, "pk": self.cache[0], "pv": self.cache[1],
                    "ck": self.cache[2], "cv": self.cache[3]}
            logits, k, v = self.sessions["next"].run(None, {n: x for n, x in feed.items() if n in self.inputs})
            self.cache[:2] = k, v
        return torch.from_numpy(logits), None

    def reorder(self, parent) -> None:
        index = parent.numpy()
        self.cache = [c[:, index] for c in self.cache]


def _patch_vocab(folder: Path, vocab: int) -> None:
    """The benchmark's model has DIMS' vocabulary, not the throwaway tokenizer's: say so in config.json."""
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = vocab
    (folder / "config.json").write_text(json.dumps(config))


def matmul_peak(device: torch.device, reps: int) -> float:
    """FLOP/s of a large square matrix product: fp32 on CPU, bf16 on CUDA. On the CPU, the faster of torch's own
    product and the model's (`vlm.model.linear.linear`: oneDNN's where it may, as inference runs its layers)."""
    n, dtype = (2048, torch.float32) if device.type == "cpu" else (8192, torch.bfloat16)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    products = [lambda: a @ b]
    if device.type == "cpu":
        reordered = ReorderedWeight()

        @torch.no_grad()
        def onednn():
            return linear(a, b, None, reordered)

        products.append(onednn)
    best = float("inf")
    for product in products:
        product()
        best = min(best, statistics.median(timed(product, device) for _ in range(max(reps, 5))))
    return 2 * n**3 / best


def onnx_matmul_peak(threads: int, reps: int, batch: int) -> float:
    """FLOP/s of ONNX Runtime's fp32 matrix product (MLAS) on ``threads`` threads: the better median of the large
    square product and of the model's largest product (its encoder MLP's first layer over the tokens of ``batch``
    images). The ONNX rows' ceilings take the higher of this and the torch peak: here MLAS runs the model's own
    shapes faster than torch runs the square one, so torch's peak alone would set those ceilings too low."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from vlm.deploy.runtime import session_options

    tokens = (DIMS["image"] // DIMS["patch"]) ** 2 + 1
    rates = []
    for m, k, n in ((2048, 2048, 2048), (batch * tokens, DIMS["width"], DIMS["mlp"])):
        weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((k, n), dtype=np.float32), "w")
        graph = helper.make_graph([helper.make_node("MatMul", ["a", "w"], ["y"])], "product",
                                  [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], [weight])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
        session = ort.InferenceSession(model, session_options(threads), providers=["CPUExecutionProvider"])
        a = np.random.default_rng(1).standard_normal((m, k), dtype=np.float32)
        seconds = alternate({"product": lambda s=session, a=a: s.run(None, {"a": a})}, max(reps, 5) * 2)["product"]
        rates.append(2 * m * k * n / seconds)
    return max(rates)


def decoder_weight_read_seconds(model: VisionLanguageModel, device: torch.device, reps: int) -> tuple[float, float]:
    """Median seconds to read every weight a decode step uses once, two ways.

    First the bound used by the ceilings: one sum over a single buffer holding all of them, the memory's own
    rate with no per-operator cost (a decode step of any batch must read each of these weights at least once, and
    no kernel reads them faster than a plain stream). Then with one-row products, each matrix in turn: what torch's
    kernels take to stream them in a decode step (ONNX Runtime's whole batch-1 step is faster). The step's weights
    are the decoder's linear layers but the cross-attention key/value projections (their outputs are computed once
    per image) and the output head.
    """
    decoder = model.decoder
    skip = {id(block.cross_attn.kv.weight) for block in decoder.blocks}
    weights = [m.weight.detach() for m in decoder.modules() if isinstance(m, torch.nn.Linear)
               and id(m.weight) not in skip] + [decoder.tok_emb.weight.detach()]
    flat = torch.cat([w.reshape(-1) for w in weights])
    rows = {w.shape[1]: torch.randn(1, w.shape[1], device=device) for w in weights}

    def stream() -> None:
        flat.sum()

    def products() -> None:
        for w in weights:
            F.linear(rows[w.shape[1]], w)

    seconds = alternate({"stream": stream, "products": products}, max(reps, 5) * 4, device)
    return seconds["stream"], seconds["products"]


def encoder_flops(side: Side, images) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad(), side.autocast():
        side.model.eval()
        side.model.encode(images)
    return counter.get_total_flops()


def generation_flops(side: Side, images, new_tokens: int, beams: int) -> int:
    with FlopCounterMode(display=False) as counter:
        side.generate(images, new_tokens, beams)
    return counter.get_total_flops()


def training_flops(side: Side, batch) -> int:
    with FlopCounterMode(display=False) as counter:
        side.model.train()
        side.loss(*batch).backward()
    side.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def memory_probe(name: str, device_name: str, batch: int, length: int) -> dict:
    """Run in a fresh process: peak training memory of one side over its memory before training."""
    import psutil

    device = torch.device(device_name)
    torch.manual_seed(0)
    model = build_ours(device) if name == "ours" else build_hf(device)
    side = Side(name, model, device, _autocast(device))
    data = make_batch(batch, length, device)
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = psutil.Process().memory_info().rss
    for _ in range(3):
        side.train_step(*data)
    sync(device)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_resident_bytes()
    result = {"peak_minus_base_mb": (peak - base) / 2**20, "base_mb": base / 2**20}
    if device.type == "cpu":
        result["tensor_peak_minus_floor_mb"] = _tensor_memory_rise(side, data) / 2**20
    return result


def _tensor_memory_rise(side: Side, data) -> float:
    """Bytes: peak minus lowest live tensor memory over 2 training steps, from torch's memory timeline.

    Unlike resident memory, this counts tensors only (activations and gradients above the parameters and
    optimiser state), independent of the C allocator: the CPU analogue of CUDA's peak allocated memory.
    """
    import tempfile

    from torch.profiler import profile

    with profile(profile_memory=True, record_shapes=True, with_stack=True) as prof:
        for _ in range(2):
            side.train_step(*data)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "timeline.json"
        prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())  # times, per-category sizes at each time
    live = [sum(at_time) for at_time in sizes]
    return max(live) - min(live)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext


def _probe(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--memory-probe", name, "--device", args.device, "--batch", str(args.batch),
           "--length", str(args.length), "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def least_generation_seconds(side: Side, images, new_tokens: int, flops: float, peak: float,
                             weight_read: float) -> float:
    """The roofline bound of one generation call: the encoder's FLOPs at the matmul peak, then per new token the
    larger of its FLOPs at the peak and one read of the decoder weights."""
    encoder = encoder_flops(side, images)
    return encoder / peak + new_tokens * max((flops - encoder) / new_tokens / peak, weight_read)


def measure_onnx(args, sides: dict, batch, cases: list, device: torch.device) -> dict:
    """The ONNX Runtime rows: ours exported (fp32, maps, int8) against HF eager and HF on ONNX Runtime, alternated."""
    import tempfile

    onnx_rows: dict[str, float] = {}
    one = batch[0][:1]
    with tempfile.TemporaryDirectory() as folder:
        onnx = OnnxSide(sides["ours"].model.eval(), Path(folder), args.threads)
        hf = sides["hf"]
        (Path(folder) / "hf").mkdir()
        hf_onnx = HFOnnxSide(hf.model.eval(), Path(folder) / "hf", args.threads)
        check = batch[0][:4]
        eager = hf.generate(check, args.new_tokens)[:, 1:].tolist()  # without the start token
        agree = hf_onnx.generate(check, args.new_tokens).tokens == eager
        print(f"HF on ONNX Runtime gives HF eager's greedy tokens: {agree}", flush=True)
        onnx_rows["hf_onnx_equals_hf_eager"] = agree
        onnx_cases = [*[(m, i, b, "fp32") for m, i, b in cases], ("greedy_b1_int8_images_per_s", one, 1, "int8")]
        for metric, images, beams, variant in onnx_cases:
            reps = onnx_reps(args, images)
            seconds = alternate({"onnx": lambda i=images, b=beams, v=variant: onnx.generate(
                i, args.new_tokens, b, variant=v), "hf": lambda i=images, b=beams: hf.generate(
                i, args.new_tokens, b), "hf_onnx": lambda i=images, b=beams: hf_onnx.generate(
                i, args.new_tokens, b)}, reps, device)
            onnx_rows[metric] = images.shape[0] / seconds["onnx"]
            onnx_rows[metric.replace("images_per_s", "vs_hf")] = seconds["hf"] / seconds["onnx"]
            onnx_rows[metric.replace("images_per_s", "vs_hf_onnx")] = seconds["hf_onnx"] / seconds["onnx"]
            onnx_rows[metric.replace("images_per_s", "hf_onnx_images_per_s")] = images.shape[0] / seconds["hf_onnx"]
            print(f"onnx {metric}: {onnx_rows[metric]:.2f} images/s, {seconds['hf'] / seconds['onnx']:.2f}x HF eager, "
                  f"{seconds['hf_onnx'] / seconds['onnx']:.2f}x HF on ONNX Runtime", flush=True)
        onnx_rows["greedy_b1_attention_overhead"] = paired_overhead(
            lambda: onnx.generate(one, args.new_tokens, 1),
            lambda: onnx.generate(one, args.new_tokens, 1, attention=True), 3 * onnx_reps(args, one), device)
    return onnx_rows


def onnx_reps(args, images) -> int:
    """Repetitions of an ONNX row: batch-1 calls take tens of milliseconds, where a machine's noise is as large as
    the differences measured, so they repeat BATCH1_REPS_FACTOR times as often (at little cost); batch-32 rows
    BATCH32_REPS_FACTOR times (three sides of a third of a second each: over 5 repetitions, their medians moved by
    up to 25% between runs on the 2-core VM)."""
    return args.reps * (BATCH1_REPS_FACTOR if images.shape[0] == 1 else BATCH32_REPS_FACTOR)


def hf_eager_beside(rows: dict, metric: str) -> float:
    """HF eager's images/s as timed beside the ONNX row ``metric`` (the ratio's own denominator, and so the
    ceiling's: HF eager's speed moves between the torch rows and the ONNX rows of one run)."""
    return rows[metric] / rows[metric.replace("images_per_s", "vs_hf")]


def report_onnx_only(args, sides: dict, rows: dict, cases: list, device: torch.device) -> None:
    """--only onnx: the ONNX rows' ratios and roofline ceilings (as the full run computes them) in the report."""
    peak = matmul_peak(device, args.reps)
    ort_peak = onnx_matmul_peak(args.threads, args.reps, args.batch)
    weight_read, _ = decoder_weight_read_seconds(sides["ours"].model, device, args.reps)
    ratios, ceilings = {}, {}
    for metric, images, beams in cases:
        flops = generation_flops(sides["ours"], images, args.new_tokens, beams)
        least = least_generation_seconds(sides["ours"], images, args.new_tokens, flops, max(peak, ort_peak),
                                         weight_read)
        for m in [metric] + (["greedy_b1_int8_images_per_s"] if metric == "greedy_b1_images_per_s" else []):
            ratios[f"onnx_{m}_vs_hf"] = rows[m.replace("images_per_s", "vs_hf")]
            ratios[f"onnx_{m}_vs_hf_onnx"] = rows[m.replace("images_per_s", "vs_hf_onnx")]
            ceilings[f"onnx_{m}_vs_hf"] = images.shape[0] / hf_eager_beside(rows, m) / least
    config = {**DIMS, "batch": args.batch, "new_tokens": args.new_tokens, "beams": args.beams, "reps": args.reps,
              "onnx_batch1_reps": args.reps * BATCH1_REPS_FACTOR,
              "onnx_batch32_reps": args.reps * BATCH32_REPS_FACTOR, "only": "onnx"}
    out = report(args.json, config, {"onnx": rows}, ratios, threads=args.threads, device=args.device,
                 machine_extra={"matmul_peak_gflop_per_s": peak / 1e9, "onnx_matmul_peak_gflop_per_s": ort_peak / 1e9,
                                "decoder_weight_read_ms": weight_read * 1e3},
                 roofline_ratio_ceilings=ceilings)
    print(f"{'ONNX Runtime rows':44} {'onnx':>10} {'hf_onnx':>10} {'onnx/hf':>8} {'ceiling':>8} {'onnx/hf_onnx':>12}")
    for metric, value in rows.items():
        if metric.endswith("images_per_s") and "hf_onnx" not in metric:
            key = f"onnx_{metric}_vs_hf"
            theirs = rows[metric.replace("images_per_s", "hf_onnx_images_per_s")]
            print(f"{'onnx ' + metric:44} {value:10.3f} {theirs:10.3f} {ratios[key]:8.2f} {ceilings[key]:8.2f} "
                  f"{ratios[key + '_onnx']:12.2f}")
        elif metric.endswith("attention_overhead"):
            print(f"{'onnx ' + metric:44} {value:+10.1%}")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (both sides)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per measurement and side")
    parser.add_argument("--batch", type=int, default=32, help="images per training and generation batch")
    parser.add_argument("--length", type=int, default=24, help="caption tokens per training sequence")
    parser.add_argument("--new-tokens", type=int, default=20, help="tokens generated per image")
    parser.add_argument("--beams", type=int, default=3, help="beam size of the beam-search measurement")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime rows")
    parser.add_argument("--only", choices=["onnx"], help="onnx: only the ONNX Runtime rows (with HF eager and HF on "
                        "ONNX Runtime timed beside them) and their ceilings")
    add_json_option(parser, "speed")
    parser.add_argument("--memory-probe", choices=["ours", "hf"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args.device, args.batch, args.length)))
        return

    device = torch.device(args.device)
    torch.manual_seed(0)
    sides = {"ours": Side("ours", build_ours(device), device, _autocast(device)),
             "hf": Side("hf", build_hf(device), device, _autocast(device))}
    batch = make_batch(args.batch, args.length, device)
    results: dict[str, dict] = {name: {} for name in sides}

    def record(metric: str, seconds: dict[str, float], images: int) -> None:
        for name, s in seconds.items():
            results[name][metric] = images / s
        print(f"{metric}: " + ", ".join(f"{n} {r[metric]:.2f}" for n, r in results.items()), flush=True)

    one = batch[0][:1]
    cases = [("greedy_b1_images_per_s", one, 1), (f"greedy_b{args.batch}_images_per_s", batch[0], 1),
             (f"beam{args.beams}_b{args.batch}_images_per_s", batch[0], args.beams)]
    if args.only != "onnx":
        train = alternate({n: (lambda s=s: s.train_step(*batch)) for n, s in sides.items()}, args.reps, device)
        record("train_images_per_s", train, args.batch)
    for metric, images, beams in cases if args.only != "onnx" else []:
        seconds = alternate({n: (lambda s=s, i=images, b=beams: s.generate(i, args.new_tokens, b))
                             for n, s in sides.items()}, args.reps, device)
        record(metric, seconds, images.shape[0])
    ours = sides["ours"]
    if not args.no_onnx and device.type == "cpu":
        results["onnx"] = measure_onnx(args, sides, batch, cases, device)
    if args.only == "onnx":
        return report_onnx_only(args, sides, results["onnx"], cases, device)
    for metric, images, beams in cases:
        results["ours"][metric.replace("images_per_s", "attention_overhead")] = paired_overhead(
            lambda i=images, b=beams: ours.generate(i, args.new_tokens, b),
            lambda i=images, b=beams: ours.generate(i, args.new_tokens, b, attention=True), 3 * args.reps, device)

    peak = matmul_peak(device, args.reps)
    for name, side in sides.items():
        flops = training_flops(side, batch)
        results[name]["train_step_gflop"] = flops / 1e9
        results[name]["train_flop_share_of_matmul_peak"] = flops / train[name] / peak
        results[name]["params_m"] = sum(p.numel() for p in side.model.parameters()) / 1e6
    weight_read, weight_products = decoder_weight_read_seconds(ours.model, device, args.reps)
    least_seconds = {"train_images_per_s": results["ours"]["train_step_gflop"] * 1e9 / peak}
    ort_peak = onnx_matmul_peak(args.threads, args.reps, args.batch) if "onnx" in results else None
    least_onnx = {}  # the ONNX rows' least times: at the higher of the two peaks
    for metric, images, beams in cases:
        flops = generation_flops(ours, images, args.new_tokens, beams)
        results["ours"][metric.replace("images_per_s", "gflop")] = flops / 1e9
        least_seconds[metric] = least_generation_seconds(ours, images, args.new_tokens, flops, peak, weight_read)
        if ort_peak:
            least_onnx[metric] = least_generation_seconds(ours, images, args.new_tokens, flops, max(peak, ort_peak),
                                                          weight_read)
    for name in sides:
        probe = _probe(name, args)
        results[name]["train_peak_memory_mb"] = probe["peak_minus_base_mb"]
        if "tensor_peak_minus_floor_mb" in probe:
            results[name]["train_peak_tensor_memory_mb"] = probe["tensor_peak_minus_floor_mb"]

    higher_better = ["train_images_per_s"] + [m for m, _, _ in cases]
    ratios = {f"{m}_vs_hf": results["ours"][m] / results["hf"][m] for m in higher_better}
    for m in ("train_peak_memory_mb", "train_peak_tensor_memory_mb"):
        if m in results["ours"]:
            ratios[m.replace("_mb", "_vs_hf")] = results["ours"][m] / results["hf"][m]
    # Roofline: the highest ratio possible if our arithmetic ran at the matmul peak, decode steps read their
    # weights at the measured rate, and nothing else cost (see the module docstring).
    images_per_call = {"train_images_per_s": args.batch, **{m: i.shape[0] for m, i, _ in cases}}
    ceilings = {f"{m}_vs_hf": images_per_call[m] / results["hf"][m] / least_seconds[m] for m in higher_better}
    for m in [m for m in results.get("onnx", {}) if m.endswith("images_per_s") and "hf_onnx" not in m]:
        # int8 is held to the fp32 greedy ceiling: its weights are read as fp32 would be (a conservative bound)
        base = "greedy_b1_images_per_s" if "int8" in m else m
        ratios[f"onnx_{m}_vs_hf"] = results["onnx"][m.replace("images_per_s", "vs_hf")]
        ratios[f"onnx_{m}_vs_hf_onnx"] = results["onnx"][m.replace("images_per_s", "vs_hf_onnx")]
        ceilings[f"onnx_{m}_vs_hf"] = images_per_call[base] / hf_eager_beside(results["onnx"], m) / least_onnx[base]
    import transformers

    machine = {"transformers": transformers.__version__, "matmul_peak_gflop_per_s": peak / 1e9,
               **({"onnx_matmul_peak_gflop_per_s": ort_peak / 1e9} if ort_peak else {}),
               "decoder_weight_read_ms": weight_read * 1e3,
               "decoder_weight_products_ms": weight_products * 1e3}
    if device.type == "cuda":
        machine["dtype"] = "bf16 autocast"
    config = {**DIMS, "batch": args.batch, "caption_length": args.length, "new_tokens": args.new_tokens,
              "beams": args.beams, "reps": args.reps, "onnx_batch1_reps": args.reps * BATCH1_REPS_FACTOR,
              "onnx_batch32_reps": args.reps * BATCH32_REPS_FACTOR,
              "dropout": 0.0, "optimizer": type(ours.optimizer).__name__,
              "optimizer_impl": "fused" if ours.optimizer.defaults.get("fused") else "foreach"}
    out = report(args.json, config, results, ratios, threads=args.threads, device=args.device, machine_extra=machine,
                 roofline_ratio_ceilings=ceilings)

    print(f"{'metric':44} {'ours':>10} {'hf':>10} {'ours/hf':>8} {'ceiling':>8}")
    memory = [m for m in ("train_peak_memory_mb", "train_peak_tensor_memory_mb") if m in results["ours"]]
    for metric in [*higher_better, *memory, "train_step_gflop", "train_flop_share_of_matmul_peak"]:
        a, b = results["ours"][metric], results["hf"][metric]
        ceiling = ceilings.get(f"{metric}_vs_hf")
        print(f"{metric:44} {a:10.3f} {b:10.3f} {a / b:8.2f} " + (f"{ceiling:8.2f}" if ceiling else ""))
    for metric, value in results["ours"].items():
        if metric.endswith("attention_overhead"):
            print(f"{'ours ' + metric:44} {value:+10.1%}")
    if "onnx" in results:
        print(f"{'ONNX Runtime rows':44} {'onnx':>10} {'hf_onnx':>10} {'onnx/hf':>8} {'ceiling':>8} "
              f"{'onnx/hf_onnx':>12}")
    for metric, value in results.get("onnx", {}).items():
        if metric.endswith("images_per_s") and "hf_onnx" not in metric:
            key = f"onnx_{metric}_vs_hf"
            theirs = results["onnx"][metric.replace("images_per_s", "hf_onnx_images_per_s")]
            print(f"{'onnx ' + metric:44} {value:10.3f} {theirs:10.3f} {ratios[key]:8.2f} {ceilings[key]:8.2f} "
                  f"{ratios[key + '_onnx']:12.2f}")
        elif metric.endswith("attention_overhead"):
            print(f"{'onnx ' + metric:44} {value:+10.1%}")
    print(f"matmul peak {peak / 1e9:.1f} GFLOP/s (ONNX Runtime's {(ort_peak or 0) / 1e9:.1f}); "
          f"decoder weights read in {weight_read * 1e3:.2f} ms (one stream), "
          f"{weight_products * 1e3:.2f} ms by torch's one-row products; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(out)


if __name__ == "__main__":
    main()
