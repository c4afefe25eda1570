"""The `vlm` command end to end on a tiny model: train, caption, ask, attend, eval, and bad input."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vlm.cli import _train_parser, main
from vlm.data.scenes import make_scene

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def vlm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlm.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    result = vlm("train", "--config", str(ROOT / "configs" / "tiny.yaml"), "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == f"exported model: {out / 'model'}"
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i in range(2):
        path = folder / f"scene {i}.png"  # a space in the name on purpose
        make_scene(i, "val").image.save(path)
        paths.append(str(path))
    return paths


def test_train_writes_checkpoints_and_an_exported_model(trained):
    assert (trained / "checkpoints" / "last.ckpt").is_file()
    assert {p.name for p in (trained / "model").iterdir()} == {"model.safetensors", "config.json", "tokenizer.json"}
    config = json.loads((trained / "model" / "config.json").read_text())
    assert config["model"]["decoder"]["width"] == 32


def test_caption_json_and_checkpoint_agree_with_exported_model(trained, images, capsys):
    assert main(["caption", "--model", str(trained / "model"), *images, "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["image"] for line in lines] == images
    assert all(isinstance(line["caption"], str) for line in lines)
    assert main(["caption", "--model", str(trained / "checkpoints" / "last.ckpt"), *images, "--json"]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == lines
    assert main(["caption", "--model", str(trained / "model"), *images, "--beam", "3"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_ask_prints_the_answer(trained, images, capsys):
    assert main(["ask", "--model", str(trained / "model"), images[0], "how many objects are there?", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["question"] == "how many objects are there?" and isinstance(answer["answer"], str)


@pytest.mark.parametrize("question", [None, "what color is the circle?"])
def test_attend_writes_overlays_grid_and_json(trained, images, tmp_path, capsys, question):
    args = ["attend", "--model", str(trained / "model"), images[1], "--out", str(tmp_path / "out")]
    assert main(args + (["--question", question] if question else [])) == 0
    data = json.loads((tmp_path / "out" / "attention.json").read_text())
    h, w = data["grid"]
    assert (h, w) == (8, 8) and data["image_size"] == [64, 64] and data["question"] == question
    assert len(data["maps"]) == len(data["tokens"]) == len(data["files"])
    for name, m in zip(data["files"], data["maps"], strict=True):
        assert (tmp_path / "out" / name).is_file()
        assert len(m) == h and len(m[0]) == w
        assert sum(map(sum, m)) == pytest.approx(1.0, abs=1e-3)  # a distribution over patches
    assert (tmp_path / "out" / "grid.png").is_file()


def test_eval_prints_metrics_json(trained, capsys):
    assert main(["eval", "--model", str(trained / "model"), "--num-scenes", "6"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["scenes"] == 6
    for value in (metrics["caption"]["CIDEr-D"], metrics["caption"]["BLEU-4"], metrics["vqa"]["accuracy"],
                  metrics["grounding"]["pointing_game"]):
        assert value >= 0.0
    assert 0.0 <= metrics["vqa"]["accuracy"] <= 1.0 and 0.0 <= metrics["grounding"]["pointing_game"] <= 1.0


def test_print_config_shows_the_resolved_config():
    result = vlm("train", "--config", str(ROOT / "configs" / "tiny.yaml"), "--print_config")
    assert result.returncode == 0
    config = yaml.safe_load(result.stdout)
    assert config["model"]["decoder"]["width"] == 32 and config["trainer"]["max_steps"] == 4
    assert config["model"]["encoder"]["name"] == "resnet18"  # a default the file does not mention


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    parser = _train_parser()
    cfg = parser.instantiate(parser.parse_args(["--config", str(path)]))
    assert cfg.model.decoder.width > 0


def _one_error_line(code: int, capsys, *needles: str) -> None:
    err = capsys.readouterr().err
    assert code != 0
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err


def test_bad_inputs_give_one_line_errors(trained, images, tmp_path, capsys):
    model = str(trained / "model")
    _one_error_line(main(["caption", "--model", model, str(tmp_path / "missing.png")]), capsys, "missing.png")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    _one_error_line(main(["caption", "--model", model, str(text)]), capsys, "notes.png")
    _one_error_line(main(["ask", "--model", str(tmp_path / "nomodel"), images[0], "q?"]), capsys, "nomodel")
    _one_error_line(main(["caption", "--model", str(tmp_path)]), capsys)  # no image given
    _one_error_line(main(["frobnicate"]), capsys, "frobnicate")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  decoder:\n    widht: 3\n")
    _one_error_line(main(["train", "--config", str(bad)]), capsys, "widht")
    _one_error_line(main(["train", "--trainer.max_stepz", "3"]), capsys, "max_stepz")
    _one_error_line(main(["train", "--optim.task_weights", '{"captoin": 1, "vqa": 1}']), capsys, "captoin")


def test_model_config_mismatch_is_one_line(trained, tmp_path, capsys):
    broken = tmp_path / "model"
    broken.mkdir()
    for f in (trained / "model").iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    config = json.loads((broken / "config.json").read_text())
    config["model"]["decoder"]["width"] = 64
    (broken / "config.json").write_text(json.dumps(config))
    _one_error_line(main(["caption", "--model", str(broken), "x.png"]), capsys, "do not match")
    (broken / "tokenizer.json").unlink()
    _one_error_line(main(["caption", "--model", str(broken), "x.png"]), capsys, "tokenizer.json")


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['VLM_EXPLOIT_MARKER']}",))


def test_a_checkpoint_that_runs_code_is_refused(tmp_path, capsys, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("VLM_EXPLOIT_MARKER", str(marker))
    ckpt = tmp_path / "evil.ckpt"
    with open(ckpt, "wb") as f:
        pickle.dump({"state_dict": _Exploit(), "hyper_parameters": {}}, f)
    _one_error_line(main(["caption", "--model", str(ckpt), "x.png"]), capsys, "evil.ckpt")
    assert not marker.exists()
