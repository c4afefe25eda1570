"""Runs for tests/test_ddp.py's training equivalence: the same 3 steps on one process and on two (gloo).

``python tests/ddp_equivalence.py OUT single`` trains on one process with global batches of 4;
``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_equivalence.py OUT distributed``
trains on two processes with batches of 2 each, three times: DDP, FSDP (`vlm.train.sharding`) and, as the
control, DDP whose gradients are never averaged. Each run writes OUT/NAME.pt: the initial and final weights,
the logged ``train/loss`` of each step, and each process's learned-token counts per step.

What differs legitimately between one process and two is removed: the arithmetic is float64; the trunk is a
ViT (LayerNorm, no BatchNorm statistics per process); dropout is 0; the texts of an item are fixed (the "val"
split's draws). Lightning shuffles training data with ``DistributedSampler(seed=0)``, and process r's batch i
is ``perm[r::2][2i:2i + 2]``, so the one-process run reads the same permutation in batches of 4 (whose union
is the same two batches). The loss is normalised over the global token counts (`CaptionModule._loss`), so the
two processes' batches of unequal token counts are trained as one.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, DistributedSampler

from vlm.config import DataConfig, DecoderConfig, EncoderConfig, ModelConfig, OptimConfig
from vlm.data.batch import IGNORE_INDEX, collate
from vlm.data.builtin import SceneDataset
from vlm.data.transforms import image_transform
from vlm.text.tokenizer import Tokenizer
from vlm.train.module import CaptionModule
from vlm.train.sharding import FSDPStrategy, unsharded

STEPS, PER_PROCESS, SIZE = 3, 2, 64


def local_gradients(state, bucket):  # no annotations: DDP checks them, and they are strings here
    """A DDP communication hook that leaves each process its own gradients (no all-reduce)."""
    future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


class UnsyncedDDP(DDPStrategy):
    """DDP with gradient averaging off: each process steps on its own batch only."""

    def configure_ddp(self) -> None:
        super().configure_ddp()
        self.model.register_comm_hook(None, local_gradients)


class Record(Callback):
    """Per step: the logged train/loss, and every process's learned tokens (caption, vqa) and grounded tokens."""

    def __init__(self):
        self.losses, self.counts = [], []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.callback_metrics["train/loss"]))
        counts = torch.tensor([*((labels != IGNORE_INDEX).sum() for labels in batch.labels),
                               sum(len(where) for where, _ in batch.grounded)])
        self.counts.append(trainer.strategy.all_gather(counts).reshape(trainer.world_size, -1).tolist())


def fit(name: str, strategy, devices: int, out: Path) -> None:
    tokenizer = Tokenizer.from_str((out / "tokenizer.json").read_text())
    L.seed_everything(0, verbose=False)
    model = ModelConfig(encoder=EncoderConfig(name="test_vit", feature_level=-1, image_size=SIZE,
                                              model_args={"depth": 2, "img_size": SIZE}),
                        decoder=DecoderConfig(width=32, depth=2, num_heads=4, dropout=0.0))
    module = CaptionModule.create(model, OptimConfig(lr=1e-3, warmup_steps=0, grounding_weight=0.5), tokenizer)
    init = {k: v.clone() for k, v in module.model.state_dict().items()}
    transform = image_transform(module.model.encoder.trunk, SIZE)
    dataset = SceneDataset("val", DataConfig(val_scenes=STEPS * 2 * PER_PROCESS, questions_per_image=2), tokenizer,
                           lambda image: transform(image).double(), SIZE)
    # Two processes get Lightning's DistributedSampler; one process reads its permutation whole.
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, seed=0) if devices == 1 else None
    loader = DataLoader(dataset, batch_size=2 * PER_PROCESS // devices, sampler=sampler,
                        collate_fn=partial(collate, pad_id=tokenizer.pad_id))
    record = Record()
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=STEPS, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[record])
    trainer.fit(module, loader)
    final = unsharded(module.model)  # under FSDP, gathered on rank 0
    if trainer.is_global_zero:
        torch.save({"init": init, "final": final.state_dict(), "losses": record.losses, "counts": record.counts},
                   out / f"{name}.pt")


if __name__ == "__main__":
    torch.set_default_dtype(torch.float64)
    out, mode = Path(sys.argv[1]), sys.argv[2]
    if mode == "single":
        fit("single", "auto", 1, out)
    else:
        fit("ddp", "ddp", 2, out)
        fit("fsdp", FSDPStrategy(), 2, out)
        fit("unsynced", UnsyncedDDP(), 2, out)
