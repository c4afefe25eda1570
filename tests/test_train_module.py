"""vlm/train/module.py: optimiser groups and schedule, the task-weighted loss, the grounding loss, bf16-mixed."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tests.conftest import caption_module, scene_data
from vlm.config import DataConfig
from vlm.data.batch import IGNORE_INDEX, collate
from vlm.data.builtin import SceneDataset
from vlm.data.transforms import image_transform
from vlm.train.module import box_coverage, grid_mass_in_boxes


def _scene_batches(tokenizer, split: str, size: int, count: int, transform) -> list:
    dataset = SceneDataset(split, DataConfig(questions_per_image=2), tokenizer, transform, 64)
    return [collate([dataset[i] for i in range(k * size, (k + 1) * size)], tokenizer.pad_id) for k in range(count)]


def test_no_weight_decay_on_norms_biases_and_embeddings(tokenizer):
    module = caption_module(tokenizer, weight_decay=0.1)
    module.trainer = L.Trainer(max_steps=100, logger=False, accelerator="cpu")
    optimizer = module.configure_optimizers()["optimizer"]
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    names = dict(module.model.named_parameters())
    assert set(decay_of) == {id(p) for p in names.values()}
    for name, p in names.items():
        no_decay = p.ndim < 2 or name in ("decoder.tok_emb.weight", "decoder.pos_emb.weight")
        assert decay_of[id(p)] == (0.0 if no_decay else 0.1), name
    assert decay_of[id(names["decoder.blocks.0.mlp.0.weight"])] == 0.1
    assert decay_of[id(names["decoder.blocks.0.ln_self.bias"])] == 0.0


def test_box_coverage_is_each_patch_share_inside_the_box():
    # (x, y, w, h) pixel boxes in an 80 x 40 input image, whose 2 x 4 patches are 20 px squares
    boxes = torch.tensor([[0.0, 0, 80, 40], [20, 20, 20, 20], [8, 4, 8, 8], [-20, -20, 40, 40]])
    cover = box_coverage(boxes, (2, 4), (80, 40)).view(4, 2, 4)
    assert torch.equal(cover[0], torch.ones(2, 4))
    assert torch.equal(cover[1], torch.tensor([[0.0, 0, 0, 0], [0, 1, 0, 0]]))  # exactly one patch
    # x in [8, 16] is 0.4 of column 0; y in [4, 12] is 0.4 of row 0
    assert torch.allclose(cover[2], torch.tensor([[0.16, 0, 0, 0], [0, 0, 0, 0]]))
    # the part outside the image covers nothing: the box covers the first patch only
    assert torch.equal(cover[3], torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]]))


def test_loss_mixes_each_tasks_mean_token_loss_by_the_task_weights(tokenizer):
    """On one process (no token counts summed over processes) each task's loss is the mean over its own tokens."""
    module = caption_module(tokenizer, grounding_weight=0.0, task_weights={"caption": 1.5, "vqa": 1.0})
    (batch,) = _scene_batches(tokenizer, "val", 4, 1, image_transform(module.model.encoder.trunk, 64))
    loss, logs = module._loss(batch)
    image_kv, grid = module.model.encode(batch.images)
    means = [F.cross_entropy(module.model.decode(image_kv, grid, ids).logits.flatten(0, 1), labels.flatten(),
                             ignore_index=IGNORE_INDEX) for ids, labels in zip(batch.ids, batch.labels, strict=True)]
    assert batch.tasks == ["caption", "vqa"] and means[0] != means[1]
    assert torch.allclose(loss, (1.5 * means[0] + means[1]) / 2.5)
    assert torch.allclose(logs["caption_loss"], means[0]) and torch.allclose(logs["vqa_loss"], means[1])


def test_grounding_loss_is_added_to_the_task_losses_with_its_weight(tokenizer):
    plain, grounded = caption_module(tokenizer, grounding_weight=0.0), caption_module(tokenizer, grounding_weight=0.5)
    (batch,) = _scene_batches(tokenizer, "val", 4, 1, image_transform(plain.model.encoder.trunk, 64))
    loss, logs = plain._loss(batch)
    total, grounded_logs = grounded._loss(batch)
    assert "grounding_loss" not in logs
    assert torch.allclose(total, loss + 0.5 * grounded_logs["grounding_loss"], atol=1e-5)
    # the map it scores is vlm attend's: cross-attention of the predicting position, layers and heads averaged
    image_kv, grid = grounded.model.encode(batch.images)
    weights = grounded.model.decode(image_kv, grid, batch.ids[0], need_weights=True).cross_attentions
    (where, boxes) = batch.grounded[0]
    row, position = where[0].tolist()
    own_map = torch.stack([w[row, :, position] for w in weights]).mean((0, 1))  # (N,)
    mass = grid_mass_in_boxes(weights, range(len(weights)), where[:1], boxes[:1], grid, (64, 64))
    assert torch.allclose(mass, (own_map * box_coverage(boxes[:1], grid, (64, 64))[0]).sum())


def test_grounding_loss_teaches_maps_to_point_inside_held_out_boxes(tokenizer):
    """Trained alike but for the grounding loss, held-out maps put far more of their mass inside the boxes."""

    def held_out_mass(weight: float) -> float:
        module = caption_module(tokenizer, grounding_weight=weight, weight_decay=0.0)
        transform = image_transform(module.model.encoder.trunk, 64)
        torch.manual_seed(0)
        optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3)
        for batch in _scene_batches(tokenizer, "train", 8, 40, transform):
            loss, _ = module._loss(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        module.eval()
        masses = []
        with torch.no_grad():
            for batch in _scene_batches(tokenizer, "val", 16, 2, transform):
                image_kv, grid = module.model.encode(batch.images)
                weights = module.model.decode(image_kv, grid, batch.ids[0], need_weights=True).cross_attentions
                masses.append(grid_mass_in_boxes(weights, range(len(weights)), *batch.grounded[0], grid, (64, 64)))
        return torch.cat(masses).mean().item()

    without, grounded = held_out_mass(0.0), held_out_mass(1.0)
    assert grounded > 2 * without and grounded > 0.3, (without, grounded)


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_the_floor(tokenizer):
    module = caption_module(tokenizer, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    module.trainer = L.Trainer(max_steps=110, logger=False, accelerator="cpu")
    scheduler = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(110):
        lrs.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    assert lrs[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # half way: 0.55
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


class ProductDtypes(TorchDispatchMode):
    """The floating-point input dtypes of every matrix product and convolution dispatched while active."""

    PRODUCTS = {"mm", "addmm", "bmm", "baddbmm", "convolution", "convolution_backward",
                "_scaled_dot_product_flash_attention_for_cpu"}

    def __init__(self):
        super().__init__()
        self.dtypes: dict[str, set[torch.dtype]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.PRODUCTS:
            self.dtypes.setdefault(name, set()).update(
                t.dtype for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.is_floating_point())
        return func(*args, **(kwargs or {}))


class FirstStep(Callback):
    """Records the first training step: its batch, its loss and (forward, backward, optimizer) its products."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.batch, self.products = batch, ProductDtypes()
        self.products.__enter__()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.products.__exit__(None, None, None)
        self.loss = float(outputs["loss"])


def test_bf16_mixed_runs_the_matrix_products_in_bf16_with_a_loss_close_to_float32s(tokenizer):
    module = caption_module(tokenizer)
    float32 = copy.deepcopy(module)
    step = FirstStep()
    L.Trainer(max_steps=1, accelerator="cpu", devices=1, precision="bf16-mixed", logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
              callbacks=[step]).fit(module, scene_data(module, tokenizer))
    dtypes = step.products.dtypes
    assert {"mm", "addmm", "bmm", "convolution", "convolution_backward"} <= dtypes.keys()  # forward and backward
    assert all(found == {torch.bfloat16} for found in dtypes.values()), dtypes
    with torch.no_grad():
        reference = float(float32._loss(step.batch)[0])  # the same weights and batch in float32
    assert step.loss != reference and step.loss == pytest.approx(reference, rel=1e-2)


def test_a_batch_with_nothing_to_learn_is_skipped_and_training_goes_on(tokenizer):
    """Images with regions but no caption or question give batches without a learned token: once a division by
    zero that stopped training, now a skipped batch (counted), the others trained on."""
    from torch.utils.data import DataLoader

    module = caption_module(tokenizer, warmup_steps=0)
    (batch,) = _scene_batches(tokenizer, "train", 4, 1, image_transform(module.model.encoder.trunk, 64))
    empty = collate([(image, [[], []], i) for i, image in enumerate(batch.images)], pad_id=tokenizer.pad_id)
    assert empty.tasks == [] and module._loss(empty) == (None, {})
    before = copy.deepcopy(module.model.state_dict())
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader([empty, batch, empty], batch_size=None, collate_fn=lambda b: b))
    assert module.empty_skipped == 2
    assert any(not torch.equal(before[k], v) for k, v in module.model.state_dict().items())  # the real batch trained
