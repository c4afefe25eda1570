"""Resuming: a resumed run ends with the weights of the uninterrupted run, bit for bit, having seen the same
samples (indices, drawn texts, pixels) at every step.

In process, resuming at an epoch's end and mid-epoch; through the CLI, `vlm train --resume last` after `kill -9`
at a random moment, on one process and on two (DDP, the whole process group killed). The resumed process must
run only the steps after its checkpoint (a run that ignored --resume would start again at step 0).

Every run appends what each step saw to a batch log (`--data.batch_log`). The data is the built-in scenes, 24 of
them in global batches of 8, so the 12 steps cross three epoch boundaries and a checkpoint (every 2 steps) falls
mid-epoch or at an epoch's end; captions and questions are drawn per item (1 of the scene's captions, 2 of its
questions) and the decoder has dropout, so every kind of randomness (order, draws, dropout) must be restored.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from tests.conftest import spoil_shard_images, tiny_config
from vlm.config import DataConfig, OptimConfig, SourceConfig
from vlm.data.datasets import mixture_weights
from vlm.data.export import write_shapes
from vlm.data.module import DataModule, TrainOrder
from vlm.data.transforms import image_transform
from vlm.train.checkpoints import AtomicCheckpointIO, BatchLog, StepSeed
from vlm.train.module import CaptionModule

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12
RUN = ("--config", str(ROOT / "configs" / "tiny.yaml"), "--val.generate", "false", "--data.train_scenes", "24",
       "--data.val_scenes", "2", "--data.captions_per_image", "1",
       "--data.questions_per_image", "2", "--model.decoder.dropout", "0.1", "--optim.warmup_steps", "2",
       "--trainer.max_steps", str(STEPS), "--trainer.val_check_interval", "2", "--trainer.log_every_n_steps", "1")
# Per process: images per batch, and data-loader workers (one process: a worker, whose position is restored too).
BATCH, WORKERS = {1: "8", 2: "4"}, {1: "1", 2: "0"}


def _epoch(order: TrainOrder, epoch: int) -> list[tuple[int, int]]:
    order.set_epoch(epoch)
    return list(order)


def test_train_order_depends_on_seed_and_epoch_alone_and_restores_its_position():
    weights = mixture_weights([30, 10], [1.0, 3.0])  # the second source's 10 samples make 3/4 of the draws
    order = TrainOrder(40, seed=5, batch_size=4, weights=weights)
    keys = _epoch(order, 3)
    assert len(keys) == 40 and {epoch for _, epoch in keys} == {3}
    assert _epoch(TrainOrder(40, 5, 4, weights), 3) == keys != _epoch(TrainOrder(40, 6, 4, weights), 3)
    assert _epoch(order, 4) != keys
    draws = [index for epoch in range(50) for index, _ in _epoch(order, epoch)]
    assert abs(sum(index >= 30 for index in draws) / len(draws) - 0.75) < 0.03
    assert sorted(i for i, _ in _epoch(TrainOrder(40, 5, 4), 0)) == list(range(40))  # uniform: a permutation

    order.set_epoch(3)
    running = iter(order)
    taken = [next(running) for _ in range(8)]
    resumed = TrainOrder(40, 5, 4, weights)
    resumed.load_state_dict(order.state_dict())
    assert taken + list(resumed) == keys  # mid-epoch: the rest of the same epoch
    taken += [next(running) for _ in range(29)]  # 3 left: less than a batch, so the epoch is over
    resumed.load_state_dict(order.state_dict())
    assert list(resumed) == _epoch(TrainOrder(40, 5, 4, weights), 4)


def test_a_run_stopped_at_max_steps_resumes_its_epoch_though_the_loop_counts_the_next():
    """A run that stopped at max_steps in mid-epoch saved its loop at the next epoch (Lightning counts the stopped
    epoch as done), and the loop sets that epoch after the sampler is restored: the restored epoch goes on from
    its position, and the loop's later epochs follow it, as in the uninterrupted run."""
    full = TrainOrder(40, seed=5, batch_size=4)
    epochs = [_epoch(full, epoch) for epoch in (0, 1)]
    stopped = TrainOrder(40, 5, 4)
    stopped.set_epoch(0)
    running = iter(stopped)
    taken = [next(running) for _ in range(8)]  # 2 steps of epoch 0
    resumed = TrainOrder(40, 5, 4)
    resumed.load_state_dict(stopped.state_dict())
    resumed.set_epoch(1)  # the loop's epoch after a stop at max_steps
    assert taken + list(resumed) == epochs[0] != epochs[1]
    assert _epoch(resumed, 2) == epochs[1]  # the loop's next epoch is the sampler's epoch 1
    assert resumed.state_dict()["epoch"] == 1
    # Saved after epoch 0's last batch (a validation there): the loop sets epoch 0 again, then 1, with no batch
    # between (seen in a resumed run); the sampler follows it into epoch 1, from its start.
    ended = TrainOrder(40, 5, 4)
    ended.load_state_dict({"epoch": 0, "yielded": 40})
    ended.set_epoch(0)
    assert _epoch(ended, 1) == epochs[1]


class _Crash(Exception):
    pass


class _CrashAt(Callback):
    """Stops a run abruptly (no final checkpoint) as it is about to take step ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise _Crash


SCENES = DataConfig(train_scenes=16, val_scenes=2, batch_size=8, num_workers=0, captions_per_image=1,
                    questions_per_image=2)


def _fit(tokenizer, folder: Path, every: int, ckpt: Path | None = None, crash_at: int | None = None,
         data: DataConfig = SCENES) -> L.Trainer:
    """6 steps in batches of 8 (of 16 scenes by default: 2 steps per epoch), a checkpoint every ``every`` steps,
    dropout on."""
    L.seed_everything(0, verbose=False)
    cfg = tiny_config()
    cfg.decoder.dropout = 0.1
    module = CaptionModule.create(cfg, OptimConfig(warmup_steps=2), tokenizer)
    loaders = DataModule(data, tokenizer, image_transform(module.model.encoder.trunk, 64), 64, seed=0)
    trainer = L.Trainer(max_steps=6, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        callbacks=[*([_CrashAt(crash_at)] if crash_at else []),
                                   ModelCheckpoint(dirpath=folder, save_last=True, every_n_train_steps=every),
                                   BatchLog(folder / "batches.jsonl"), StepSeed(0)],
                        plugins=[AtomicCheckpointIO()], default_root_dir=folder)
    try:
        trainer.fit(module, loaders, ckpt_path=ckpt, weights_only=True)
    finally:
        loaders.stop_workers()
    return trainer


@pytest.fixture(scope="module")
def uninterrupted(tokenizer, tmp_path_factory) -> tuple[L.Trainer, Path]:
    folder = tmp_path_factory.mktemp("uninterrupted")
    return _fit(tokenizer, folder, every=6), folder


@pytest.mark.parametrize("stop", [2, 3], ids=["at_an_epoch_end", "mid_epoch"])
def test_resume_continues_order_draws_optimizer_and_schedule(tokenizer, tmp_path, uninterrupted, stop):
    full, full_folder = uninterrupted
    with pytest.raises(_Crash):
        _fit(tokenizer, tmp_path, every=stop, crash_at=stop)
    resumed = _fit(tokenizer, tmp_path, every=stop, ckpt=tmp_path / "last.ckpt")
    assert resumed.global_step == full.global_step == 6 and resumed.current_epoch == full.current_epoch
    assert _steps(tmp_path / "batches.jsonl") == [*range(stop), *range(stop, 6)]  # the resumed fit began at `stop`
    assert _batches(tmp_path / "batches.jsonl") == _batches(full_folder / "batches.jsonl")
    a, b = full.lightning_module.state_dict(), resumed.lightning_module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    a, b = full.optimizers[0].state_dict()["state"], resumed.optimizers[0].state_dict()["state"]
    assert int(a[0]["step"]) == int(b[0]["step"]) == 6
    assert all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i])
    assert full.lr_scheduler_configs[0].scheduler.last_epoch == resumed.lr_scheduler_configs[0].scheduler.last_epoch


@pytest.fixture(scope="module")
def shapes_on_disk(tmp_path_factory) -> dict[str, Path]:
    """The scenes' layouts (two shards: 100 and 50 samples), with every 7th shard sample's image unreadable."""
    files = write_shapes(tmp_path_factory.mktemp("shapes"), 150)
    spoil_shard_images(files["shards"])
    return files


def _streams(sources: list[str], workers: int, buffer: int) -> DataConfig:
    """Streamed sources in batches of 8."""
    return DataConfig(sources=[SourceConfig(s) for s in sources], batch_size=8, num_workers=workers,
                      shuffle_buffer=buffer, questions_per_image=1)


@pytest.mark.parametrize("layout, workers, buffer", [("shards", 0, 0), ("shards", 2, 16), ("shards_and_jsonl", 1, 0)],
                         ids=["shards", "shuffled_shards_in_two_workers", "shards_mixed_with_a_jsonl"])
def test_resume_on_streamed_shards_continues_after_the_last_batch_trained_on(tokenizer, shapes_on_disk, tmp_path,
                                                                             layout, workers, buffer):
    """Lightning fetches a batch ahead of training from a loader of unknown length, and the checkpoint counted that
    batch as seen: a resumed run on shards skipped it. Streams report a length, so the position is exact."""
    sources = [str(shapes_on_disk["shards"] / "*.tar")]
    if layout == "shards_and_jsonl":
        sources.append(str(shapes_on_disk["jsonl"]))
    full = _fit(tokenizer, tmp_path / "full", every=6, data=_streams(sources, workers, buffer))
    with pytest.raises(_Crash):
        _fit(tokenizer, tmp_path / "part", every=3, crash_at=3, data=_streams(sources, workers, buffer))
    killed = _load(tmp_path / "part" / "last.ckpt")["state_dict"]
    resumed = _fit(tokenizer, tmp_path / "part", every=3, ckpt=tmp_path / "part" / "last.ckpt",
                   data=_streams(sources, workers, buffer))
    assert _steps(tmp_path / "part" / "batches.jsonl") == [0, 1, 2, 3, 4, 5]  # the resumed fit began at step 3
    assert full.datamodule.skipped > 0  # unreadable samples were among those trained on
    expected = _batches(tmp_path / "full" / "batches.jsonl")
    assert len({line["texts"] for line in expected.values()}) == 6  # every step saw other texts
    assert _batches(tmp_path / "part" / "batches.jsonl") == expected
    a, b = full.lightning_module.state_dict(), resumed.lightning_module.state_dict()
    assert max((a[k] - killed[k]).abs().max().item() for k in a) > 1e-3  # the weights trained after the checkpoint
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_a_stream_with_other_workers_or_batches_says_its_position_is_approximate(
        tokenizer, shapes_on_disk, tmp_path, caplog):
    """The position counts batches of each worker's readers: with other workers it cannot be exact, and says so."""
    sources = [str(shapes_on_disk["shards"] / "*.tar")]
    with pytest.raises(_Crash):
        _fit(tokenizer, tmp_path, every=3, crash_at=3, data=_streams(sources, workers=0, buffer=0))
    with caplog.at_level("WARNING", logger="vlm.data.module"):
        resumed = _fit(tokenizer, tmp_path, every=3, ckpt=tmp_path / "last.ckpt",
                       data=_streams(sources, workers=1, buffer=0))
    assert resumed.global_step == 6
    warned = [r.getMessage() for r in caplog.records if r.name == "vlm.data.module"]
    assert warned == ["data: resuming a stream with processes 1, num_workers 1, batch_size 8, not processes 1, "
                      "num_workers 0, batch_size 8 as before: it goes on from about where it stopped, not exactly"]


def _vlm(out: Path, log_name: str, devices: int, *extra: str) -> subprocess.Popen:
    """`vlm train` in the background in a process group of its own, its output to a file (a full pipe would
    stall it)."""
    args = [*RUN, "--out", str(out), "--data.batch_size", BATCH[devices], "--data.num_workers", WORKERS[devices],
            "--data.batch_log",
            str(out / f"{log_name}.jsonl")]
    if devices > 1:
        args += ["--trainer.devices", str(devices), "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp"]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{log_name}.log", "w") as f:
        return subprocess.Popen([sys.executable, "-m", "vlm.cli", "train", *args, *extra], cwd=ROOT, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _finish(proc: subprocess.Popen, out: Path, log_name: str) -> None:
    assert proc.wait(timeout=300) == 0, (out / f"{log_name}.log").read_text()[-3000:]
    assert (out / f"{log_name}.log").read_text().strip().splitlines()[-1] == f"exported model: {out / 'model'}"


def _batches(path: Path) -> dict[tuple[int, int], dict]:
    """(step, rank) -> the batch log's line (the last one, if a step was logged twice)."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return {(line["step"], line["rank"]): line for line in lines}


def _steps(path: Path) -> list[int]:
    return [line["step"] for line in map(json.loads, path.read_text().splitlines()) if line["rank"] == 0]


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _kill_at_random(out: Path, devices: int, rng: random.Random) -> int:
    """Start a run; once it has started a random step from 2 to 8 (its first checkpoint, at step 2, is written
    then), kill -9 its whole process group after a random delay (up to a few steps). Keeps the checkpoint it left
    as killed.ckpt and returns its step."""
    proc = _vlm(out, "first", devices)
    log, started = out / "first.jsonl", rng.randint(2, 8)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and not (
            log.exists() and max(_steps(log), default=-1) >= started):
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.3))
    assert proc.poll() is None, "the run ended before it was killed: " + (out / "first.log").read_text()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    last = out / "checkpoints" / "last.ckpt"
    shutil.copy(last, out / "killed.ckpt")
    step = _load(last)["global_step"]
    assert 0 < step < STEPS, "the run must be killed mid-training"
    return step


@pytest.fixture(scope="module", params=[1, 2], ids=["one_process", "ddp"])
def runs(request, tmp_path_factory) -> tuple[Path, Path, int]:
    """(uninterrupted run, killed-and-resumed run, the step it resumed from)."""
    devices = request.param
    seed = random.randrange(2**32)
    print(f"kill delay seed: {seed}")  # shown with a failure, to replay the same moment
    full, part = tmp_path_factory.mktemp(f"full{devices}"), tmp_path_factory.mktemp(f"killed{devices}")
    _finish(_vlm(full, "full", devices), full, "full")
    resumed_from = _kill_at_random(part, devices, random.Random(seed))
    _finish(_vlm(part, "resumed", devices, "--resume", "last"), part, "resumed")
    return full, part, resumed_from


def test_resumed_run_continues_from_its_checkpoint(runs):
    full, part, resumed_from = runs
    assert _steps(full / "full.jsonl") == list(range(STEPS))
    assert _steps(part / "first.jsonl")[:resumed_from] == list(range(resumed_from))
    # The resumed process ran only the steps after its checkpoint.
    assert _steps(part / "resumed.jsonl") == list(range(resumed_from, STEPS))


def test_resumed_run_sees_the_same_samples_at_every_step(runs):
    full, part, _ = runs
    expected = _batches(full / "full.jsonl")
    first, resumed = _batches(part / "first.jsonl"), _batches(part / "resumed.jsonl")
    assert len({line["texts"] for line in expected.values()}) == len(expected)  # the fingerprints tell batches apart
    # Every step the killed run logged (also those after its checkpoint, redone after the resume) and every step
    # of the resumed run saw what the uninterrupted run saw.
    assert {key: first[key] for key in first} == {key: expected[key] for key in first}
    assert resumed == {key: expected[key] for key in resumed}
    assert first.keys() | resumed.keys() == expected.keys()


def test_resumed_run_ends_with_the_uninterrupted_weights_and_optimiser(runs):
    full, part, _ = runs
    a, b = _load(full / "checkpoints" / "last.ckpt"), _load(part / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == STEPS
    killed = _load(part / "killed.ckpt")["state_dict"]
    moved = max((a["state_dict"][k] - killed[k]).abs().max().item() for k in killed)
    assert moved > 1e-3  # the weights really trained after the checkpoint the run resumed from
    for name, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][name]), name
    for (i, x), y in zip(a["optimizer_states"][0]["state"].items(), b["optimizer_states"][0]["state"].values(),
                         strict=True):
        assert all(torch.equal(x[k], y[k]) for k in x), i
    assert a["lr_schedulers"] == b["lr_schedulers"]
