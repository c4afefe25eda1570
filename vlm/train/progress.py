"""Progress of `vlm train` and `vlm predict`: one Lightning progress bar for both, and Lightning's remarks that
are not the user's to act on left out of their output (`quiet_lightning`).

On a terminal, one line redrawn in place: done / total, items per second, elapsed and ETA (and the training
loss). When stdout is not a terminal (a log file, a cluster job), a plain line every ``every`` batches and one at
the end, so a piped run is never silent. Only the first process (rank 0) reports. In training the step is the
job's (the processes step together) and the rate is the first process's. In prediction the processes run apart;
with ``shared`` (a folder every process can write, the output's) each writes its count there as it goes, and the
first one reports the job's: every process's images of the job's total, their rate. Without it, or while another
process's count is not yet there, the line says how many processes it counts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import lightning as L
import torch
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

UNACTIONABLE_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # torch's, of a pytree class Lightning still uses
    "Couldn't infer the batch indices",  # predicting from an iterable dataset, whose batches have no indices
)


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip")  # an advertisement, at every Trainer


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Leave Lightning's remarks that the user cannot act on (`UNACTIONABLE_WARNINGS`, and its tips) out of a
    training or prediction run's output; its other warnings and information still show."""
    logger, tips = logging.getLogger("lightning.pytorch.utilities.rank_zero"), _NoTips()
    logger.addFilter(tips)
    try:
        with warnings.catch_warnings():
            for message in UNACTIONABLE_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        logger.removeFilter(tips)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def batch_items(batch: Any) -> int:
    """Items (images) in a batch: a `vlm.data.batch.Batch`'s images, a predict batch's items, else 1."""
    if isinstance(batch, dict) and "items" in batch:
        return len(batch["items"])
    images = getattr(batch, "images", None)
    if isinstance(images, torch.Tensor):
        return int(images.shape[0])
    return 1


class Progress(ProgressBar):
    """Items per second and ETA of training (steps) or prediction (images), as a bar or as plain lines.

    ``total``: items expected in prediction (None: unknown, no ETA; else the data module's ``total_items``, when
    the line counts them all: one process, or several with ``shared``); ``unit``: what an item is called.
    ``every``: batches between plain lines when stdout is not a terminal. ``shared``: the folder where
    prediction's processes leave their counts (removed at the end).
    """

    def __init__(self, every: int = 50, total: int | None = None, unit: str = "images", stream: TextIO | None = None,
                 shared: str | os.PathLike | None = None):
        super().__init__()
        self.every, self.total, self.unit = every, total, unit
        self.stream = stream
        self.shared = Path(shared) if shared is not None else None
        self._token = ""  # this run's, so that counts left by an earlier run are not read
        self._enabled = True
        self._start = 0.0
        self._done = 0
        self._batches = 0
        self._last_width = 0

    # ------------------------------------------------------------------ ProgressBar's interface

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def out(self) -> TextIO:
        return self.stream or sys.stdout

    @property
    def tty(self) -> bool:
        return bool(getattr(self.out, "isatty", lambda: False)())

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self._last_width and self.tty:
            self.out.write("\n")
            self._last_width = 0
        print(*args, file=self.out, **kwargs)

    def _active(self, trainer: L.Trainer) -> bool:
        return self._enabled and trainer.is_global_zero

    def _begin(self) -> None:
        self._start, self._done, self._batches = time.monotonic(), 0, 0

    # ------------------------------------------------------------------ prediction: images

    def _sharing(self, trainer: L.Trainer) -> bool:
        return self.shared is not None and trainer.world_size > 1

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._begin()
        if self._sharing(trainer):
            self._token = trainer.strategy.broadcast(f"{time.time_ns()}-{os.getpid()}", src=0)
            self.shared.mkdir(parents=True, exist_ok=True)
            self._write_count(trainer)
        if self.total is None and (trainer.world_size == 1 or self._sharing(trainer)):
            self.total = getattr(trainer.datamodule, "total_items", None)  # the images pending, when known

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self._step(trainer, batch_items(batch), self.total, "predict")

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._sharing(trainer):
            trainer.strategy.barrier("vlm-progress")  # every process's last count is written
        self._finish(trainer, self.total, "predict")
        if self._sharing(trainer) and trainer.is_global_zero:  # the others wrote their last count before the barrier
            shutil.rmtree(self.shared, ignore_errors=True)

    def _write_count(self, trainer: L.Trainer) -> None:
        """This process's count, replaced atomically (a reader sees the old file or the new one)."""
        path = self.shared / f"rank-{trainer.global_rank}.json"
        part = path.with_suffix(".part")
        part.write_text(json.dumps({"token": self._token, "done": self._done}))
        os.replace(part, path)

    def _job_done(self, trainer: L.Trainer) -> tuple[int, int]:
        """Items done by every process whose count of this run is in ``shared`` (this one's own, as counted), and
        how many processes that is."""
        done, counted = self._done, 1
        for rank in range(trainer.world_size):
            if rank == trainer.global_rank:
                continue
            try:
                count = json.loads((self.shared / f"rank-{rank}.json").read_text())
            except (OSError, ValueError):  # not written yet (or not visible from here)
                continue
            if count.get("token") == self._token:
                done, counted = done + int(count["done"]), counted + 1
        return done, counted

    # ------------------------------------------------------------------ training: steps, with images per second

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._begin()
        self._steps_at_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._step(trainer, batch_items(batch), None, "train")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, None, "train")

    # ------------------------------------------------------------------ the line

    def _step(self, trainer: L.Trainer, items: int, total: int | None, stage: str) -> None:
        self._done += items
        self._batches += 1
        if stage == "predict" and self._sharing(trainer):
            self._write_count(trainer)
        if not self._active(trainer):
            return
        if self.tty:
            self._write(self.line(trainer, total, stage), redraw=True)
        elif self._batches % self.every == 0:
            self._write(self.line(trainer, total, stage), redraw=False)

    def _finish(self, trainer: L.Trainer, total: int | None, stage: str) -> None:
        if not self._active(trainer) or not (self._batches or self._sharing(trainer)):
            return
        self._write(self.line(trainer, total, stage), redraw=self.tty)
        if self.tty:
            self.out.write("\n")
            self._last_width = 0
        self.out.flush()

    def line(self, trainer: L.Trainer, total: int | None, stage: str) -> str:
        """The progress line: what is done of what, the rate, elapsed time and ETA."""
        elapsed = max(time.monotonic() - self._start, 1e-9)
        if stage == "train":
            rate = self._done / elapsed
            step, max_steps = trainer.global_step, trainer.max_steps
            steps_done = step - getattr(self, "_steps_at_start", 0)
            eta = (max_steps - step) * elapsed / steps_done if max_steps and max_steps > 0 and steps_done else math.inf
            loss = trainer.progress_bar_metrics.get("train/loss", trainer.progress_bar_metrics.get("loss"))
            done = f"step {step}/{max_steps if max_steps and max_steps > 0 else '?'}"
            extra = f" | loss {float(loss):.4f}" if loss is not None else ""
            share = f" (process 0 of {trainer.world_size})" if trainer.world_size > 1 else ""
        else:
            items, counted = self._job_done(trainer) if self._sharing(trainer) else (self._done, 1)
            rate = items / elapsed
            done = f"{items}/{total if total is not None else '?'} {self.unit}"
            eta = (total - items) / rate if total is not None and rate > 0 else math.inf
            extra = ""
            share = ("" if trainer.world_size == 1 else f" ({trainer.world_size} processes)"
                     if counted == trainer.world_size else f" ({counted} of {trainer.world_size} processes counted)")
        return (f"{stage}: {done}{share} | {rate:.1f} {self.unit}/s | elapsed {_duration(elapsed)} | "
                f"eta {_duration(max(eta, 0.0))}{extra}")

    def _write(self, text: str, redraw: bool) -> None:
        if redraw:
            pad = max(0, self._last_width - len(text))
            self.out.write("\r" + text + " " * pad)
            self._last_width = len(text)
        else:
            self.out.write(text + "\n")
        self.out.flush()
