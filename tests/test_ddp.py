"""Training on 2 CPU processes (gloo): `vlm train` under DDP and FSDP, validation metrics, resuming, and the
weights of DDP and FSDP training equal to one process's on the same global batches.

Lightning's DDP launcher re-runs the launching script in each process, so each run is a subprocess of
its own; the runs are tiny (a few steps) to stay fast.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import spoil_shard_images
from vlm.config import ValConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    result = run("-m", "vlm.cli", "train", "--config", TINY, "--out", str(out), "--trainer.devices", "2",
                 "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--data.val_scenes", "7",
                 "--val.samples", "1", "--trainer.log_every_n_steps", "2",
                 "--data.batch_log", str(out / "batches.jsonl"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == f"exported model: {out / 'model'}"
    (out / "output.txt").write_text(result.stdout + result.stderr)
    return out


def test_vlm_train_with_two_cpu_processes_trains_end_to_end(ddp_run):
    assert (ddp_run / "checkpoints" / "last.ckpt").is_file()
    assert (ddp_run / "model" / "model.safetensors").is_file()
    events = EventAccumulator(str(next((ddp_run / "lightning_logs").glob("version_*")))).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"val/caption/CIDEr-D", "val/vqa/accuracy", "val/collapse/identical_share", "val/collapse/distinct_2",
            "val/collapse/vocabulary", "train/loss", "val/loss"} <= scalars
    assert events.Tags()["images"] == ["samples/0"]  # the sample image with its per-token overlays
    # The tiny model comes to say the same (nothing) of most val images: each such validation says so once, not
    # once per process (nor once more as a Python warning).
    said = [line for line in (ddp_run / "output.txt").read_text().splitlines() if "captions are collapsing" in line]
    collapsed = [e for e in events.Scalars("val/collapse/identical_share") if e.value >= ValConfig.collapse_share]
    assert collapsed and len(said) == len(collapsed)


VALIDATE = """
import json, sys
import lightning as L
from vlm.config import DataConfig
from vlm.data.module import DataModule
from vlm.data.transforms import image_transform
from vlm.train.callbacks import GenerationMetrics
from vlm.train.module import CaptionModule

ckpt, devices, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
module = CaptionModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
data = DataModule(DataConfig(val_scenes=7, batch_size=2, num_workers=0), module.tokenizer,
                  image_transform(module.model.encoder.trunk, 64), 64)
metrics = GenerationMetrics(samples=0)
trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
                    enable_progress_bar=False, enable_model_summary=False, callbacks=[metrics])
trainer.validate(module, data)
if trainer.is_global_zero:
    json.dump(metrics.metrics, open(out, "w"))
"""


def test_validation_metrics_under_ddp_equal_one_process(ddp_run, tmp_path):
    """7 val scenes over 2 processes of 2-image batches: the sampler pads with a repeat, which must not count."""
    script = tmp_path / "validate.py"
    script.write_text(textwrap.dedent(VALIDATE))
    ckpt = str(ddp_run / "checkpoints" / "last.ckpt")
    results = {}
    for devices in (1, 2):
        out = tmp_path / f"metrics{devices}.json"
        result = run(str(script), ckpt, str(devices), str(out), cwd=ROOT)
        assert result.returncode == 0, result.stderr[-3000:]
        results[devices] = json.loads(out.read_text())
    assert results[1]["caption/CIDEr-D"] >= 0 and "vqa/accuracy" in results[1]
    assert results[2] == pytest.approx(results[1], rel=1e-9, abs=1e-12)


def _train_args(out: Path, strategy: str, *extra: str) -> tuple[str, ...]:
    return ("-m", "vlm.cli", "train", "--config", TINY, "--out", str(out), "--trainer.devices", "2",
            "--trainer.accelerator", "cpu", "--trainer.strategy", strategy, "--data.val_scenes", "7", *extra)


def _interrupted_run(out: Path, strategy: str, *first: str) -> Path:
    """2 of tiny's 4 steps (their last.ckpt kept as part.ckpt), then `--resume last` to the end, logging its
    batches to resumed.jsonl."""
    result = run(*_train_args(out, strategy, "--trainer.max_steps", "2", *first))
    assert result.returncode == 0, result.stderr[-3000:]
    shutil.copy(out / "checkpoints" / "last.ckpt", out / "part.ckpt")
    result = run(*_train_args(out, strategy, "--val.generate", "false", "--resume", "last", "--data.batch_log",
                              str(out / "resumed.jsonl")))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == f"exported model: {out / 'model'}"
    return out


@pytest.fixture(scope="module")
def fsdp_resumed(tmp_path_factory) -> Path:
    """FSDP2 on 2 CPU processes, validating with generation at step 2 (`--trainer.strategy fsdp`)."""
    return _interrupted_run(tmp_path_factory.mktemp("fsdp"), "fsdp", "--val.samples", "1",
                            "--trainer.log_every_n_steps", "1")


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _optimizer_steps(ckpt: dict) -> set[int]:
    return {int(s["step"]) for s in ckpt["optimizer_states"][0]["state"].values()}


def test_resumed_fsdp_run_continues_like_the_uninterrupted_one(fsdp_resumed, ddp_run):
    """An FSDP run stopped at step 2 and resumed runs only steps 2 and 3, on the batches the uninterrupted run (DDP,
    the same data) saw at those steps, and ends at its step with the optimiser and schedule continued (an optimiser
    reset would count 2 steps, not 4). Killed and resumed runs on one process and DDP: tests/test_resume.py."""
    out = fsdp_resumed
    lines = [json.loads(line) for line in (out / "resumed.jsonl").read_text().splitlines()]
    assert sorted((line["step"], line["rank"]) for line in lines) == [(2, 0), (2, 1), (3, 0), (3, 1)]
    uninterrupted = {(line["step"], line["rank"]): line
                     for line in map(json.loads, (ddp_run / "batches.jsonl").read_text().splitlines())}
    assert len({line["texts"] for line in uninterrupted.values()}) == len(uninterrupted) == 8  # batches differ
    assert all(line == uninterrupted[line["step"], line["rank"]] for line in lines)
    part, resumed, full = _load(out / "part.ckpt"), _load(out / "checkpoints" / "last.ckpt"), \
        _load(ddp_run / "checkpoints" / "last.ckpt")
    assert part["global_step"] == 2 and _optimizer_steps(part) == {2}
    assert resumed["global_step"] == full["global_step"] == 4
    assert _optimizer_steps(resumed) == _optimizer_steps(full) == {4}
    assert resumed["lr_schedulers"] == full["lr_schedulers"]
    assert len(resumed["optimizer_states"][0]["state"]) == len(full["optimizer_states"][0]["state"])


@pytest.fixture(scope="module")
def equivalence(tmp_path_factory, tokenizer) -> dict[str, dict]:
    """tests/ddp_equivalence.py's runs: 3 steps at lr 1e-3 on one process and, on two, DDP, FSDP and unsynced DDP."""
    out = tmp_path_factory.mktemp("equivalence")
    (out / "tokenizer.json").write_text(tokenizer.to_str())
    script = str(ROOT / "tests" / "ddp_equivalence.py")
    single = subprocess.Popen([sys.executable, script, str(out), "single"], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    result = run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script, str(out),
                 "distributed")
    _, error = single.communicate(timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert single.returncode == 0, error[-3000:]
    return {name: _load(out / f"{name}.pt") for name in ("single", "ddp", "fsdp", "unsynced")}


def _distance(a: dict, b: dict) -> float:
    """The largest difference of any weight."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _gap(run: dict, reference: dict) -> float:
    """The largest difference of run's final weights from reference's, relative to reference's largest update.

    Both start from the same weights, and reference's 3 steps at lr 1e-3 really train (each weight moves ~2e-3).
    """
    update = _distance(reference["final"], reference["init"])
    assert update > 1e-3
    assert _distance(run["init"], reference["init"]) == 0
    return _distance(run["final"], reference["final"]) / update


def test_two_process_ddp_trains_the_weights_of_one_process_on_the_global_batch(equivalence):
    """Each process's batch holds a different number of learned (and grounded) tokens: the loss's means are over
    the global batch's tokens (and the logged train/loss is the global batch's); gradient averaging makes the rest.
    The same check fails for DDP that does not average gradients."""
    single, ddp, unsynced = equivalence["single"], equivalence["ddp"], equivalence["unsynced"]
    counts = ddp["counts"]  # per step, per process: caption, vqa and grounded tokens
    assert len(counts) == 3 and all(rank0 != rank1 for rank0, rank1 in counts)
    assert [[sum(c) for c in zip(*step, strict=True)] for step in counts] == \
        [step[0] for step in single["counts"]]  # the same global batches
    assert ddp["losses"] == pytest.approx(single["losses"], rel=1e-9)
    assert _gap(ddp, single) < 1e-6  # float64: ~1e-10 measured
    assert unsynced["losses"][0] == ddp["losses"][0] and _gap(unsynced, single) > 0.1  # the control


def test_fsdp_trains_the_weights_of_ddp(equivalence):
    """FSDP2 (sharded parameters, gradients reduce-scattered) trains as DDP and one process do."""
    fsdp = equivalence["fsdp"]
    assert fsdp["losses"] == pytest.approx(equivalence["ddp"]["losses"], rel=1e-9)
    assert _gap(fsdp, equivalence["ddp"]) < 1e-6 and _gap(fsdp, equivalence["single"]) < 1e-6


def test_fsdp_validation_generation_equals_one_process_and_exports_a_loadable_model(fsdp_resumed):
    """The metrics logged at step 2 under sharding are a one-process validation's of that checkpoint; the
    export after resuming is what vlm.load reads and equals the last checkpoint."""
    import lightning as L

    from vlm import load
    from vlm.config import DataConfig
    from vlm.data.module import DataModule
    from vlm.data.transforms import image_transform
    from vlm.train.callbacks import GenerationMetrics
    from vlm.train.module import CaptionModule

    events = EventAccumulator(str(fsdp_resumed / "lightning_logs" / "version_0")).Reload()  # the first run
    logged = {tag[len("val/"):]: events.Scalars(tag)[0] for tag in events.Tags()["scalars"]
              if tag.startswith(("val/caption/", "val/vqa/", "val/collapse/"))}
    assert {"caption/CIDEr-D", "vqa/accuracy", "collapse/vocabulary"} <= logged.keys()
    assert len({e.step for e in logged.values()}) == 1  # one validation, at the end of step 2
    assert events.Tags()["images"] == ["samples/0"]

    module = CaptionModule.load_from_checkpoint(fsdp_resumed / "part.ckpt", map_location="cpu", weights_only=True)
    data = DataModule(DataConfig(val_scenes=7, batch_size=8, num_workers=0), module.tokenizer,
                      image_transform(module.model.encoder.trunk, 64), 64)
    metrics = GenerationMetrics(samples=0)
    L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
              callbacks=[metrics]).validate(module, data)
    assert metrics.metrics.keys() == logged.keys()
    assert {k: e.value for k, e in logged.items()} == pytest.approx(metrics.metrics, rel=1e-6)

    exported, last = load(fsdp_resumed / "model"), load(fsdp_resumed / "checkpoints" / "last.ckpt")
    for (name, a), b in zip(exported.model.state_dict().items(), last.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_images_skipped_under_ddp_are_counted_over_both_processes(tmp_path):
    """data_report.json's skipped_while_loading counted rank 0's loader alone: each process reads its own share of
    the records, and logs each one it skips."""
    from vlm.data.export import write_shapes

    jsonl = write_shapes(tmp_path / "data", 16)["jsonl"]
    for path in sorted((tmp_path / "data" / "images").glob("*.png"))[::2]:  # every other image unreadable
        path.write_bytes(b"not a png")
    out = tmp_path / "run"
    result = run("-m", "vlm.cli", "train", "--config", TINY, "--out", str(out), "--trainer.devices", "2",
                 "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.max_steps", "4",
                 "--trainer.val_check_interval", "100", "--data.batch_size", "4", "--data.num_workers", "0",
                 "--data.sources", json.dumps([{"path": str(jsonl)}]))
    assert result.returncode == 0, result.stderr[-3000:]
    logged = [line for line in result.stderr.splitlines() if line.startswith("skipped ")]
    skipped = json.loads((out / "data_report.json").read_text())["skipped_while_loading"]
    assert skipped == len(logged) >= 8  # 4 steps of 8 records: about half of them unreadable, on both processes


def test_a_ddp_run_on_shards_resumed_with_more_steps_sees_the_batches_of_the_uninterrupted_run(tmp_path):
    """Each process reads its own shards in loader workers; a run stopped at max_steps and resumed with more goes
    on after the last batch trained on, on every process (it read the shards again from their start: Lightning ends
    the loop's iterator at max_steps, and with it torchdata's count of the batches given out)."""
    from vlm.data.export import write_shapes

    shards = write_shapes(tmp_path / "data", 120)["shards"]  # two shards: one per process
    spoil_shard_images(shards)  # unreadable samples among them: their places go to the next readable ones
    common = ("--trainer.devices", "2", "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp",
              "--trainer.val_check_interval", "100", "--data.batch_size", "4", "--data.num_workers", "1",
              "--data.shuffle_buffer", "8", "--data.sources", json.dumps([{"path": str(shards / "*.tar")}]),
              "--model.decoder.dropout", "0.1", "--optim.warmup_steps", "2",
              "--optim.min_lr_ratio", "1")  # no decay: the schedule of a 3-step run is then the 6-step run's
    logs = {}
    for name, steps, extra in [("full", 6, ()), ("part", 3, ()), ("part", 6, ("--resume", "last"))]:
        out = tmp_path / name
        result = run("-m", "vlm.cli", "train", "--config", TINY, "--out", str(out), "--trainer.max_steps",
                     str(steps), "--data.batch_log", str(out / "batches.jsonl"), *common, *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        logs[name] = [json.loads(line) for line in (out / "batches.jsonl").read_text().splitlines()]
    full = {(line["step"], line["rank"]): line for line in logs["full"]}
    assert json.loads((tmp_path / "full" / "data_report.json").read_text())["skipped_while_loading"] > 0
    assert sorted(full) == [(step, rank) for step in range(6) for rank in (0, 1)]
    assert len({line["texts"] for line in full.values()}) == 12  # every batch of every process differs
    assert sorted((line["step"], line["rank"]) for line in logs["part"]) == sorted(full)  # each step once
    assert {(line["step"], line["rank"]): line for line in logs["part"]} == full
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "part" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
