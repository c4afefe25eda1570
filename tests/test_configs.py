"""Every shipped config loads and trains one fast_dev_run step, its data pointed at tiny files the test writes;
and `vlm train` on datasets on disk (mixed sources, BPE) exports a model and a data report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import tiny_config
from vlm.api import Captioner
from vlm.cli import _train_parser, main
from vlm.data.export import write_shapes
from vlm.model.vlm import VisionLanguageModel

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


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


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_shipped_config_trains_one_step(config, shapes, tmp_path, tokenizer):
    raw = yaml.safe_load(config.read_text()) or {}
    args = ["--config", str(config), "--out", str(tmp_path / "run"), "--trainer.fast_dev_run", "true",
            "--data.num_workers", "0", "--data.batch_size", "2", "--model.encoder.pretrained", "false"]
    encoder = raw.get("model", {}).get("encoder", {})
    if encoder.get("image_size", 64) > 64:  # big recipes: the same model on 32 px images, to stay fast here
        args += ["--model.encoder.image_size", "32"]
        if "vit" in encoder.get("name", ""):
            args += ["--model.encoder.model_args", json.dumps({**encoder.get("model_args", {}), "img_size": 32})]
    data = raw.get("data", {})
    for key in ("sources", "val_sources"):
        if data.get(key):
            args += [f"--data.{key}", json.dumps(_tiny_sources(shapes, data[key]))]
    if data.get("feature_cache"):
        args += ["--data.feature_cache", str(tmp_path / "cache.npy")]
    # GPU and multi-process recipes run their one step in this process on the CPU (a DDP launch from inside
    # pytest would start pytest again; tests/test_ddp.py runs DDP through `vlm train` subprocesses).
    args += ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1",
             "--trainer.strategy", "auto", "--trainer.precision", "32-true"]
    if raw.get("scst", {}).get("enabled"):  # a second stage: starts from a (here tiny, untrained) model
        torch.manual_seed(0)
        model = Captioner(VisionLanguageModel(tiny_config(), len(tokenizer)), tokenizer, device="cpu")
        args += ["--init", str(model.save(tmp_path / "init")), "--scst.df_items", "16"]
    parser = _train_parser()
    parser.parse_args(args)  # every key of the file is known and typed
    assert main(["train", *args]) == 0
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


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
