"""The LightningModule: a thin wrapper that owns the loss, the optimiser and logging."""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from vlm.config import ModelConfig, OptimConfig, model_config_from_dict
from vlm.data.builtin import IGNORE_INDEX, TASKS, Batch
from vlm.errors import VLMError
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
        if set(self.optim_cfg.task_weights) != set(TASKS):
            raise VLMError(f"optim.task_weights must give a weight for each of {', '.join(TASKS)}, "
                           f"got {sorted(self.optim_cfg.task_weights)}")
        self.tokenizer = Tokenizer.from_str(tokenizer)
        self.model = VisionLanguageModel(self.model_cfg, len(self.tokenizer))
        self._tick: float | None = None

    @classmethod
    def create(cls, model: ModelConfig, optim: OptimConfig, tokenizer: Tokenizer) -> CaptionModule:
        return cls(asdict(model), asdict(optim), tokenizer.to_str())

    def _loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """Weighted mean of the per-task token cross-entropies, and per-task losses and token accuracies.

        Each image is encoded once. Every task's loss is its mean over that task's learned tokens, so a
        short answer is not drowned by long captions; ``optim.task_weights`` then mixes the tasks.
        """
        image_kv, grid = self.model.encode(batch.images)
        smoothing = self.optim_cfg.label_smoothing if self.training else 0.0
        weights = self.optim_cfg.task_weights
        loss, total_weight, logs = 0.0, 0.0, {}
        for task, ids, labels in zip(batch.tasks, batch.ids, batch.labels, strict=True):
            logits = self.model.decode(image_kv, grid, ids).logits  # (S, T, V)
            task_loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                        label_smoothing=smoothing)
            learned = labels != IGNORE_INDEX
            logs[f"{task}_loss"] = task_loss.detach()
            logs[f"{task}_token_acc"] = (logits.argmax(-1) == labels)[learned].float().mean()
            loss = loss + weights[task] * task_loss
            total_weight += weights[task]
        return loss / total_weight, logs

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        loss, logs = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in logs.items()})
        now = time.perf_counter()
        if self._tick is not None:
            self.log("train/images_per_s", batch.images.shape[0] / (now - self._tick), prog_bar=True)
        self._tick = now
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        loss, logs = self._loss(batch)
        size = batch.images.shape[0]
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=size)
        self.log_dict({f"val/{k}": v for k, v in logs.items()}, sync_dist=True, batch_size=size)

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
    with warnings.catch_warnings():  # torch's remarks on pickle protocols; a refusal still raises
        warnings.simplefilter("ignore")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    hp = ckpt["hyper_parameters"]
    prefix = "model."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    return state, hp["model"], hp["tokenizer"]
