"""The LightningModule: a thin wrapper that owns the loss, the optimiser and logging."""

from __future__ import annotations

import math
import time
from dataclasses import asdict

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from vlm.config import ModelConfig, OptimConfig, model_config_from_dict
from vlm.data.builtin import IGNORE_INDEX, Batch
from vlm.model.vlm import VisionLanguageModel
from vlm.text.tokenizer import Tokenizer


class CaptionModule(L.LightningModule):
    """Trains a VisionLanguageModel on captions and question-answer pairs with token cross-entropy.

    Its hyper-parameters are plain dicts and the tokenizer's JSON, so a checkpoint carries everything
    needed to rebuild the model and still loads with ``torch.load(..., weights_only=True)``.
    """

    def __init__(self, model: dict, optim: dict, tokenizer: str):
        super().__init__()
        self.save_hyperparameters()
        self.model_cfg = model_config_from_dict(model)
        self.optim_cfg = OptimConfig(**optim)
        self.tokenizer = Tokenizer.from_str(tokenizer)
        self.model = VisionLanguageModel(self.model_cfg, len(self.tokenizer))
        self._tick: float | None = None

    @classmethod
    def create(cls, model: ModelConfig, optim: OptimConfig, tokenizer: Tokenizer) -> CaptionModule:
        return cls(asdict(model), asdict(optim), tokenizer.to_str())

    def _loss(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Cross-entropy and token accuracy over all groups; each image is encoded once.

        With ``loss_average: sequence`` every sequence weighs the same: a two-token answer as much as a
        twenty-token caption. With ``token`` every learned token weighs the same.
        """
        image_kv, grid = self.model.encode(batch.images)
        smoothing = self.optim_cfg.label_smoothing if self.training else 0.0
        token_losses, learned_masks, correct = [], [], []
        for ids, labels, image_index in zip(batch.ids, batch.labels, batch.image_index, strict=True):
            logits = self.model.decode(image_kv, grid, ids, image_index).logits  # (S, T, V)
            token_losses.append(F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                                                label_smoothing=smoothing, reduction="none"))  # (S, T)
            learned_masks.append(labels != IGNORE_INDEX)
            correct.append((logits.argmax(-1) == labels)[learned_masks[-1]])
        if self.optim_cfg.loss_average == "sequence":
            per_sequence = torch.cat([(t.sum(1) / m.sum(1)) for t, m in zip(token_losses, learned_masks, strict=True)])
            loss = per_sequence.mean()
        else:
            loss = torch.cat([t[m] for t, m in zip(token_losses, learned_masks, strict=True)]).mean()
        return loss, torch.cat(correct).float().mean()

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        loss, accuracy = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/token_acc", accuracy)
        now = time.perf_counter()
        if self._tick is not None:
            self.log("train/images_per_s", batch.images.shape[0] / (now - self._tick), prog_bar=True)
        self._tick = now
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        loss, accuracy = self._loss(batch)
        size = sum(labels.shape[0] for labels in batch.labels)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=size)
        self.log("val/token_acc", accuracy, prog_bar=True, sync_dist=True, batch_size=size)

    def on_validation_end(self) -> None:
        self._tick = None  # the validation pause is not training time

    def configure_optimizers(self):
        cfg = self.optim_cfg
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            # Norm weights, biases and embeddings are not weight-decayed.
            (no_decay if p.ndim < 2 or name.endswith("_emb.weight") else decay).append(p)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(0.9, 0.98),
        )
        total = max(self.trainer.estimated_stepping_batches, cfg.warmup_steps + 1)

        def schedule(step: int) -> float:
            if step < cfg.warmup_steps:
                return (step + 1) / cfg.warmup_steps
            progress = min(1.0, (step - cfg.warmup_steps) / (total - cfg.warmup_steps))
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def state_from_checkpoint(path: str) -> tuple[dict, dict, str]:
    """(model state dict, model config dict, tokenizer JSON) from a Lightning checkpoint, safely."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    hp = ckpt["hyper_parameters"]
    prefix = "model."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    return state, hp["model"], hp["tokenizer"]
