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
from vlm.data.batch import IGNORE_INDEX, TASKS, Batch
from vlm.data.transforms import input_size
from vlm.errors import VLMError
from vlm.grounding.methods import patches_only
from vlm.model.vlm import VisionLanguageModel
from vlm.text.tokenizer import Tokenizer
from vlm.train.guards import skip_nonfinite
from vlm.train.sharding import broadcast_buffers, is_sharded, shard_model


class CaptionModule(L.LightningModule):
    """Trains a VisionLanguageModel on captions and question-answer pairs with token cross-entropy.

    Its hyper-parameters are plain dicts and the tokenizer's JSON, so a checkpoint carries everything
    needed to rebuild the model and still loads with ``torch.load(..., weights_only=True)``.
    """

    def __init__(self, model: dict, optim: dict, tokenizer: str, pretrained: bool = True):
        """pretrained=False: the weights come from elsewhere (a checkpoint resumed, a model to start from), so the
        encoder's pretrained trunk weights are neither downloaded nor read (`VisionLanguageModel`)."""
        super().__init__()
        self.save_hyperparameters()
        self.model_cfg = model_config_from_dict(model)
        self.optim_cfg = OptimConfig(**optim)
        if set(self.optim_cfg.task_weights) != set(TASKS):
            raise VLMError(f"optim.task_weights must give a weight for each of {', '.join(TASKS)}, "
                           f"got {sorted(self.optim_cfg.task_weights)}")
        self.tokenizer = Tokenizer.from_str(tokenizer, self.model_cfg.special_tokens)
        self.model = VisionLanguageModel(self.model_cfg, len(self.tokenizer), pretrained)
        if self.optim_cfg.compile:  # in place: parameter names, and so checkpoints, stay the same
            self.model.encoder.compile()
            self.model.decoder.compile()
        self._tick: float | None = None
        self._warned_long = False
        self.nonfinite_skipped = 0  # batches skipped for a NaN/inf loss (optim.nonfinite_skips)
        self.empty_skipped = 0  # batches skipped for having nothing to learn (`_loss` gives None)

    @classmethod
    def create(cls, model: ModelConfig, optim: OptimConfig, tokenizer: Tokenizer, pretrained: bool = True
               ) -> CaptionModule:
        return cls(asdict(model), asdict(optim), tokenizer.to_str(), pretrained)

    def configure_model(self) -> None:
        """Under ``strategy: fsdp`` (vlm.train.sharding.FSDPStrategy, which sets a device mesh), shard the model.

        On the CPU a convolutional trunk trains in the default layout, not channels-last: torch 2.14's oneDNN
        backward of a channels-last strided 1x1 convolution (a ResNet's downsampling) crashes the process (double
        free, segmentation fault) for some batch sizes, odd ones among them."""
        trainer = self._trainer  # None when loaded from a checkpoint outside a run
        if trainer is not None and trainer.strategy.root_device.type == "cpu":
            self.model.encoder.use_channels_last(False)
        if self.device_mesh is not None:
            shard_model(self.model, self.device_mesh["data_parallel"])

    def _loss(self, batch: Batch, across_processes: bool = False) -> tuple[Tensor | None, dict[str, Tensor]]:
        """Weighted mean of the per-task token cross-entropies, and per-task losses and token accuracies; None for
        a batch with nothing to learn (no learned or grounded token in any process's batch: images with regions
        but no text, texts cut off), which training skips.

        Each image is encoded once. Every task's loss is its mean over that task's learned tokens, so a
        short answer is not drowned by long captions; ``optim.task_weights`` then mixes the tasks. With
        ``optim.grounding_weight``, the mean grounding loss of the grounded tokens is added (`grid_mass_in_boxes`).

        ``across_processes`` (data-parallel training): the means are over the tokens of every process's batch
        (the counts summed over processes) and this process's part is scaled by the number of processes, so the
        gradients that DDP and FSDP average are those of the global batch's loss, as one process would take them.
        The logged losses and accuracies are this process's own means.
        """
        if batch.features:  # the encoder's maps of input images of the model's size
            image_kv, grid = self.model.encode_features(batch.images)
            height, width = input_size(self.model_cfg.encoder.image_size)
        else:
            image_kv, grid = self.model.encode(batch.images)
            height, width = batch.images.shape[-2:]
        size = (width, height)  # of the input images, in whose pixels the boxes are
        max_length = self.model_cfg.decoder.max_length
        groups = []  # (task, ids, labels, grounded [row, position], their boxes)
        for i, (task, ids, labels) in enumerate(zip(batch.tasks, batch.ids, batch.labels, strict=True)):
            if ids.shape[1] > max_length:  # longer texts are cut to what the decoder can read
                if not self._warned_long:
                    warnings.warn(f"texts longer than decoder.max_length {max_length} tokens are truncated",
                                  stacklevel=2)
                    self._warned_long = True
                ids, labels = ids[:, :max_length], labels[:, :max_length]
            where, boxes = batch.grounded[i] if batch.grounded and self.optim_cfg.grounding_weight > 0 else \
                (ids.new_empty(0, 2), ids.new_empty(0, 4, dtype=torch.float))
            kept = where[:, 1] < ids.shape[1]  # a token cut off with its text is not grounded either
            groups.append((task, ids, labels, where[kept], boxes[kept]))
        # Learned tokens of each task (TASKS order), then grounded tokens: one reduction over processes.
        counts = torch.zeros(len(TASKS) + 1, dtype=torch.long, device=batch.images.device)
        for task, _, labels, where, _ in groups:
            counts[TASKS.index(task)] += (labels != IGNORE_INDEX).sum()
            counts[-1] += len(where)
        scale = 1
        if across_processes:
            counts, scale = self.trainer.strategy.reduce(counts, reduce_op="sum"), self.trainer.world_size
        if not bool(counts.any()):  # the same on every process: the counts are summed over them
            return None, {}
        weights = self.optim_cfg.task_weights
        total_weight = sum(weights[task] for task, count in zip(TASKS, counts[:-1].tolist(), strict=True) if count)
        smoothing = self.optim_cfg.label_smoothing if self.training else 0.0
        loss, grounding, logs = 0.0, 0.0, {}  # grounding: the sum of the grounded tokens' losses
        for task, ids, labels, where, boxes in groups:
            learned = labels != IGNORE_INDEX
            if not learned.any():  # nothing left to learn in this group (its answers were cut off)
                continue
            grounded = len(where) > 0
            out = self.model.decode(image_kv, grid, ids, need_weights=grounded)
            logits = out.logits  # (S, T, V)
            if grounded:
                layers = self.model_cfg.attention_layers or range(self.model_cfg.decoder.depth)
                mass = grid_mass_in_boxes(out.cross_attentions, layers, where, boxes, grid, size,
                                          prefix=self.model.encoder.num_prefix)
                token_grounding = -mass.clamp(min=1e-6).log()
                logs["grounding_loss"], logs["grounding_mass"] = token_grounding.detach().mean(), mass.detach().mean()
                grounding = grounding + token_grounding.sum()
            task_loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                        label_smoothing=smoothing, reduction="sum")
            logs[f"{task}_loss"] = task_loss.detach() / learned.sum()
            logs[f"{task}_token_acc"] = (logits.argmax(-1) == labels)[learned].float().mean()
            loss = loss + weights[task] * task_loss * scale / counts[TASKS.index(task)]
        grounding_term = self.optim_cfg.grounding_weight * grounding * scale / counts[-1].clamp(min=1)
        return (loss / total_weight if total_weight else loss) + grounding_term, logs

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor | None:
        loss, logs = self._loss(batch, across_processes=self.trainer.world_size > 1)
        if loss is None:  # nothing to learn in this batch on any process: skipped by all of them alike
            self.empty_skipped += 1
            self.log("train/empty_batches", float(self.empty_skipped))
            return None
        if skip_nonfinite(self, loss, self.optim_cfg.nonfinite_skips):
            self.log("train/nonfinite_skipped", float(self.nonfinite_skipped))
            return None  # no backward, no optimizer step
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)  # the processes' mean: the global batch's loss
        self.log_dict({f"train/{k}": v for k, v in logs.items()})
        now = time.perf_counter()
        if self._tick is not None:
            self.log("train/images_per_s", batch.images.shape[0] / (now - self._tick), prog_bar=True)
        self._tick = now
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        loss, logs = self._loss(batch)
        if loss is None:  # no text to score the loss on
            return
        size = batch.images.shape[0]
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=size)
        self.log_dict({f"val/{k}": v for k, v in logs.items()}, sync_dist=True, batch_size=size)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["nonfinite_skipped"] = self.nonfinite_skipped
        checkpoint["sharded"] = is_sharded(self.model)  # FSDP keys the optimiser state its own way

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.nonfinite_skipped = checkpoint.get("nonfinite_skipped", 0)

    def on_validation_epoch_start(self) -> None:
        if is_sharded(self.model):  # FSDP leaves BatchNorm statistics per process; evaluate with rank 0's, as DDP
            broadcast_buffers(self.model)

    def on_validation_end(self) -> None:
        self._tick = None  # the validation pause is not training time

    def configure_optimizers(self):
        cfg = self.optim_cfg
        groups: dict[tuple[float, float], list] = {}  # (lr, weight decay) -> parameters
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            lr = cfg.encoder_lr if cfg.encoder_lr is not None and name.startswith("encoder.trunk.") else cfg.lr
            # Norm weights, biases and embeddings are not weight-decayed.
            decay = 0.0 if p.ndim < 2 or name.endswith("_emb.weight") else cfg.weight_decay
            groups.setdefault((lr, decay), []).append(p)
        # Lightning's mixed precision refuses to clip the gradients of a fused optimizer (it would unscale them).
        fused = not (self.trainer.precision.endswith("-mixed") and self.trainer.gradient_clip_val)
        optimizer = adamw(
            [{"params": ps, "lr": lr, "weight_decay": decay} for (lr, decay), ps in groups.items()],
            lr=cfg.lr, betas=(0.9, 0.98), fused=fused,
        )
        total = max(self.trainer.estimated_stepping_batches, cfg.warmup_steps + 1)

        def schedule(step: int) -> float:
            if step < cfg.warmup_steps:
                return (step + 1) / cfg.warmup_steps
            progress = min(1.0, (step - cfg.warmup_steps) / (total - cfg.warmup_steps))
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def box_coverage(boxes: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """(G, h * w): the share of each patch's area inside each box (G, 4), a `vlm.data.boxes.PixelBox` in pixels of
    the input image of ``size`` (width, height) that the grid (h, w) of patches covers. A box's part outside the
    image covers no patch."""
    (h, w), (width, height) = grid, size
    x0, y0 = boxes[:, 0] / width, boxes[:, 1] / height  # the box's corners as shares of the image's sides
    x1, y1 = x0 + boxes[:, 2] / width, y0 + boxes[:, 3] / height

    def overlap(lo: Tensor, hi: Tensor, n: int) -> Tensor:  # (G, n): share of each of n equal cells in [lo, hi]
        edges = torch.arange(n + 1, device=boxes.device, dtype=boxes.dtype) / n
        return (torch.minimum(hi[:, None], edges[1:]) - torch.maximum(lo[:, None], edges[:-1])).clamp(min=0) * n

    rows, cols = overlap(y0, y1, h), overlap(x0, x1, w)
    return (rows[:, :, None] * cols[:, None, :]).flatten(1)


def grid_mass_in_boxes(cross_attentions: list[Tensor], layers, where: Tensor, boxes: Tensor, grid: tuple[int, int],
                       size: tuple[int, int], prefix: int = 0) -> Tensor:
    """(G,) share of each grounded token's map inside its box (`vlm.data.boxes.PixelBox`, in pixels of the input
    image of ``size``, (width, height)), each patch counted by its share inside.

    The map is the one `vlm attend` draws: the cross-attention (S, H, T, N) of the position that predicts the
    token, heads and the given layers averaged; where (G, 2) holds [sequence row, position]. The grounding loss,
    -log of this share, is attention supervision in the manner of Liu et al. 2017 ("Attention Correctness in
    Neural Image Captioning").

    The benchmark's `vlm.grounding.maps.pixel_mass_in_box` measures on the map upsampled to the image's pixels
    instead; the loss stays on the grid the model attends over, where the share is exact, cheap and differentiable.
    The two agree when the box lies on patch boundaries and the map does not change across them. With ``prefix``
    tokens (an imported captioner's class token) leading the keys, each layer's map drops their columns and is
    renormalised over the patches first, as `vlm attend` does (`vlm.grounding.methods.patches_only`).
    """
    rows, positions = where.unbind(1)
    maps = torch.stack([cross_attentions[layer][rows, :, positions].mean(1) for layer in layers])  # (L, G, P + N)
    if prefix:
        maps = patches_only(maps, prefix, "raw")
    maps = maps.mean(0)  # (G, N)
    # The coverage is float32: bfloat16 maps are summed in float32, float64 ones stay float64.
    return (maps * box_coverage(boxes.to(maps.device), grid, size)).sum(-1)


def adamw(params, fused: bool = True, **kwargs) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel where it has one for the parameters' device (and ``fused``), else foreach."""
    params = list(params)
    if fused:
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except RuntimeError:  # no fused kernel for this device or dtype
            pass
    return torch.optim.AdamW(params, **kwargs)

