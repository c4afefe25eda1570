"""Data-parallel training on CPU (gloo): `vlm train` with 2 processes, and validation metrics under DDP.

Lightning's DDP launcher re-runs the launching script in each process, so each run is a subprocess of
its own; the runs are tiny (a few steps) to stay fast.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    result = run("-m", "vlm.cli", "train", "--config", TINY, "--out", str(out), "--trainer.devices", "2",
                 "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--data.val_scenes", "7",
                 "--val.samples", "1", "--trainer.log_every_n_steps", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == f"exported model: {out / 'model'}"
    return out


def test_vlm_train_with_two_cpu_processes_trains_end_to_end(ddp_run):
    assert (ddp_run / "checkpoints" / "last.ckpt").is_file()
    assert (ddp_run / "model" / "model.safetensors").is_file()
    events = EventAccumulator(str(next((ddp_run / "lightning_logs").glob("version_*")))).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"val/caption/CIDEr-D", "val/vqa/accuracy", "val/collapse/identical_share", "val/collapse/distinct_2",
            "val/collapse/vocabulary", "train/loss", "val/loss"} <= scalars
    assert events.Tags()["images"] == ["samples/0"]  # the sample image with its per-token overlays


VALIDATE = """
import json, sys
import lightning as L
from vlm.config import DataConfig
from vlm.data.builtin import SceneDataModule
from vlm.data.transforms import image_transform
from vlm.train.callbacks import GenerationMetrics
from vlm.train.module import CaptionModule

ckpt, devices, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
module = CaptionModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
data = SceneDataModule(DataConfig(val_scenes=7, batch_size=2, num_workers=0), module.tokenizer,
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


def test_fsdp_on_cpu_fails_with_one_clear_line(tmp_path):
    result = run("-m", "vlm.cli", "train", "--config", TINY, "--out", str(tmp_path), "--trainer.strategy", "fsdp",
                 "--trainer.accelerator", "cpu")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert "fsdp" in lines[-1] and "GPU" in lines[-1] and "Traceback" not in result.stderr
