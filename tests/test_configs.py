"""Every shipped config trains one fast_dev_run step as shipped (strategy, devices, precision, image size), but
for what cannot exist here (GPUs, network, 8 loader workers' cores, its data: pointed at tiny files the test
writes), listed per config;
and `vlm train` on datasets on disk (mixed sources, BPE) exports a model and a data report."""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml

from tests.conftest import tiny_config
from vlm.api import Captioner
from vlm.cli import COMMANDS, build_parser, main
from vlm.data.export import write_shapes
from vlm.model.vlm import VisionLanguageModel

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, Path]:
    return write_shapes(tmp_path_factory.mktemp("shapes"), 12, split="val")


def _tiny_sources(shapes: dict[str, Path], sources: list[dict]) -> list[dict]:
    """The config's sources with their paths pointed at the shapes files of the same format."""
    out = []
    for s in sources:
        fmt = s.get("format", "auto")
        path = Path(s["path"]).name
        if fmt == "vqa":
            tiny = {"path": str(shapes["questions"]), "annotations": str(shapes["annotations"]),
                    "images": str(shapes["images"])}
        elif fmt == "karpathy":
            tiny = {"path": str(shapes["karpathy"]), "images": str(shapes["images"]), "split": s.get("split")}
        elif fmt == "coco" or path.startswith("captions"):
            tiny = {"path": str(shapes["captions"]), "images": str(shapes["images"])}
        elif fmt == "webdataset":
            tiny = {"path": str(shapes["shards"] / "00000.tar")}
        else:
            tiny = {"path": str(shapes["jsonl"])}
        out.append({**s, **tiny})
    return out


# What each shipped config sets that cannot exist on this machine (2 CPU cores, no GPU, no network), and so is
# overridden; everything else runs as shipped (strategy, precision, model, image size, tokenizer, workers, ...)
# for one training step and one validation batch (fast_dev_run). Besides: pretrained weights are off (no
# network) and data paths point at `vlm data shapes` files of the same format.
ONE_CPU = {"trainer.accelerator": "cpu", "trainer.devices": "1"}  # 8 GPUs -> one CPU process (DDP, bf16 kept)
# Every config: batches of 2 images, sized for 2 CPU cores (a 224 px ViT-B/16 step; the one validation batch
# generates a caption and answers for each image). The batch size changes no code path.
# One of them drawn as the sample image with its token overlays.
SMALL_BATCH = {"data.batch_size": "2", "val.samples": "1"}
# multitask and vqav2 build coco_vit_b16's model (asserted below), which trains as shipped in coco_vit_b16's run:
# they train a small ViT of the same timm name instead, each on its own data, tokenizer and tasks.
SAME_MODEL_AS_COCO = {"model.encoder.image_size": "32",
                      "model.encoder.model_args": '{"img_size": 32, "embed_dim": 64, "depth": 4, "num_heads": 2}',
                      "model.decoder.width": "64", "model.decoder.depth": "1"}
# 4 or 8 loader workers are sized for a GPU node's CPUs; this machine has 2 cores. The workers still run, 2 of them.
TWO_WORKERS = {"data.num_workers": "2"}
OVERRIDES = {
    "coco_vit_b16": {**ONE_CPU, **TWO_WORKERS},
    "cpu_ddp": {},  # 2 CPU processes, as shipped
    "jsonl": TWO_WORKERS,
    "multinode": {"trainer.accelerator": "cpu", "trainer.num_nodes": "1", **TWO_WORKERS},  # devices: auto: 1 CPU
    "multitask": {**ONE_CPU, **TWO_WORKERS, **SAME_MODEL_AS_COCO},
    "relational": {},
    "scst": {},  # and --init: a tiny untrained model, as SCST starts from a trained one
    "tiny": {},
    "vit": {},
    "vqav2": {**ONE_CPU, **TWO_WORKERS, **SAME_MODEL_AS_COCO},
}


def test_every_shipped_config_has_its_overrides_listed():
    assert sorted(OVERRIDES) == [c.stem for c in CONFIGS]


def test_configs_trained_with_a_small_model_build_coco_vit_b16s_model():
    parser = build_parser("vlm train", COMMANDS["train"])
    model = {c.stem: parser.parse_args(["--config", str(c)]).get("model") for c in CONFIGS}
    same = [name for name, overrides in OVERRIDES.items() if overrides.items() >= SAME_MODEL_AS_COCO.items()]
    assert same == ["multitask", "vqav2"]
    assert all(model[name] == model["coco_vit_b16"] for name in same)
    assert model["coco_vit_b16"] != model["tiny"]  # the comparison tells models apart


def _config_args(config: Path, shapes: dict[str, Path], out: Path) -> list[str]:
    raw = yaml.safe_load(config.read_text()) or {}
    args = ["--config", str(config), "--out", str(out), "--trainer.fast_dev_run", "true",
            "--model.encoder.pretrained", "false"]
    data = raw.get("data", {})
    for key in ("sources", "val_sources"):
        if data.get(key):
            args += [f"--data.{key}", json.dumps(_tiny_sources(shapes, data[key]))]
    for key, value in {**SMALL_BATCH, **OVERRIDES[config.stem]}.items():
        args += [f"--{key}", value]
    return args


@pytest.fixture
def restored_process_state():
    """An in-process DDP run (one process) leaves its environment variables, thread count and process group behind;
    later tests (and the DDP subprocesses they start) must not inherit them."""
    environ, threads = dict(os.environ), torch.get_num_threads()
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(environ)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("config", [c for c in CONFIGS if c.stem != "cpu_ddp"],
                         ids=[c.stem for c in CONFIGS if c.stem != "cpu_ddp"])
def test_shipped_config_trains_one_step(config, shapes, tmp_path, tokenizer, restored_process_state):
    args = _config_args(config, shapes, tmp_path / "run")
    if (yaml.safe_load(config.read_text()) or {}).get("scst", {}).get("enabled"):
        torch.manual_seed(0)
        model = Captioner(VisionLanguageModel(tiny_config(), len(tokenizer)), tokenizer, device="cpu")
        args += ["--init", str(model.save(tmp_path / "init"))]
    parser = build_parser("vlm train", COMMANDS["train"])
    parser.parse_args(args)  # every key of the file is known and typed
    before = set(multiprocessing.active_children())
    gc.disable()  # loader workers must stop when the run ends, not when the garbage collector gets to them
    try:
        assert main(["train", *args]) == 0
        assert set(multiprocessing.active_children()) <= before
    finally:
        gc.enable()
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert not (tmp_path / "run" / "checkpoints").exists()  # fast_dev_run: a check, that replaces no checkpoint


def test_cpu_ddp_config_trains_one_step_on_two_processes(shapes, tmp_path):
    """DDP re-launches its command for the second process, so the run is a subprocess."""
    out = tmp_path / "run"
    args = _config_args(ROOT / "configs" / "cpu_ddp.yaml", shapes, out)
    result = subprocess.run([sys.executable, "-m", "vlm.cli", "train", *args], capture_output=True, text=True,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in result.stderr
    assert (out / "model" / "model.safetensors").is_file()


def test_train_on_mixed_sources_with_bpe_writes_a_data_report(shapes, tmp_path, capsys):
    sources = [{"path": str(shapes["captions"]), "images": str(shapes["images"]), "weight": 1.0},
               {"path": str(shapes["questions"]), "annotations": str(shapes["annotations"]),
                "images": str(shapes["images"]), "weight": 2.0}]
    out = tmp_path / "run"
    args = ["train", "--config", "configs/tiny.yaml", "--out", str(out), "--trainer.max_steps", "2",
            "--data.sources", json.dumps(sources), "--data.val_sources", json.dumps(sources[:1]),
            "--data.tokenizer.kind", "bpe", "--data.tokenizer.vocab_size", "400"]
    assert main(args) == 0
    report = json.loads((out / "data_report.json").read_text())
    assert report["tokenizer"]["kind"] == "bpe" and report["tokenizer"]["train_unknown_tokens"] == 0
    assert [s["records"] for s in report["train_sources"]] == [12, 12]
    tokenizer = json.loads((out / "model" / "tokenizer.json").read_text())
    assert tokenizer["model"]["type"] == "BPE"


def test_unknown_words_are_counted(shapes, tmp_path):
    out = tmp_path / "run"
    sources = [{"path": str(shapes["jsonl"])}]
    assert main(["train", "--config", "configs/tiny.yaml", "--out", str(out), "--trainer.max_steps", "1",
                 "--data.sources", json.dumps(sources), "--data.tokenizer.min_frequency", "1000"]) == 0
    tok = json.loads((out / "data_report.json").read_text())["tokenizer"]
    assert tok["train_unknown_tokens"] == tok["train_tokens"] > 0  # no word is that frequent: all unknown, counted
