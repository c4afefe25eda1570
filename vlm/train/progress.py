"""Progress of `vlm train` and `vlm predict`: one Lightning progress bar for both.

On a terminal, one line redrawn in place: done / total, items per second, elapsed and ETA (and the training
loss). When stdout is not a terminal (a log file, a cluster job), a plain line every ``every`` batches and one at
the end, so a piped run is never silent. Only the first process (rank 0) reports, on its own share: its items of
its total, its rate (the line says of how many processes).
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

import lightning as L
import torch
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar


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

    ``total``: items expected in prediction (None: unknown, no ETA); ``unit``: what an item is called.
    ``every``: batches between plain lines when stdout is not a terminal.
    """

    def __init__(self, every: int = 50, total: int | None = None, unit: str = "images", stream: TextIO | None = None):
        super().__init__()
        self.every, self.total, self.unit = every, total, unit
        self.stream = stream
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

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._begin()
        if self.total is None:  # the data module may know how many images are pending
            self.total = getattr(trainer.datamodule, "local_items", None)

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self._step(trainer, batch_items(batch), self.total, "predict")

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, self.total, "predict")

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
        if not self._active(trainer):
            return
        if self.tty:
            self._write(self.line(trainer, total, stage), redraw=True)
        elif self._batches % self.every == 0:
            self._write(self.line(trainer, total, stage), redraw=False)

    def _finish(self, trainer: L.Trainer, total: int | None, stage: str) -> None:
        if not self._active(trainer) or not self._batches:
            return
        self._write(self.line(trainer, total, stage), redraw=self.tty)
        if self.tty:
            self.out.write("\n")
            self._last_width = 0
        self.out.flush()

    def line(self, trainer: L.Trainer, total: int | None, stage: str) -> str:
        """The progress line: what is done of what, the rate, elapsed time and ETA."""
        elapsed = max(time.monotonic() - self._start, 1e-9)
        rate = self._done / elapsed
        if stage == "train":
            step, max_steps = trainer.global_step, trainer.max_steps
            steps_done = step - getattr(self, "_steps_at_start", 0)
            eta = (max_steps - step) * elapsed / steps_done if max_steps and max_steps > 0 and steps_done else math.inf
            loss = trainer.progress_bar_metrics.get("train/loss", trainer.progress_bar_metrics.get("loss"))
            done = f"step {step}/{max_steps if max_steps and max_steps > 0 else '?'}"
            extra = f" | loss {float(loss):.4f}" if loss is not None else ""
        else:
            done = f"{self._done}/{total if total is not None else '?'} {self.unit}"
            eta = (total - self._done) / rate if total is not None and rate > 0 else math.inf
            extra = ""
        share = f" (process 0 of {trainer.world_size})" if trainer.world_size > 1 else ""
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
