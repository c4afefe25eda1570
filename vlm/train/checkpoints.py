"""Crash-safe checkpoint files and resuming.

Lightning writes a checkpoint through a buffer but neither syncs it to disk nor renames it into place
atomically on every filesystem; a SIGKILL or power loss could leave a truncated ``last.ckpt``. Here a
checkpoint goes to a temporary file in the same folder, is fsynced, then ``os.replace``d over the target,
so the target is always either the old or the new complete checkpoint.

A resumed run repeats the uninterrupted one exactly: the checkpoint holds the weights, optimiser, schedule and
the training loader's position (torchdata's StatefulDataLoader with `vlm.data.module.TrainOrder`, whose order
is a function of the seed and the epoch); each item's draws are seeded by (seed, epoch, index)
(`vlm.data.draws.draw_rng`), and torch's generator (dropout, SCST's sampling) by (seed, step, process) at
every step (`StepSeed`). `BatchLog` records what each step saw, to check it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from vlm.checkpoint import file_mode, state_from_checkpoint
from vlm.config import ModelConfig, model_config_from_dict
from vlm.data.batch import Batch
from vlm.errors import VLMError
from vlm.text.tokenizer import Tokenizer


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file, fsyncs it and renames it over the target."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, file_mode())  # mkstemp's file is private (0600); a checkpoint is an ordinary file
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)  # make the rename itself durable


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open a folder
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def resume_path(resume: str, out: str | os.PathLike, sharded: bool = False) -> Path:
    """The checkpoint to resume from: ``last`` means ``out/checkpoints/last.ckpt``.

    ``sharded``: this run uses ``strategy: fsdp``, whose checkpoints key the optimiser state differently, so a
    run resumes only from a checkpoint written under the same kind of strategy.
    """
    path = Path(out) / "checkpoints" / "last.ckpt" if resume == "last" else Path(resume)
    if not path.is_file():
        raise VLMError(f"--resume {resume}: no checkpoint at {path}")
    try:  # refuse a file that is not a plain checkpoint (or would run code) before any work, in one line
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise VLMError(f"{path}: cannot resume from this checkpoint ({e.__class__.__name__}: {reason[:200]})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise VLMError(f"{path}: not a vlm training checkpoint")
    if ckpt.get("sharded", False) != sharded:
        written = "fsdp" if ckpt.get("sharded", False) else "a strategy other than fsdp"
        raise VLMError(f"{path}: written under {written}; resume it with the same kind of trainer.strategy")
    return path


def resume_model(path: str | os.PathLike) -> tuple[ModelConfig, Tokenizer]:
    """The model config and tokenizer of the run a checkpoint (checked by `resume_path`) belongs to, from its
    hyper-parameters (plain dicts and the tokenizer's JSON, read with ``weights_only=True``)."""
    try:
        _, model, tokenizer = state_from_checkpoint(path)
        model_cfg = model_config_from_dict(model)
        return model_cfg, Tokenizer.from_str(tokenizer, model_cfg.special_tokens)
    except Exception as e:  # a checkpoint of another program, or of a broken run
        raise VLMError(f"{path}: cannot resume from this checkpoint: no vlm model config and tokenizer in its "
                       f"hyper_parameters ({e.__class__.__name__}: {' '.join(str(e).split())[:200]})") from None


class StepSeed(Callback):
    """Seeds torch's generator (CPU and GPUs) from (seed, global step, process rank, and the micro-batch's place in
    the step after the first) before every training batch, so random layers (dropout) and sampling draw the same
    after a resume as in the uninterrupted run, and each process of a DDP run, and each micro-batch of an
    accumulated step, draws its own."""

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # global_step counts optimizer steps: the micro-batches of one step (trainer.accumulate_grad_batches) differ
        # by their place in it, which Lightning counts from each epoch's start, as batch_idx (restored on resume).
        micro = batch_idx % trainer.accumulate_grad_batches
        entropy = (self.seed, trainer.global_step, trainer.global_rank) + ((micro,) if micro else ())
        torch.manual_seed(int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]))


class BatchLog(Callback):
    """``data.batch_log``: appends one JSON line per training step and process to a file: the step, the process
    rank, the batch's dataset indices, and fingerprints (SHA-1, 16 hex digits) of its token sequences (which
    texts were drawn) and of its pixels (flip, crop). Two runs saw the same data when their lines are equal."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Batch,
                             batch_idx: int) -> None:
        texts = hashlib.sha1()
        for ids, labels in zip(batch.ids, batch.labels, strict=True):
            texts.update(f"{tuple(ids.shape)}".encode() + ids.cpu().numpy().tobytes() + labels.cpu().numpy().tobytes())
        line = {"step": trainer.global_step, "rank": trainer.global_rank, "index": batch.index.tolist(),
                "texts": texts.hexdigest()[:16],
                "images": hashlib.sha1(batch.images.float().cpu().numpy().tobytes()).hexdigest()[:16]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:  # one write per line: lines of several processes do not interleave
            os.write(fd, (json.dumps(line) + "\n").encode())
        finally:
            os.close(fd)
