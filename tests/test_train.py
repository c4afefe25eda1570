"""Training: optimiser groups and schedule, non-finite guard, crash-safe checkpoints, resume, SCST."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from pycocoevalcap.cider.cider import Cider

from tests.conftest import tiny_config
from vlm.api import Captioner
from vlm.config import DataConfig, OptimConfig, SCSTConfig, TrainConfig, TrainerConfig, ValConfig
from vlm.data.builtin import SceneDataModule, SceneDataset, collate
from vlm.data.scenes import make_scene
from vlm.data.transforms import image_transform
from vlm.eval.caption import caption_scores, tokenize_caption
from vlm.model.generate import generate
from vlm.train.checkpoints import AtomicCheckpointIO
from vlm.train.guards import NonFiniteLossError
from vlm.train.module import CaptionModule, box_coverage, mass_in_boxes
from vlm.train.run import train
from vlm.train.scst import CiderD, policy_loss, rollout, sequence_mask

ROOT = Path(__file__).resolve().parents[1]


def _module(tokenizer, **optim) -> CaptionModule:
    torch.manual_seed(0)
    return CaptionModule.create(tiny_config(), OptimConfig(**optim), tokenizer)


def _data(module: CaptionModule, tokenizer, **data) -> SceneDataModule:
    cfg = DataConfig(**{"train_scenes": 64, "val_scenes": 4, "batch_size": 4, "num_workers": 0,
                        "questions_per_image": 2, **data})
    return SceneDataModule(cfg, tokenizer, image_transform(module.model.encoder.trunk, 64), 64)


def _trainer(tmp_path: Path, max_steps: int, callbacks=(), every: int = 1, **kw) -> L.Trainer:
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, every_n_train_steps=every)
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                     callbacks=[checkpoints, *callbacks], plugins=[AtomicCheckpointIO()], default_root_dir=tmp_path,
                     **kw)


def test_no_weight_decay_on_norms_biases_and_embeddings(tokenizer):
    module = _module(tokenizer, weight_decay=0.1)
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
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.25, 0.5, 0.5, 1.0], [0.1, 0.1, 0.2, 0.3]])
    cover = box_coverage(boxes, (2, 4)).view(3, 2, 4)
    assert torch.equal(cover[0], torch.ones(2, 4))
    assert torch.equal(cover[1], torch.tensor([[0.0, 0, 0, 0], [0, 1, 0, 0]]))  # exactly one patch
    # x in [0.1, 0.2] is 0.4 of column 0; y in [0.1, 0.3] is 0.4 of row 0 (rows are 0.5 high)
    assert torch.allclose(cover[2], torch.tensor([[0.16, 0, 0, 0], [0, 0, 0, 0]]))


def _scene_batches(tokenizer, split: str, size: int, count: int, transform) -> list:
    dataset = SceneDataset(split, DataConfig(questions_per_image=2), tokenizer, transform, 64)
    return [collate([dataset[i] for i in range(k * size, (k + 1) * size)], tokenizer.pad_id) for k in range(count)]


def test_grounding_loss_is_added_to_the_task_losses_with_its_weight(tokenizer):
    plain, grounded = _module(tokenizer, grounding_weight=0.0), _module(tokenizer, grounding_weight=0.5)
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
    mass = mass_in_boxes(weights, range(len(weights)), where[:1], boxes[:1], grid)
    assert torch.allclose(mass, (own_map * box_coverage(boxes[:1], grid)[0]).sum())


def test_grounding_loss_teaches_maps_to_point_inside_held_out_boxes(tokenizer):
    """Trained alike but for the grounding loss, held-out maps put far more of their mass inside the boxes."""

    def held_out_mass(weight: float) -> float:
        module = _module(tokenizer, grounding_weight=weight, weight_decay=0.0)
        transform = image_transform(module.model.encoder.trunk, 64)
        torch.manual_seed(0)
        optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3)
        for batch in _scene_batches(tokenizer, "train", 8, 60, transform):
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
                masses.append(mass_in_boxes(weights, range(len(weights)), *batch.grounded[0], grid))
        return torch.cat(masses).mean().item()

    without, grounded = held_out_mass(0.0), held_out_mass(1.0)
    assert grounded > 2 * without and grounded > 0.3, (without, grounded)


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_the_floor(tokenizer):
    module = _module(tokenizer, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
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
    module = _module(tokenizer)
    trainer = _trainer(tmp_path, max_steps=6, callbacks=[_PoisonLoss({3})])
    with pytest.raises(NonFiniteLossError, match=r"at step 3;.*last good checkpoint is .*last\.ckpt"):
        trainer.fit(module, _data(module, tokenizer))
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_nonfinite_loss_is_skipped_and_counted_when_allowed(tokenizer, tmp_path):
    module = _module(tokenizer, nonfinite_skips=2)
    poison = _PoisonLoss({1, 3})
    trainer = _trainer(tmp_path, max_steps=5, callbacks=[poison], every=5)
    trainer.fit(module, _data(module, tokenizer))
    assert trainer.global_step == 5 and module.nonfinite_skipped == 2
    assert len(poison.seen) == 2
    assert all(torch.isfinite(p).all() for p in module.model.parameters())
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["nonfinite_skipped"] == 2


def test_atomic_checkpoint_write_never_leaves_a_partial_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, path)

    def crash(obj, f):  # dies half way through writing
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


class _RecordBatches(Callback):
    def __init__(self):
        self.indices: dict[int, list[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.indices[trainer.global_step] = batch.index.tolist()


def test_resume_continues_step_optimizer_schedule_and_data_position(tokenizer, tmp_path):
    def run(max_steps: int, folder: Path, ckpt: Path | None = None) -> tuple[L.Trainer, _RecordBatches]:
        L.seed_everything(0, verbose=False)
        module = _module(tokenizer, warmup_steps=2)
        record = _RecordBatches()
        trainer = _trainer(folder, max_steps=max_steps, callbacks=[record], every=3)
        trainer.fit(module, _data(module, tokenizer), ckpt_path=ckpt, weights_only=True)
        return trainer, record

    full, full_batches = run(6, tmp_path / "full")
    run(3, tmp_path / "part")
    resumed, resumed_batches = run(6, tmp_path / "part", tmp_path / "part" / "checkpoints" / "last.ckpt")
    assert resumed.global_step == full.global_step == 6
    assert sorted(resumed_batches.indices) == [3, 4, 5]
    assert all(resumed_batches.indices[s] == full_batches.indices[s] for s in (3, 4, 5))  # the same next batches
    a = full.optimizers[0].state_dict()["state"]
    b = resumed.optimizers[0].state_dict()["state"]
    assert int(a[0]["step"]) == int(b[0]["step"]) == 6
    assert full.lr_scheduler_configs[0].scheduler.last_epoch == resumed.lr_scheduler_configs[0].scheduler.last_epoch


def _vlm(log: Path, *args: str) -> subprocess.Popen:
    """`vlm ARGS` in the background, its output to a file (a full pipe would stall it)."""
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "vlm.cli", *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)


def test_run_killed_with_sigkill_resumes_to_the_same_step_count(tmp_path):
    args = ["train", "--config", str(ROOT / "configs" / "tiny.yaml"), "--out", str(tmp_path), "--val.generate",
            "false", "--trainer.max_steps", "10", "--trainer.val_check_interval", "2", "--data.val_scenes", "2"]
    last = tmp_path / "checkpoints" / "last.ckpt"
    proc = _vlm(tmp_path / "first.log", *args)
    deadline = time.monotonic() + 300
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(last, weights_only=True)["global_step"]
    assert 0 < killed_at < 10, "the run must be killed mid-training"

    proc = _vlm(tmp_path / "resumed.log", *args, "--resume", "last")
    assert proc.wait(timeout=300) == 0, (tmp_path / "resumed.log").read_text()[-2000:]
    assert (tmp_path / "resumed.log").read_text().strip().splitlines()[-1] == f"exported model: {tmp_path / 'model'}"
    final = torch.load(last, weights_only=True)
    assert final["global_step"] == 10
    # The optimiser continued from its saved state rather than starting again.
    assert all(int(s["step"]) == 10 for s in final["optimizer_states"][0]["state"].values())


def test_resume_last_without_a_checkpoint_is_one_line_error(tmp_path, capsys):
    from vlm.cli import main

    code = main(["train", "--config", str(ROOT / "configs" / "tiny.yaml"), "--out", str(tmp_path), "--resume", "last"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.strip() == f"vlm train: error: --resume last: no checkpoint at {tmp_path / 'checkpoints' / 'last.ckpt'}"


# SCST


def test_cider_d_with_the_scored_corpus_as_document_frequencies_matches_pycocoevalcap():
    scenes = [make_scene(i, "val") for i in range(12)]
    predictions = {i: s.captions[(i + 1) % 5] if i % 3 else scenes[(i + 1) % 12].captions[0]
                   for i, s in enumerate(scenes)}
    references = {i: s.captions for i, s in enumerate(scenes)}
    cider = CiderD(list(references.values()))
    ours = [cider.score(predictions[i], references[i]) for i in range(12)]
    expected = caption_scores(predictions, references)["CIDEr-D"]
    assert sum(ours) / len(ours) == pytest.approx(expected, rel=1e-9)
    gts = {i: [tokenize_caption(r) for r in refs] for i, refs in references.items()}
    _, per_item = Cider().compute_score(gts, {i: [tokenize_caption(p)] for i, p in predictions.items()})
    assert ours == pytest.approx(list(per_item), rel=1e-9)


def test_cider_d_document_frequencies_do_not_depend_on_the_batch():
    corpus = [make_scene(i, "train").captions for i in range(50)]
    cider = CiderD(corpus)
    refs = make_scene(3, "val").captions
    alone = cider.score(refs[0], refs[1:])
    assert CiderD(corpus).score(refs[0], refs[1:]) == alone > 0
    assert cider.score("a square", refs[1:]) < alone


def test_greedy_rollout_matches_generate(tiny_model, tokenizer):
    images = torch.randn(3, 3, 64, 64)
    image_kv, _ = tiny_model.encode(images)
    tokens = rollout(tiny_model, image_kv, tokenizer.caption_prompt(), 1, eos_id=tokenizer.eos_id,
                     pad_id=tokenizer.pad_id, max_new_tokens=12, greedy=True)
    gen = generate(tiny_model, images, [tokenizer.caption_prompt()] * 3, eos_id=tokenizer.eos_id,
                   pad_id=tokenizer.pad_id, max_new_tokens=12)
    mask = sequence_mask(tokens, tokenizer.eos_id)
    for row, m, expected in zip(tokens, mask, gen.tokens, strict=True):
        assert row[m].tolist() in (expected, expected + [tokenizer.eos_id])
        assert (len(expected) < 12) == (row[m][-1] == tokenizer.eos_id)  # stopped early only at the end token


def test_sampled_rollouts_are_k_per_image_and_stop_at_the_end_token(tiny_model, tokenizer):
    image_kv, _ = tiny_model.encode(torch.randn(2, 3, 64, 64))
    g = torch.Generator().manual_seed(0)
    tokens = rollout(tiny_model, image_kv, tokenizer.caption_prompt(), 4, eos_id=tokenizer.eos_id,
                     pad_id=tokenizer.pad_id, max_new_tokens=10, generator=g)
    assert tokens.shape[0] == 8 and tokens.shape[1] <= 10
    mask = sequence_mask(tokens, tokenizer.eos_id)
    assert (tokens[~mask] == tokenizer.pad_id).all()
    assert len({tuple(r.tolist()) for r in tokens}) > 1  # sampling, not greedy


def test_policy_gradient_raises_the_better_sample_and_lowers_the_worse(tiny_model, tokenizer):
    model = tiny_model.train()
    images = torch.randn(1, 3, 64, 64)
    tokens = torch.tensor([tokenizer.encode("a small red circle") + [tokenizer.eos_id],
                           tokenizer.encode("a large blue cross") + [tokenizer.eos_id]])  # (2, T), one image
    ids = torch.cat([torch.full((2, 1), tokenizer.bos_id), tokens[:, :-1]], 1)
    mask = sequence_mask(tokens, tokenizer.eos_id)

    def logp() -> torch.Tensor:
        image_kv, grid = model.encode(images)
        logits = model.decode(image_kv, grid, ids).logits
        return (logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1) * mask).sum(1)

    before = logp().detach()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    image_kv, grid = model.encode(images)
    loss = policy_loss(model.decode(image_kv, grid, ids).logits, tokens, mask, torch.tensor([1.0, -1.0]))
    loss.backward()
    optimizer.step()
    after = logp().detach()
    assert after[0] > before[0] and after[1] < before[1]


def test_scst_stage_trains_from_an_exported_model_and_changes_it(tiny_model, tokenizer, tmp_path):
    tiny = TrainConfig(model=tiny_config(), data=DataConfig(train_scenes=32, val_scenes=4, batch_size=4, num_workers=0,
                                                             questions_per_image=1),
                       trainer=TrainerConfig(max_steps=2, max_time=None, val_check_interval=2, accelerator="cpu",
                                             devices=1), val=ValConfig(generate=False))
    base = Captioner(tiny_model, tokenizer, device="cpu").save(tmp_path / "ce")
    scst = TrainConfig(**{**{k: getattr(tiny, k) for k in ("model", "data", "trainer", "val")},
                          "optim": OptimConfig(lr=1e-3, warmup_steps=0),
                          "scst": SCSTConfig(enabled=True, baseline="mean", samples=3, df_items=32)})
    exported = train(scst, tmp_path / "scst", init=str(base))
    ckpt = torch.load(tmp_path / "scst" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt["hyper_parameters"]["scst"] == asdict(scst.scst)
    from safetensors.torch import load_file

    before, after = load_file(base / "model.safetensors"), load_file(exported / "model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)


# Precision and the feature cache


def _tiny_train_config(**trainer) -> TrainConfig:
    return TrainConfig(model=tiny_config(), data=DataConfig(train_scenes=64, val_scenes=4, batch_size=8, num_workers=0,
                                                            questions_per_image=2),
                       optim=OptimConfig(lr=3e-3, warmup_steps=0),
                       trainer=TrainerConfig(**{"max_steps": 8, "max_time": None, "val_check_interval": 8,
                                                "accelerator": "cpu", "devices": 1, "log_every_n_steps": 1,
                                                **trainer}),
                       val=ValConfig(samples=1))


def test_bf16_mixed_trains_validates_and_exports_a_model_that_generates(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    exported = train(_tiny_train_config(precision="bf16-mixed"), tmp_path)
    events = EventAccumulator(str(next((tmp_path / "lightning_logs").glob("version_*")))).Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # the loss falls
    assert "val/caption/CIDEr-D" in events.Tags()["scalars"]  # validation generation ran
    model = Captioner.load(exported, device="cpu")
    scenes = [make_scene(i, "val", image_size=64) for i in range(3)]
    captions = model.caption([s.image for s in scenes])
    assert all(captions)
    ckpt = Captioner.load(str(tmp_path / "checkpoints" / "last.ckpt"), device="cpu")
    assert ckpt.caption([s.image for s in scenes]) == captions  # the export holds the trained weights


def test_validation_metrics_from_the_feature_cache_equal_those_from_images(tokenizer, tmp_path):
    from vlm.data.features import CachedFeatures
    from vlm.train.callbacks import GenerationMetrics

    torch.manual_seed(0)
    module = CaptionModule.create(tiny_config(trainable=False), OptimConfig(), tokenizer)
    data = SceneDataModule(DataConfig(train_scenes=8, val_scenes=6, batch_size=4, num_workers=0), tokenizer,
                           image_transform(module.model.encoder.trunk, 64), 64)
    results = {}
    for name, source in (("images", data), ("cache", CachedFeatures(data, module.model.encoder,
                                                                      str(tmp_path / "features.npy"), False))):
        metrics = GenerationMetrics(samples=0, max_caption_tokens=10, max_answer_tokens=3)
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[metrics])
        trainer.validate(module, source)
        results[name] = metrics.metrics, metrics._captions, metrics._answers
    (metrics_images, captions, answers), (metrics_cache, cached_captions, cached_answers) = results.values()
    assert len(captions) == 6 and len(answers) > 6
    assert cached_captions == captions and cached_answers == answers
    assert metrics_cache == pytest.approx(metrics_images, rel=1e-9)
    # Generation from the cached maps is generation from the images: the same tokens and log-probabilities.
    images = torch.stack([data.val_set[i][0] for i in range(6)])
    maps = torch.from_numpy(np.load(tmp_path / "features.val.npy"))
    prompts = [tokenizer.caption_prompt()] * 6
    kw = dict(eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, max_new_tokens=8)
    from_images = generate(module.model.eval(), images, prompts, **kw)
    from_maps = generate(module.model, maps, prompts, features=True, **kw)
    assert from_maps.tokens == from_images.tokens
    assert from_maps.scores == pytest.approx(from_images.scores, rel=1e-5)
    assert len(set(from_images.scores)) == 6  # the scores depend on the image


@pytest.mark.parametrize("written_sharded", [True, False])
def test_resuming_across_fsdp_and_other_strategies_is_one_line_error(tmp_path, written_sharded):
    """FSDP keys the optimiser state its own way: resuming it under another strategy (or back) is refused."""
    from vlm.errors import VLMError
    from vlm.train.checkpoints import resume_path

    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "sharded": written_sharded}, path)
    assert resume_path(str(path), tmp_path, sharded=written_sharded) == path
    with pytest.raises(VLMError, match=r"last\.ckpt: written under .*same kind of trainer.strategy"):
        resume_path(str(path), tmp_path, sharded=not written_sharded)


def test_scst_under_fsdp_is_one_line_error_before_any_work(tmp_path):
    from vlm.errors import VLMError

    cfg = TrainConfig(trainer=TrainerConfig(strategy="fsdp"), scst=SCSTConfig(enabled=True))
    with pytest.raises(VLMError, match="SCST does not run under sharding; use ddp"):
        train(cfg, tmp_path, init=str(tmp_path / "missing"))
    assert not any(tmp_path.iterdir())
