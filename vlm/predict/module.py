"""The model side of `vlm predict`: a backend that runs the model, and the LightningModule whose predict step
turns a batch into output records.

`TorchBackend` is the one place the torch model is called (encode, the one decoding loop
`vlm.model.generate.generate`, the one map function `vlm.grounding.methods.token_maps`); `--runtime onnx` puts
`vlm.deploy.runtime.OnnxBackend` (the same three methods on an ONNX export) in its place.

On the CPU each data-loader worker runs the model on the batches it reads, on one torch thread (`RunInWorker`), side
by side with the others in processes of their own: the decoding loop's many small operations, whose Python holds the
GIL, would queue on one interpreter's lock in threads of one process. With no workers, and on an accelerator, the
step runs the model in the main process. Either way a batch's numbers do not depend on where it ran.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from vlm.config import DecodingConfig, MapConfig, ModelConfig
from vlm.errors import VLMError
from vlm.grounding.methods import generated_raw_maps, token_maps
from vlm.model.decoder import KeysValues
from vlm.model.generate import Generation, generate
from vlm.model.vlm import VisionLanguageModel
from vlm.predict.inputs import Batch, Item, collate
from vlm.predict.outputs import record_text
from vlm.predict.summary import phrase_boxes, top_patches
from vlm.text.tokenizer import Tokenizer

SCHEMA_VERSION = 1
"""The version of the output records' layout (README, "Predicting over a collection")."""


class TorchBackend(nn.Module):
    """The PyTorch model: images -> keys/values, prompts -> generated tokens, texts -> token maps. A module, so
    the model moves with the `PredictModule` that holds it to each process's device."""

    def __init__(self, model: VisionLanguageModel, tokenizer: Tokenizer):
        super().__init__()
        self.model, self.tokenizer = model.eval(), tokenizer

    def encode(self, pixels: Tensor) -> tuple[list[KeysValues], tuple[int, int]]:
        return self.model.encode(pixels)

    @property
    def num_prefix(self) -> int:
        """Prefix (class) tokens leading the image keys, which maps leave out."""
        return self.model.encoder.num_prefix

    def generate(self, image_kv: list[KeysValues], prompts: list[list[int]], decoding: DecodingConfig,
                 return_attention: bool = False) -> Generation:
        return generate(self.model, image_kv, prompts, eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id,
                        config=decoding, return_attention=return_attention)

    def maps(self, image_kv: list[KeysValues], grid: tuple[int, int], prompts: list[list[int]],
             targets: list[list[int]], config: MapConfig) -> list[np.ndarray]:
        return [m.cpu().numpy() for m in token_maps(self.model, image_kv, grid, prompts, targets, config)]

@dataclass
class Tasks:
    """What to predict for each image: its caption, answers to fixed questions, or both; and the evidence."""

    caption: bool = True
    questions: list[str] = field(default_factory=list)
    maps: MapConfig | None = None
    """Summarise each token's map (None: no maps)."""
    top_k: int = 5
    """Patches kept per token map."""
    threshold: float = 0.5
    """A phrase's box encloses the region around its peak at least this fraction of it (as `vlm ground`)."""


class PredictModule(L.LightningModule):
    """Captions and answers, with each token's log-probability (and map summary), as one record per image.

    backend: `TorchBackend` or `vlm.deploy.runtime.OnnxBackend`; cfg: its model's config. caption_start: the ids
    a caption continues (`Captioner.caption_prompt`; default the start token alone): a record's caption begins
    with the prompt's text, its tokens are the generated ones."""

    def __init__(self, backend: Any, cfg: ModelConfig, tokenizer: Tokenizer, tasks: Tasks,
                 decoding: DecodingConfig, model_id: str, caption_start: list[int] | None = None,
                 output_format: str = "jsonl"):
        super().__init__()
        self.output_format = output_format
        """The output files' format, which a record's text takes (`vlm.predict.outputs.record_text`)."""
        self.backend, self.cfg = backend, cfg  # a TorchBackend is a submodule (its model moves with this module)
        self.tokenizer, self.tasks, self.decoding, self.model_id = tokenizer, tasks, decoding, model_id
        self.caption_start = caption_start or tokenizer.caption_prompt()
        limit = cfg.decoder.max_length // 2  # a question leaves room for its answer, as Captioner.ask
        self.question_prompts = [tokenizer.cut_prompt(tokenizer.question_prompt(q), limit) for q in tasks.questions]
        self.answering = replace(decoding, max_new_tokens=decoding.token_budget(answer=True))
        self.seconds: dict[str, float] = defaultdict(float)
        """Time spent per stage by this process and its data-loader workers (added up): decode, transform,
        encode, generate, maps, records, json, wait_for_data."""
        self._threads: int | None = None
        self._batch_end: float | None = None

    def on_predict_start(self) -> None:
        if self.device.type != "cpu":
            return
        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a batch in the step runs on one thread, as in a worker: the same numbers

    def on_predict_end(self) -> None:
        if self._threads is not None:
            torch.set_num_threads(self._threads)

    def on_predict_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._batch_end is not None:
            self.seconds["wait_for_data"] += time.perf_counter() - self._batch_end

    def on_predict_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_end = time.perf_counter()  # after the writer's turn: what follows is the wait for data

    def predict_step(self, batch: dict, batch_idx: int = 0) -> list[str | None]:
        """Each item's record as the output file holds it (None for an unreadable image or a placeholder): made by
        the worker that read the batch (`RunInWorker`), else here."""
        for stage, seconds in batch["seconds"].items():  # the worker's
            self.seconds[stage] += seconds
        texts = batch.pop("texts", None)
        return texts if texts is not None else self.record_texts(batch, self.seconds)

    def record_texts(self, batch: dict, seconds: dict[str, float]) -> list[str | None]:
        """`predict_batch`'s records as the output file holds them (`vlm.predict.outputs.record_text`), adding
        the time of that to ``seconds["json"]``."""
        records = self.predict_batch(batch, seconds)
        started = time.perf_counter()
        texts = [None if record is None else record_text(record, item, self.output_format)
                 for record, item in zip(records, batch["items"], strict=True)]
        seconds["json"] = seconds.get("json", 0.0) + time.perf_counter() - started
        return texts

    def predict_batch(self, batch: dict, seconds: dict[str, float]) -> list[dict | None]:
        """The records of a collated batch (`collate`), adding each stage's time to ``seconds``."""
        def timed(stage: str, started: float) -> float:
            now = time.perf_counter()
            seconds[stage] = seconds.get(stage, 0.0) + now - started
            return now

        items: list[Item] = batch["items"]
        good = [item for item in items if item.error is None and not item.empty]
        records = {id(item): self._record(item) for item in good}
        if good:
            started = time.perf_counter()
            image_kv, grid = self.backend.encode(batch["pixels"])
            timed("encode", started)
            seeds = self._seeds(good)
            if self.tasks.caption:
                texts = self._texts(image_kv, grid, [self.caption_start] * len(good),
                                    replace(self.decoding, seed=seeds), timed, lead=self.caption_start[1:])
                started = time.perf_counter()
                for item, (text, tokens, maps) in zip(good, texts, strict=True):
                    record = records[id(item)]
                    record["caption"], record["caption_tokens"] = text, tokens
                    if maps is not None:
                        record["grid"] = list(grid)
                        ids = [t["id"] for t in tokens]
                        record["phrases"] = phrase_boxes(maps, self.tokenizer.tokens(ids), item.size, item.phrases,
                                                         self.tasks.threshold)
                timed("records", started)
            for question, prompt in zip(self.tasks.questions, self.question_prompts, strict=True):
                texts = self._texts(image_kv, grid, [prompt] * len(good), replace(self.answering, seed=seeds), timed)
                for item, (text, tokens, maps) in zip(good, texts, strict=True):
                    record = records[id(item)]
                    record.setdefault("answers", []).append({"question": question, "answer": text, "tokens": tokens})
                    if maps is not None:
                        record["grid"] = list(grid)
        return [records.get(id(item)) for item in items]

    def _record(self, item: Item) -> dict:
        record: dict[str, Any] = {"schema": SCHEMA_VERSION, **item.meta, "image_size": list(item.size),
                                  "model": self.model_id}
        return record

    def _seeds(self, items: list[Item]) -> list[int] | None:
        """Each image's sampling seed: seed + its listing index (or shard position), whatever the batch."""
        if not self.decoding.sample or self.decoding.seed is None:
            return None
        return [int(self.decoding.seed) + item.seed for item in items]

    def _texts(self, image_kv: list[KeysValues], grid: tuple[int, int], prompts: list[list[int]],
               decoding: DecodingConfig, timed: Callable[[str, float], float], lead: list[int] = ()
               ) -> list[tuple[str, list[dict], np.ndarray | None]]:
        """Each image's text (after the ``lead`` ids' text), its generated tokens ({token, id, logprob[,
        patches]}) and, with maps, their token maps; ``timed(stage, started)`` counts each stage's time."""
        started = time.perf_counter()
        config = self.tasks.maps
        one_pass = config is not None and config.method == "raw"  # raw maps: the weights decoding computes anyway
        gen = self.backend.generate(image_kv, prompts, decoding, return_attention=one_pass)
        if one_pass:
            maps = [m.cpu().numpy() for m in generated_raw_maps(self.backend.model, gen.attentions, grid, config,
                                                                prefix=self.backend.num_prefix)]
            started = timed("generate_and_maps", started)
        else:
            started = timed("generate", started)
            maps = ([None] * len(prompts) if config is None
                    else self.backend.maps(image_kv, grid, prompts, gen.tokens, config))
            if config is not None:
                started = timed("maps", started)
        patches = iter(top_patches(np.concatenate(maps), self.tasks.top_k) if config is not None else ())
        out = []  # every token's top patches come from one call, in sequence order
        for ids, logprobs, made in zip(gen.tokens, gen.token_logprobs, maps, strict=True):
            tokens = [{"token": t, "id": i, "logprob": lp}
                      for t, i, lp in zip(self.tokenizer.tokens(ids), ids, logprobs, strict=True)]
            if made is not None:
                for token in tokens:
                    token["patches"] = next(patches)
            out.append((self.tokenizer.decode([*lead, *ids]), tokens, made))
        timed("records", started)
        return out

    def configure_optimizers(self) -> None:
        return None


class RunInWorker:
    """The data loader's collate on the CPU: the worker that read a batch makes its records too, as the output file
    holds them (`PredictModule.record_texts`), on its one torch thread (PyTorch's DataLoader sets one in each
    worker), under the trainer's precision (``forward_context``: autocast for a mixed precision). The pixels stay in
    the worker; the records' texts, the items and the stages' seconds go to the main process, which only writes."""

    def __init__(self, module: PredictModule, forward_context: Callable[[], AbstractContextManager]):
        self.module, self.forward_context = module, forward_context

    def __call__(self, batch: Batch) -> dict:
        collated = collate(batch)
        with torch.no_grad(), self.forward_context():
            collated["texts"] = self.module.record_texts(collated, collated["seconds"])
        collated["pixels"] = None
        return collated


def check_decoding(decoding: DecodingConfig) -> None:
    """What prediction refuses: several samples per image (one record holds one caption) or a seed list."""
    if decoding.num_samples > 1:
        raise VLMError(f"--num_samples {decoding.num_samples}: vlm predict writes one caption per image")
    if isinstance(decoding.seed, list):
        raise VLMError("--seed: give one number (image i of the input samples with seed + i)")
