"""`vlm predict`: the job, on Lightning's predict loop over any number of processes and nodes."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
from threadpoolctl import threadpool_limits
from torch.utils.data import DataLoader

from vlm.api import Captioner
from vlm.checkpoint import CONFIG, TOKENIZER
from vlm.config import DecodingConfig, MapConfig
from vlm.data.images import pixel_limit
from vlm.errors import VLMError
from vlm.grounding.methods import check_map_config
from vlm.model.vlm import VisionLanguageModel
from vlm.predict.inputs import Chunk, ChunkStream, collate, list_chunks, listing_digest
from vlm.predict.module import PredictModule, RunInWorker, Tasks, TorchBackend, check_decoding
from vlm.predict.outputs import OUTPUT_FORMATS, ChunkWriter, check_job, done_chunks
from vlm.text.clean import clean_text
from vlm.text.tokenizer import Tokenizer
from vlm.train.progress import Progress, quiet_lightning

TASKS = ("caption", "questions", "both")
RUNTIMES = ("torch", "onnx")


def model_id(model: VisionLanguageModel, tokenizer: Tokenizer) -> str:
    """The model's identity: a hash of its config, its tokenizer and its weights ("sha256:" + 16 hex digits)."""
    h = hashlib.sha256(json.dumps(asdict(model.cfg), sort_keys=True).encode())
    h.update(tokenizer.to_str().encode())
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()[:16]


def export_id(path: Path) -> str:
    """An ONNX export's identity: a hash of its onnx.json (which holds each graph file's SHA-256, checked when
    it loads), config.json and tokenizer.json ("sha256:" + 16 hex digits; not the torch model's id)."""
    from vlm.deploy.export import ONNX_CONFIG

    h = hashlib.sha256()
    for name in (ONNX_CONFIG, CONFIG, TOKENIZER):
        h.update(name.encode())
        h.update((path / name).read_bytes())
    return "sha256:" + h.hexdigest()[:16]


def _runtime(model: str | os.PathLike | tuple[VisionLanguageModel, Tokenizer], runtime: str,
             map_config: MapConfig | None) -> tuple[Captioner, object, str]:
    """The captioner (config, tokenizer, image transform, caption prompt), the backend that runs its model for
    `PredictModule`, and the model's identity. An ONNX export runs on one-thread sessions, as torch runs on one thread
    in each data-loader worker."""
    if runtime == "torch":
        captioner = Captioner(*model, "cpu") if isinstance(model, tuple) else Captioner.load(model, "cpu")
        if map_config is not None:  # refused now, in one line, not in the first batch
            try:
                check_map_config(captioner.model, map_config)
            except ValueError as e:
                raise VLMError(str(e)) from None
        return captioner, TorchBackend(captioner.model, captioner.tokenizer), model_id(captioner.model,
                                                                                       captioner.tokenizer)
    if isinstance(model, tuple):
        raise VLMError("--runtime onnx: give the ONNX export's directory (vlm export --format onnx)")
    from vlm.deploy.runtime import OnnxBackend

    captioner = Captioner.load(model, runtime="onnx", threads=1)
    onnx = captioner.model
    if map_config is not None:  # refused now, in one line, not in the first batch
        onnx.require_maps()
        try:
            onnx.token_maps(None, [], [], map_config)  # the runtime's own checks (method, head, layers), no image
        except ValueError as e:
            raise VLMError(str(e)) from None
    return captioner, OnnxBackend(onnx, captioner.tokenizer), export_id(onnx.path)


class PredictData(L.LightningDataModule):
    """The pending chunks (those without a finished file and manifest entry), decided by the first process and
    shared with the others, read as `ChunkStream` batches."""

    def __init__(self, out: Path, fmt: str, chunks: list[Chunk], stream: ChunkStream, writer: ChunkWriter,
                 num_workers: int | None):
        super().__init__()
        self.out, self.fmt, self.chunks, self.stream, self.writer = out, fmt, chunks, stream, writer
        self.num_workers = num_workers
        """Data-loader workers of each process (None: one per core of the process, decided in setup)."""
        self.total_items: int | None = None
        """Images every process reads together (None: unknown, shards); the progress line's total."""
        self.skipped = 0

    def setup(self, stage: str) -> None:
        if self.num_workers is None:
            self.num_workers = max(1, cores() // self.trainer.num_devices)
        done = done_chunks(self.out, self.chunks, self.fmt)
        pending = [c.index for c in self.chunks if c.index not in done]
        pending = self.trainer.strategy.broadcast(pending, src=0)  # every process acts on the first one's view
        by_index = {c.index: c for c in self.chunks}
        self.stream.chunks = [by_index[i] for i in pending]
        self.stream.rank, self.stream.world = self.trainer.global_rank, self.trainer.world_size
        self.writer.pending = {by_index[i].id for i in pending}
        self.skipped = len(self.chunks) - len(pending)
        sizes = [c.size for c in self.stream.chunks]
        self.total_items = sum(sizes) if all(s is not None for s in sizes) else None

    def transfer_batch_to_device(self, batch: dict, device: torch.device, dataloader_idx: int) -> dict:
        """Only the pixels move: Lightning's default walks every item and record of the batch (~0.1 ms an image)."""
        if batch["pixels"] is not None:
            batch["pixels"] = batch["pixels"].to(device)
        return batch

    def predict_dataloader(self) -> DataLoader:
        trainer, collate_fn = self.trainer, collate
        if self.num_workers and trainer.strategy.root_device.type == "cpu":  # the workers run the model as well
            collate_fn = RunInWorker(trainer.lightning_module, trainer.precision_plugin.forward_context)
        return DataLoader(self.stream, batch_size=None, num_workers=self.num_workers, collate_fn=collate_fn,
                          persistent_workers=False)


def predict(model: str | os.PathLike | tuple[VisionLanguageModel, Tokenizer], input: str, out: str | os.PathLike, *,
            questions: list[str] | tuple[str, ...] = (), task: str | None = None,
            decoding: DecodingConfig | None = None, maps: bool = False, map_config: MapConfig | None = None,
            top_k: int = 5, threshold: float = 0.5, batch_size: int = 16, num_workers: int | None = None,
            chunk_size: int = 1000, input_format: str = "auto", format: str = "jsonl", max_pixels: int | None = None,
            accelerator: str = "auto", devices: int | str = "auto", num_nodes: int = 1, strategy: str = "auto",
            precision: str = "32-true", progress_every: int = 50, prompt: str | None = None,
            runtime: str = "torch") -> dict | None:
    """Caption and/or question every image of ``input`` into ``out``, resumably; the summary (on the first
    process; None on the others).

    model: an exported model directory or .ckpt, or a (model, tokenizer) pair. input: a folder, a glob, a text
    file of paths, a JSONL file or WebDataset shards (`vlm.predict.inputs`). task: caption, questions or both
    (default: caption, and the questions when there are any). decoding: as `Captioner.caption`. maps: summarise
    each token's map (made as ``map_config`` says; its ``top_k`` patches) and box each phrase (`vlm.predict.summary`).
    format: jsonl, parquet or webdataset (`vlm.predict.outputs`). prompt: text each caption continues (and begins
    with), as `Captioner.caption(prompt=)`. runtime: torch, or onnx: ``model`` is an ONNX export (`vlm export
    --format onnx`), run on ONNX Runtime on the CPU. num_workers: each process's data-loader workers (default: its
    share of the cores), which read and transform the images; on the CPU each also runs the model on the batches it
    reads, on one thread (0: the main process does all, on one thread; `vlm.predict.module`). The rest is the
    Lightning trainer's.
    A second call with the same arguments skips finished chunks and redoes the rest.

    The summary's ``profile``: this process's seconds per stage (`profile`).
    """
    started = time.monotonic()
    decoding = decoding or DecodingConfig()
    check_decoding(decoding)
    questions = [clean_text(q, f"--question {i + 1}") for i, q in enumerate(questions)]
    task = task or ("both" if questions else "caption")
    if task not in TASKS:
        raise VLMError(f"--task {task!r} is not one of {', '.join(TASKS)}")
    if task != "caption" and not questions:
        raise VLMError(f"--task {task}: give the questions with --question")
    if format not in OUTPUT_FORMATS:
        raise VLMError(f"--format {format!r} is not one of {', '.join(OUTPUT_FORMATS)}")
    if format == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise VLMError("--format parquet needs pyarrow: pip install 'vlm[parquet]'") from None
    for name, value in {"--batch_size": batch_size, "--map_top_k": top_k, "--progress_every": progress_every}.items():
        if value < 1:
            raise VLMError(f"{name} {value}: expected a positive number")
    if num_workers is not None and num_workers < 0:
        raise VLMError(f"--num_workers {num_workers}: expected 0 or more")
    if not 0.0 < threshold <= 1.0:
        raise VLMError(f"--threshold {threshold}: expected a number in (0, 1]")
    limit = pixel_limit(max_pixels)  # a bad value is an argument error, not every image's
    devices = int(devices) if isinstance(devices, str) and devices.isdigit() else devices
    if runtime not in RUNTIMES:
        raise VLMError(f"--runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
    if runtime == "onnx":
        if accelerator not in ("auto", "cpu"):
            raise VLMError(f"--accelerator {accelerator}: --runtime onnx runs on the CPU (use --accelerator cpu)")
        accelerator = "cpu"
    if prompt is not None and task == "questions":
        raise VLMError("--prompt leads a caption: --task questions writes none")
    map_config = (map_config or MapConfig()) if maps else None
    captioner, backend, identity = _runtime(model, runtime, map_config)
    if task != "caption":
        captioner.check_answers()
    caption_start = captioner.caption_prompt(prompt)
    if len(caption_start) >= captioner.model.cfg.decoder.max_length:
        raise VLMError(f"--prompt: its {len(caption_start) - 1} tokens leave no room in the model's max_length "
                       f"{captioner.model.cfg.decoder.max_length}")
    tasks = Tasks(caption=task in ("caption", "both"), questions=questions if task != "caption" else [],
                  maps=map_config, top_k=top_k, threshold=threshold)
    fmt, chunks = list_chunks(str(input), input_format, chunk_size)
    out = Path(out)
    job = {"model": identity, "input": str(input), "input_format": fmt, "listing": listing_digest(chunks),
           "chunk_size": chunk_size if fmt != "webdataset" else None, "chunks": len(chunks),
           "caption": tasks.caption, "questions": tasks.questions, "decoding": asdict(decoding),
           "maps": asdict(map_config) if map_config else None, "top_k": top_k if maps else None,
           "threshold": threshold if maps else None, "format": format, "max_pixels": limit,
           "prompt": captioner.tokenizer.decode(caption_start[1:]) if len(caption_start) > 1 else None,
           "precision": str(precision)}
    check_job(out, job)

    module = PredictModule(backend, captioner.model.cfg, captioner.tokenizer, tasks, decoding, identity, caption_start,
                           format)
    stream = ChunkStream(chunks, captioner.transform, batch_size, max_pixels, keep_raw=format == "webdataset")
    writer = ChunkWriter(out, format, chunks, job)
    data = PredictData(out, format, chunks, stream, writer, num_workers)
    progress = Progress(every=progress_every, shared=out / ".progress")
    torch_threads = torch.get_num_threads()
    try:
        # numpy's BLAS (the maps' small products) runs one thread, in the workers too (they inherit the limit): its
        # own threads, which spin after each product, took the cores from the model beside it (--maps cost 30-40%
        # more with them here, 5-9% without).
        with quiet_lightning(), threadpool_limits(limits=1, user_api="blas"), frozen_gc():
            trainer = L.Trainer(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
                                precision=precision, logger=False, enable_checkpointing=False,
                                enable_model_summary=False, inference_mode=False, use_distributed_sampler=False,
                                callbacks=[writer, progress], default_root_dir=out)
            predicting, main_cpu = time.monotonic(), time.process_time()
            trainer.predict(module, datamodule=data, return_predictions=False)
            main_cpu = time.process_time() - main_cpu
    finally:
        torch.set_num_threads(torch_threads)  # the step's one thread ends with the run, even a failed one
    if writer.summary is None:
        return None
    seconds = time.monotonic() - started
    return {**writer.summary, "chunks_skipped": data.skipped, "seconds": round(seconds, 2),
            "images_per_s": round(writer.summary["records_this_run"] / seconds, 2) if seconds > 0 else None,
            "out": str(out), "profile": profile(module, writer, data.num_workers, time.monotonic() - predicting,
                                                predicting - started, main_cpu)}


def cores() -> int:
    """The cores this process may run on (its affinity where the system says: a container's or a job's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def frozen_gc() -> Iterator[None]:
    """Python's full garbage collections skip the objects that exist on entry (the model, torch, Lightning: about
    500,000 of them), until exit.

    The records in flight (each token's patches are lists) trigger full collections, which scanned all of those
    objects each time, holding the GIL for ~0.1-0.2 s: ~1.1 s of a 10 s run of 2,000 images with --maps here, most of
    what --maps cost. The data-loader workers, forked inside, inherit the freeze. Objects frozen before (the caller's
    own ``gc.freeze()``) stay frozen.
    """
    frozen_before = gc.get_freeze_count()
    gc.freeze()
    try:
        yield
    finally:
        if not frozen_before:
            gc.unfreeze()


def profile(module: PredictModule, writer: ChunkWriter, workers: int, predicting: float, starting: float,
            main_cpu: float) -> dict:
    """Where this process's time went, in seconds: ``start`` (loading the model, listing the input) and
    ``predict`` (Lightning's predict loop) of the wall time; then the stages, each summed over the processes
    that ran it: ``decode`` and ``transform`` (reading, in the data-loader workers), ``encode``, ``generate`` (with
    raw maps: ``generate_and_maps``), ``maps`` (other methods), ``records`` (tokens, patches, phrase boxes) and
    ``json`` (each record's text for the file) (the model: in the workers on the CPU, side by side; else in the main
    process), and in the main process ``wait_for_data`` (for the next batch: read, and on the CPU predicted) and
    ``write``; ``main_cpu``: the CPU time the main process took during the loop (all of it when there are no
    workers; with workers, what the writing and Lightning's loop take from the cores the workers share);
    ``workers`` says how many data-loader workers ran."""
    stages = {**module.seconds, **writer.seconds}
    return {"start": round(starting, 3), "predict": round(predicting, 3),
            **{k: round(v, 3) for k, v in sorted(stages.items())}, "main_cpu": round(main_cpu, 3), "workers": workers}
