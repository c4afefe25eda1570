"""The non-finite loss guard: stop with the step named, or skip the batch and count it."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from vlm.errors import VLMError

log = logging.getLogger(__name__)


class NonFiniteLossError(VLMError):
    """Training met a NaN or infinite loss and stopped."""


def skip_nonfinite(module: L.LightningModule, loss: Tensor, allowed_skips: int) -> bool:
    """True when this batch must be skipped because its loss is NaN or infinite on any process.

    Every process takes the same decision (the flag is summed over processes), so DDP never waits on a
    process that skipped. Once more than ``allowed_skips`` batches were skipped, raises NonFiniteLossError
    naming the step and the last good checkpoint; the weights were not touched by the bad batch.
    """
    bad = torch.tensor(float(not bool(torch.isfinite(loss.detach()).all())), device=loss.device)
    if module.trainer.world_size > 1:
        bad = module.trainer.strategy.reduce(bad, reduce_op="sum")
    if not bool(bad):
        return False
    step = module.trainer.global_step
    module.nonfinite_skipped += 1
    if module.nonfinite_skipped > allowed_skips:
        raise NonFiniteLossError(f"non-finite loss ({loss.item()}) at step {step}; training stopped "
                                 f"({allowed_skips} skips allowed by optim.nonfinite_skips); "
                                 f"{_last_good(module.trainer)}")
    log.warning("non-finite loss at step %d: batch skipped (%d of %d allowed)", step, module.nonfinite_skipped,
                allowed_skips)
    return True


def _last_good(trainer: L.Trainer) -> str:
    checkpoint = trainer.checkpoint_callback
    last = Path(checkpoint.dirpath) / "last.ckpt" if checkpoint is not None and checkpoint.dirpath else None
    if last is not None and last.is_file():
        return f"the last good checkpoint is {last} (resume with --resume last)"
    return "no checkpoint was written yet"
