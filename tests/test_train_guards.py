"""vlm/train/guards.py: a non-finite loss stops training or, when allowed, is skipped and counted."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from tests.conftest import caption_module, scene_data
from vlm.train.checkpoints import AtomicCheckpointIO
from vlm.train.guards import NonFiniteLossError


def _trainer(tmp_path: Path, max_steps: int, callbacks=(), every: int = 1, **kw) -> L.Trainer:
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, every_n_train_steps=every)
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                     callbacks=[checkpoints, *callbacks], plugins=[AtomicCheckpointIO()], default_root_dir=tmp_path,
                     **kw)


class _PoisonLoss(Callback):
    """Makes the loss NaN at the given global steps by poisoning the batch's images."""

    def __init__(self, steps: set[int]):
        self.steps = steps
        self.seen: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in self.steps and trainer.global_step not in self.seen:
            self.seen.append(trainer.global_step)
            batch.images.fill_(float("nan"))


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tokenizer, tmp_path):
    module = caption_module(tokenizer)
    trainer = _trainer(tmp_path, max_steps=6, callbacks=[_PoisonLoss({3})])
    with pytest.raises(NonFiniteLossError, match=r"at step 3;.*last good checkpoint is .*last\.ckpt"):
        trainer.fit(module, scene_data(module, tokenizer))
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_nonfinite_loss_is_skipped_and_counted_when_allowed(tokenizer, tmp_path):
    module = caption_module(tokenizer, nonfinite_skips=2)
    poison = _PoisonLoss({1, 3})
    trainer = _trainer(tmp_path, max_steps=5, callbacks=[poison], every=5)
    trainer.fit(module, scene_data(module, tokenizer))
    assert trainer.global_step == 5 and module.nonfinite_skipped == 2
    assert len(poison.seen) == 2
    assert all(torch.isfinite(p).all() for p in module.model.parameters())
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["nonfinite_skipped"] == 2
