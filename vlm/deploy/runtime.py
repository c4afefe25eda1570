"""An ONNX export (`vlm.deploy.export`) on ONNX Runtime: the encoder session, and the decoder step as a backend of
the one decoding loop (`vlm.model.generate.decode`), its fixed-capacity key/value cache held here and updated in
place with each step's new keys/values. A call over several images runs in lanes (`OnnxModel.in_lanes`): the images
split between one-thread runs side by side, encoding (`OnnxModel.encode`) and decoding (`generate`) alike.

Loading checks the directory as `vlm.checkpoint` checks an exported model: a missing or damaged file, a file
changed since the export, or a config that does not fit the graphs is one `VLMError` line naming the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vlm.checkpoint import CONFIG, TOKENIZER
from vlm.config import DecodingConfig, MapConfig, ModelConfig, model_config_from_dict
from vlm.data.transforms import input_size
from vlm.deploy.export import DECODER, ENCODER, ONNX_CONFIG, ONNX_FORMAT_VERSION, file_facts, step_input_names
from vlm.errors import VLMError
from vlm.grounding.methods import _rollout, check_map_config, chosen_layers, combine_layers, patches_only
from vlm.model.generate import Generation, decode
from vlm.text.tokenizer import Tokenizer


@dataclass
class OnnxImages:
    """Encoded images on ONNX Runtime: every layer's cross-attention keys and values (L, B, H, N, hd)."""

    keys: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return self.keys.shape[1]

    def __getitem__(self, images: slice | np.ndarray) -> OnnxImages:
        """Some of the images (a slice: views, not copies)."""
        return OnnxImages(self.keys[:, images], self.values[:, images])


def session_options(threads: int | None = None):
    """The options of an export's ONNX Runtime sessions: all graph optimizations, ``threads`` intra-op threads
    (default ONNX Runtime's: one per core), no inter-op pool, and threads that sleep rather than spin between
    runs. Every session has its own pool, so a pool left spinning after a run holds cores that the next session's
    pool (the decoder's after the encoder's) needs: on the 2-core benchmark machine, spinning pools made batch-1
    decoding about half as fast and far more variable."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


@contextmanager
def one_torch_thread():
    """This thread's torch operations on one thread while ONNX Runtime decodes: the decoding loop's small torch
    operations between steps (log-softmax, top-k over a batch's rows) would otherwise start a team of torch
    threads that keep spinning on the cores ONNX Runtime's pool is about to use."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


SMALL_STEP_ROWS = 8
"""Decoder steps of at most this many rows (one image's few beams) run on one thread: their products are too small
to share out, and a team's hand-offs cost more than they save (on 2 cores, one thread made the exported step about
20% faster at 1 to 8 rows, and steadier). Calls over several images run in lanes (`OnnxModel.in_lanes`)."""

MAX_LANES = 4
"""Lanes of one call at most, however many threads: each lane's decoding loop holds the GIL between its runs (about
an eighth of its time, measured on 2 cores), so many lanes would queue on it; with more threads than lanes, each
lane's sessions get a share of them. Lanes were measured on 2 cores only; this bound is a judgment, not a
measurement."""


class OnnxModel:
    """An ONNX export loaded on ONNX Runtime: its model config, facts (onnx.json) and the two sessions with
    ``threads`` threads (and each graph with fewer, for small steps and lanes: `session`)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        path = Path(path)
        if not path.is_dir():
            raise VLMError(f"{path}: no such ONNX export directory")
        for name in (ONNX_CONFIG, CONFIG, TOKENIZER, ENCODER, DECODER):
            if not (path / name).is_file():
                raise VLMError(f"{path}: not a vlm ONNX export (missing {name}; make one with "
                               "vlm export --format onnx)")
        self.facts = _read_json(path / ONNX_CONFIG)
        if self.facts.get("format") != "vlm-onnx" or self.facts.get("onnx_format_version") != ONNX_FORMAT_VERSION:
            raise VLMError(f"{path / ONNX_CONFIG}: onnx_format_version {self.facts.get('onnx_format_version')!r}, "
                           f"this vlm reads {ONNX_FORMAT_VERSION}; export the model again (vlm export --format onnx)")
        config = _read_json(path / CONFIG)
        try:
            self.cfg: ModelConfig = model_config_from_dict(config["model"])
            self.vocab_size = int(config["vocab_size"])
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            raise VLMError(f"{path / CONFIG}: bad 'model' section ({e.__class__.__name__}: {e})") from None
        if self.vocab_size != self.facts.get("vocab_size"):
            raise VLMError(f"{path / CONFIG}: vocab_size {self.vocab_size} does not match the exported graphs' "
                           f"{self.facts.get('vocab_size')} ({ONNX_CONFIG})")
        for name in (ENCODER, DECODER):
            if file_facts(path / name) != self.facts.get("files", {}).get(name):
                raise VLMError(f"{path / name}: differs from the file exported (size or SHA-256 in {ONNX_CONFIG}); "
                               "export again")
        self.path, self.threads = path, threads
        self.encoder, self.decoder = self._session(ENCODER, threads), self._session(DECODER, threads)
        self._sessions: dict[tuple[str, int], object] = {}  # sessions with fewer threads, made when first needed
        self.lanes = threads or os.cpu_count() or 1  # the threads a call's lanes share: a lane per thread at most
        self._lane_pool: ThreadPoolExecutor | None = None
        self.maps = bool(self.facts.get("maps"))
        missing = [k for k in ("layers", "heads", "head_dim", "grid", "data_config") if k not in self.facts]
        if missing:
            raise VLMError(f"{path / ONNX_CONFIG}: no {missing[0]!r}; export the model again")
        self.num_layers, self.num_heads = self.facts["layers"], self.facts["heads"]
        self.head_dim, self.grid = self.facts["head_dim"], tuple(self.facts["grid"])
        self.num_prefix = int(self.facts.get("num_prefix", 0))
        self.input_names = step_input_names(self.num_layers)
        self._check_config(path)

    def _check_config(self, path: Path) -> None:
        """config.json must describe the graphs: a config edited since the export (or another model's) would decode
        into wrong shapes, or fail inside ONNX Runtime with no file named."""
        logits = self.decoder.get_outputs()[0].shape
        if logits[-1] != self.vocab_size:
            raise VLMError(f"{path / DECODER}: its logits have {logits[-1]} tokens, {CONFIG} says {self.vocab_size}")
        decoder = self.cfg.decoder
        said = {"decoder.depth": decoder.depth, "decoder.num_heads": decoder.num_heads,
                "decoder.max_length": decoder.max_length,
                "encoder.image_size": list(input_size(self.cfg.encoder.image_size))}
        past = [i.shape for i in self.decoder.get_inputs() if i.name.startswith("past_key_")]
        size = self.encoder.get_inputs()[0].shape[2:]  # (H, W), or names of dynamic axes
        graphs = {"decoder.depth": len(past), "decoder.num_heads": past[0][1] if past else None,
                  "decoder.max_length": self.facts.get("max_length", decoder.max_length),  # not in older exports
                  "encoder.image_size": size if all(isinstance(n, int) for n in size) else said["encoder.image_size"]}
        for key, value in said.items():
            if graphs[key] != value:
                raise VLMError(f"{path / CONFIG}: {key} is {value}, the exported graphs' is {graphs[key]}; a config "
                               "changed since the export?")
        if self.num_layers != len(past) or (past and list(past[0][1::2]) != [self.num_heads, self.head_dim]):
            raise VLMError(f"{path / ONNX_CONFIG}: layers, heads, head_dim {self.num_layers}, {self.num_heads}, "
                           f"{self.head_dim} do not match the decoder graph's")

    def _session(self, name: str, threads: int | None):
        import onnxruntime as ort

        try:
            return ort.InferenceSession(str(self.path / name), session_options(threads),
                                        providers=["CPUExecutionProvider"])
        except Exception as e:  # not ONNX, truncated, an operator this onnxruntime lacks
            raise VLMError(f"{self.path / name}: ONNX Runtime cannot load it ({' '.join(str(e).split())[:300]})") \
                from None

    def session(self, name: str, threads: int):
        """The graph ``name`` (ENCODER or DECODER) on ``threads`` threads: the model's own session when it has as
        many, else another (made when first needed), for small steps and for lanes."""
        if threads >= self.lanes:
            return self.encoder if name == ENCODER else self.decoder
        if (name, threads) not in self._sessions:
            self._sessions[name, threads] = self._session(name, threads)
        return self._sessions[name, threads]

    def lanes_for(self, images: int) -> int:
        """Lanes of a call over ``images`` images: one per thread (at most MAX_LANES), each with whole images; 1
        runs the call as it is, with the sessions' threads."""
        return max(1, min(self.lanes, images, MAX_LANES))

    def lane_threads(self, images: int) -> int:
        """Threads of each lane's sessions in a call over ``images`` images: the model's threads shared out."""
        return max(1, self.lanes // self.lanes_for(images))

    def in_lanes(self, images: int, run: Callable[[int, int], object]) -> list:
        """``run(first, end)`` for each lane's images [first, end), in order, the lanes side by side on a pool of
        Python threads; each lane runs sessions of its share of the threads (`lane_threads`: one on 2 cores), which
        ONNX Runtime runs in parallel outside the GIL (`generate` runs them with torch on one thread). No hand-offs
        inside a run: on 2 cores, 32 images encoded in two lanes took 122 ms against 150 ms with both threads in one
        run, and captioning them (encoding and 20 greedy tokens) was 11% faster, with 3 beams 22%, than when only
        each decoder step was split into lanes (paired runs, the same tokens)."""
        lanes = self.lanes_for(images)
        if self._lane_pool is None:
            self._lane_pool = ThreadPoolExecutor(min(self.lanes, MAX_LANES), thread_name_prefix="vlm-onnx-lane")
        bounds = [images * i // lanes for i in range(lanes + 1)]
        runs = [self._lane_pool.submit(run, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
        return [r.result() for r in runs]

    @classmethod
    def load(cls, path: str | os.PathLike, threads: int | None = None) -> tuple[OnnxModel, Tokenizer]:
        """The model and its tokenizer (which must have the config's vocabulary)."""
        model = cls(path, threads)
        try:
            tokenizer = Tokenizer.from_file(str(model.path / TOKENIZER), model.cfg.special_tokens)
        except Exception as e:
            raise VLMError(f"{model.path / TOKENIZER}: not a vlm tokenizer ({e.__class__.__name__}: {e})") from None
        if len(tokenizer) != model.vocab_size:
            raise VLMError(f"{model.path}: tokenizer has {len(tokenizer)} tokens, config says {model.vocab_size}")
        return model, tokenizer

    def encode(self, pixels: Tensor) -> tuple[OnnxImages, tuple[int, int]]:
        """Images (B, 3, H, W) -> every layer's cross-attention keys/values, and the patch grid; several images in
        lanes (`in_lanes`)."""
        pixels = pixels.detach().cpu().float().numpy()
        if self.lanes_for(len(pixels)) == 1:
            keys_values, = self.encoder.run(None, {"pixels": pixels})
        else:
            session = self.session(ENCODER, self.lane_threads(len(pixels)))
            parts = self.in_lanes(len(pixels), lambda lo, hi: session.run(None, {"pixels": pixels[lo:hi]})[0])
            keys_values = np.concatenate(parts, axis=2)  # (2, L, B, H, N, hd): the images' axis
        if keys_values.shape[4] != self.grid[0] * self.grid[1] + self.num_prefix:
            raise VLMError(f"{self.path / ONNX_CONFIG}: grid {list(self.grid)} and num_prefix {self.num_prefix} do "
                           f"not match the encoder's {keys_values.shape[4]} image tokens")
        return OnnxImages(keys_values[0], keys_values[1]), self.grid  # views, not copies

    def require_maps(self) -> None:
        """A one-line error for an export made without attention outputs (no maps on it)."""
        if not self.maps:
            raise VLMError(f"{self.path}: exported without maps; export again with vlm export --maps")

    def bind(self, cache: np.ndarray, images: OnnxImages, maps: bool, self_weights: bool = False,
             threads: int | None = None) -> BoundStep:
        """The decoder step on a cache (2, L, R, H, C, hd) and images, bound once for all of a decoding's steps
        (`BoundStep`); with maps, the steps also return the cross-attention, with self_weights the self-attention.
        On the session of ``threads`` threads (a lane's), else on one thread for at most SMALL_STEP_ROWS rows and on
        all the model's above."""
        if maps:
            self.require_maps()
        if threads is None:
            threads = 1 if cache.shape[2] <= SMALL_STEP_ROWS else self.lanes
        return BoundStep(self, self.session(DECODER, threads), cache, images, maps, self_weights)

    def teacher_forced(self, images: OnnxImages, ids: np.ndarray, maps: bool = False, self_weights: bool = False
                       ) -> list[np.ndarray]:
        """The decoder step over whole sequences, one per image (ids (S, T), no padding), from an empty cache of T
        slots: the outputs of `BoundStep.run`."""
        S, T = ids.shape
        cache = np.zeros((2, self.num_layers, S, self.num_heads, T, self.head_dim), dtype=np.float32)
        positions = np.broadcast_to(np.arange(T), (S, T))
        return self.bind(cache, images, maps, self_weights).run(ids, positions, np.ones((S, T), dtype=np.int32), 0,
                                                                np.zeros((S, 1, T), dtype=np.int32))

    def attentions(self, images: OnnxImages, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher-forced: every position's cross-attention (S, T, L, H, N) and self-attention (S, T, L, H, T) of
        token ids (S, T) (one sequence per image, unpadded); N counts the encoder's prefix tokens (an imported ViT's
        class token) first."""
        _, cross, own = self.teacher_forced(images, ids.numpy(), maps=True, self_weights=True)
        return tuple(by_row(w, len(ids), self.num_layers).transpose(2, 3) for w in (cross, own))

    def token_maps(self, images: OnnxImages, prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]],
                   config: MapConfig | None = None, *, per_layer: bool = False) -> list[Tensor]:
        """Raw or rollout maps (len(target), h, w) of each target after its prompt, image i for pair i, as
        `vlm.grounding.methods.token_maps` makes them: one teacher-forced run of the decoder step per image, each
        token's map from the position that predicts it; with ``per_layer``, (L, len(target), h, w). ValueError for
        chefer, which needs autograd (the torch runtime), and for rollout through encoder context blocks, whose
        attention the export does not return."""
        config = config or MapConfig()
        check_map_config(self, config)
        if config.method == "chefer" or (config.method == "rollout" and getattr(self.cfg.encoder, "context_layers", 0)):
            raise ValueError(f"maps: the onnx runtime makes raw and rollout maps; {config.method} here needs the "
                             "torch runtime (it needs autograd, or the encoder context blocks' attention)")
        chosen = chosen_layers(self, config.layers)
        out = []
        for i, (prompt, target) in enumerate(zip(prompts, targets, strict=True)):
            ids = torch.tensor([[*prompt, *target]])
            cross, own = self.attentions(images[i:i + 1], ids)  # (1, T, L, H, N), (1, T, L, H, T)
            cross = cross.mean(3) if config.head is None else cross[:, :, :, config.head]  # (1, T, L, N)
            layers = list(cross.permute(2, 0, 1, 3).unbind(0))  # L x (1, T, N)
            if config.method == "rollout":
                layers = _rollout(list(own.permute(2, 0, 3, 1, 4).unbind(0)), layers)  # self: L x (1, H, T, T)
            parts = torch.stack(layers)[:, 0, len(prompt) - 1:len(prompt) - 1 + len(target)]  # (L, Q, N): predicting
            if self.num_prefix:  # an imported ViT's class token: dropped, rows renormalised, as token_maps does
                parts = patches_only(parts, self.num_prefix, config.method)
            made = parts if per_layer else combine_layers(parts, config.method, chosen)  # (L, Q, N) or (Q, N)
            out.append(made.reshape(*made.shape[:-1], *self.grid))
        return out


def by_row(weights: np.ndarray, rows: int, layers: int) -> Tensor:
    """Attention weights as the step graph lays them out, (B, H, L * K * t, keys) with K = rows // B rows an image
    (self-attention's: B = rows), as (rows, t, H, L, keys): a view but for beams."""
    B, H, _, keys = weights.shape
    return torch.from_numpy(weights).view(B, H, layers, rows // B, -1, keys).permute(0, 3, 4, 1, 2, 5).flatten(0, 1)


INPUT_TYPES = {"input_ids": np.int64, "positions": np.int64, "key_mask": np.int32, "filled": np.int32,
               "beam_index": np.int32}
"""The decoder step's own inputs' types (`vlm.deploy.export.step_input_names`; the rest are the cache and images)."""


class BoundStep:
    """The decoder step graph with a cache and images bound (ONNX Runtime's I/O binding): each `run` copies the
    step's own inputs into buffers of its own, and the operators write the new positions' keys/values into the cache
    in place (each layer's cache buffer is its past input and its present output at once). The logits (R, V) and
    each map output have a buffer too, copied out after each run. Every buffer is bound once, and again only when its
    shape changes (the key mask's, each step): binding anew for a run cost ONNX Runtime more than the copies (a
    batch-1 step with maps was 8% slower than without, against 0%; 32-image greedy generation 1.04x with the inputs
    bound once), and asking it for its outputs after a run (it returns every bound one, the cache's too) more still."""

    def __init__(self, model: OnnxModel, session, cache: np.ndarray, images: OnnxImages, maps: bool,
                 self_weights: bool):
        import onnxruntime as ort

        self.session, self.binding = session, session.io_binding()
        self.logits = np.empty((cache.shape[2], model.vocab_size), dtype=np.float32)
        self.map_outputs = (["cross_attentions"] if maps else []) + (["self_attentions"] if self_weights else [])
        self.logits_value = ort.OrtValue.ortvalue_from_numpy(self.logits)  # shares its memory: kept alive with it
        self.binding.bind_ortvalue_output("logits", self.logits_value)
        self.layers, self.heads, self.image_tokens = model.num_layers, model.num_heads, images.keys.shape[3]
        self.images_bound, self.map_buffers, self.inputs = len(images), {}, {}
        past = [name for name in model.input_names if name.startswith("past_")]  # keys, then values, by layer
        self.buffers = [ort.OrtValue.ortvalue_from_numpy(layer) for layer in (*cache[0], *cache[1])]  # shared memory
        for name, buffer in zip(past, self.buffers, strict=True):
            self.binding.bind_ortvalue_input(name, buffer)
            self.binding.bind_ortvalue_output(name.replace("past_", "present_"), buffer)
        self.images = [np.ascontiguousarray(x) for x in (*images.keys, *images.values)]  # kept alive while bound
        for name, array in zip([n for n in model.input_names if n.startswith("image_")], self.images, strict=True):
            self.binding.bind_cpu_input(name, array)

    def run(self, ids: np.ndarray, positions: np.ndarray, key_mask: np.ndarray, filled: int,
            beam_index: np.ndarray) -> list[np.ndarray]:
        """One step: ids and positions (R, t), key_mask (R, F + t) (1 for a real key among the F = ``filled``
        filled slots and the new positions), beam_index (B, K, C) (row k of image b reads slot j from the image's
        row beam_index[b, k, j]) -> logits (R, V), with maps the new positions' cross-attention (B, H, L * K * t,
        N) (layer, row of the image, position), with self weights their self-attention (R, H, L * t, F + t) (layer,
        position); the new keys/values written at slots F..F+t-1."""
        inputs = {"input_ids": ids, "positions": positions, "key_mask": key_mask, "filled": filled,
                  "beam_index": beam_index}
        for name, values in inputs.items():  # into buffers of the step's own, bound again only when a shape changes
            shape = np.shape(values) or (1,)  # filled: one number
            array = self.inputs.get(name)
            if array is None or array.shape != shape:
                array = self.inputs[name] = np.empty(shape, dtype=INPUT_TYPES[name])
                self.binding.bind_cpu_input(name, array)
            array[...] = values
        R, t = ids.shape
        shapes = {"cross_attentions": (self.images_bound, self.heads, self.layers * R // self.images_bound * t,
                                       self.image_tokens),
                  "self_attentions": (R, self.heads, self.layers * t, filled + t)}
        for name in self.map_outputs:  # bound again only when its shape changes
            if name not in self.map_buffers or self.map_buffers[name].shape != shapes[name]:
                self.map_buffers[name] = np.empty(shapes[name], dtype=np.float32)
                self.binding.bind_output(name, "cpu", 0, np.float32, list(shapes[name]),
                                         self.map_buffers[name].ctypes.data)
        self.session.run_with_iobinding(self.binding)
        return [self.logits.copy(), *[self.map_buffers[name].copy() for name in self.map_outputs]]  # the caller's


class OnnxBackend:
    """An ONNX export in the shape of `vlm.predict.module.TorchBackend` (encode, generate, maps), for commands
    that take a backend."""

    def __init__(self, model: OnnxModel, tokenizer: Tokenizer):
        self.model, self.tokenizer = model, tokenizer

    @property
    def num_prefix(self) -> int:
        """Prefix (class) tokens leading the image keys, which maps leave out."""
        return self.model.num_prefix

    def encode(self, pixels: Tensor) -> tuple[OnnxImages, tuple[int, int]]:
        return self.model.encode(pixels)

    def generate(self, images: OnnxImages, prompts: list[list[int]], decoding: DecodingConfig,
                 return_attention: bool = False) -> Generation:
        return generate(self.model, images, prompts, eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id,
                        config=decoding, return_attention=return_attention)

    def maps(self, images: OnnxImages, grid: tuple[int, int], prompts: list[list[int]], targets: list[list[int]],
             config: MapConfig) -> list[np.ndarray]:
        return [m.numpy() for m in self.model.token_maps(images, prompts, targets, config)]


def generate(model: OnnxModel, images: OnnxImages, prompts: list[list[int]], *, eos_id: int, pad_id: int,
             config: DecodingConfig | None = None, return_attention: bool = False) -> Generation:
    """Continue each image's prompt until the end token on ONNX Runtime, as `vlm.model.generate.generate` does with
    the torch model: the one decoding loop (`decode`) with the exported step (`OrtDecoder`), torch on one thread.

    Over several images it runs in lanes (`OnnxModel.in_lanes`): each lane's images decoded by a loop of their own
    on a session of the lane's threads. Every lane pads its prompts to the whole call's longest (the same padding
    and token budget) and seeds its images' sampling as the whole call would (`DecodingConfig.for_images`), so an
    image's tokens do not depend on the lanes; the lanes' sequences are joined in image order."""
    config = config or DecodingConfig()
    B = len(images)
    with one_torch_thread():
        if model.lanes_for(B) == 1:
            return decode(OrtDecoder(model, images), prompts, eos_id=eos_id, pad_id=pad_id, config=config,
                          return_attention=return_attention)
        if len(prompts) != B:  # as decode says it, before the lanes cut both
            raise ValueError(f"{len(prompts)} prompts for {B} images")
        longest, threads = max(len(p) for p in prompts), model.lane_threads(B)

        def lane(lo: int, hi: int) -> Generation:
            return decode(OrtDecoder(model, images[lo:hi], threads), prompts[lo:hi], eos_id=eos_id,
                          pad_id=pad_id, config=config.for_images(lo, hi - lo, B), return_attention=return_attention,
                          pad_to=longest)

        return Generation.join(model.in_lanes(B, lane))


class OrtDecoder:
    """The ONNX Runtime backend of `vlm.model.generate.decode` (a `DecoderBackend`): the exported decoder step over
    a self-attention cache of fixed capacity (prompt + new tokens), held here (keys and values of every layer,
    (2, L, R, H, C, hd)) and written in place by each step, which reads only its filled slots. Beam search reorders
    the beam index table (B, K, C), not the cache: row k of image b reads slot j from the image's row
    ``beam_index[b, k, j]``. A step with maps also returns its last position's cross-attention weights (R, H, L, N),
    so the kept sequences' maps need no further run. ``threads``: every step on a session of that many (a lane's
    decoder); None, the model's choice for the rows (`OnnxModel.bind`)."""

    def __init__(self, model: OnnxModel, images: OnnxImages, threads: int | None = None):
        self.model, self.images, self.threads = model, images, threads
        self.num_images, self.vocab_size = len(images), model.vocab_size
        self.max_length, self.device = model.cfg.decoder.max_length, torch.device("cpu")
        self.maps = False
        self.cache = np.zeros(0, dtype=np.float32)
        self.beam_index = np.zeros((0, 0, 0), dtype=np.int32)
        self.bound: BoundStep | None = None
        self.filled = 0

    def start(self, rows: int, length: int, maps: bool) -> None:
        self.maps = maps
        m = self.model
        self.cache = np.zeros((2, m.num_layers, rows, m.num_heads, length, m.head_dim), dtype=np.float32)
        self.bound = m.bind(self.cache, self.images, maps, threads=self.threads)
        K = rows // self.num_images
        self.beam_index = np.ascontiguousarray(np.broadcast_to(np.arange(K, dtype=np.int32)[None, :, None],
                                                               (self.num_images, K, length)))  # each row its own
        self.filled = 0

    @property
    def cached(self) -> int:
        return self.filled

    def step(self, ids: Tensor, positions: Tensor, self_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The loop's mask is causal over the real keys (`vlm.model.generate.decode`): the operator masks causally
        itself, so the step gives it the real keys alone, which the mask's last row shows."""
        R, t = ids.shape
        if self_mask is None:
            key_mask = np.ones((R, self.filled + t), dtype=np.int32)
        else:
            key_mask = self_mask[:, 0, -1].numpy().astype(np.int32)
        out = self.bound.run(ids.numpy(), positions.numpy(), key_mask, self.filled, self.beam_index)
        self.filled += t
        material = by_row(out[1], R, self.model.num_layers)[:, -1] if self.maps else None  # (R, H, L, N)
        return torch.from_numpy(out[0]), material

    def reorder(self, parent: Tensor) -> None:
        B, K = self.beam_index.shape[:2]
        parents = (parent.numpy() % K).reshape(B, K, 1)  # each row's parent among its image's rows
        filled = self.beam_index[:, :, :self.filled]  # a row's later slots are its own
        filled[...] = np.take_along_axis(filled, parents, axis=1)

    def keep(self, rows: Tensor) -> None:
        """Only these rows' cache and beam index, and their images, bound anew (on a session for the fewer rows)."""
        K = self.beam_index.shape[1]
        rows = rows.numpy()
        images = rows[::K] // K
        self.cache = np.ascontiguousarray(self.cache[:, :, rows])
        self.beam_index = np.ascontiguousarray(self.beam_index[images])
        self.images, self.num_images = self.images[images], len(images)
        self.bound = self.model.bind(self.cache, self.images, self.maps, threads=self.threads)

    def attention(self, material: Tensor, images: Tensor) -> Tensor:
        return material.transpose(2, 3).contiguous()  # (S, T, H, L, N) -> (S, T, L, H, N)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VLMError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise VLMError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
