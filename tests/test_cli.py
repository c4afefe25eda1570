"""The `vlm` command end to end on a tiny model: train, caption, ask, attend, eval, and bad input."""

from __future__ import annotations

import inspect
import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.conftest import image_sensitive_model, random_images
from vlm.api import Captioner, load
from vlm.cli import COMMANDS, SHARED_HELP, build_parser, main
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


def test_demo_prints_captions_and_answers_and_writes_scenes_and_overlays(tokenizer, tmp_path, capsys):
    # The last step of scripts/main.sh, on an exported model whose captions and answers depend on the image.
    model = Captioner(image_sensitive_model(tokenizer), tokenizer, "cpu").save(tmp_path / "model")
    out = tmp_path / "demo"
    assert main(["demo", "--model", str(model), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    captioner = load(model, device="cpu")
    scenes = [make_scene(i, "val", image_size=64) for i in range(4)]
    captions, expected = captioner.caption([s.image for s in scenes]), []
    for i, (scene, caption) in enumerate(zip(scenes, captions, strict=True)):
        expected.append(f"{out / f'scene{i}.png'}: {caption}")
        questions = scene.questions[:3]
        answers = captioner.ask([scene.image] * 3, [q.question for q in questions])
        expected += [f"    Q: {q.question}  A: {a}  (truth: {q.answer})"
                     for q, a in zip(questions, answers, strict=True)]
        assert np.array_equal(np.asarray(Image.open(out / f"scene{i}.png")), np.asarray(scene.image))
        assert caption and all(answers)
    assert len(set(captions)) > 1  # the image matters
    attended = captioner.attend(scenes[0].image)
    expected.append(f"attention overlays of '{attended.text}': {out / 'attention' / 'grid.png'}")
    assert printed == expected and len(printed) == 4 * 4 + 1
    record = json.loads((out / "attention" / "attention.json").read_text())
    assert record["tokens"] == attended.tokens and len(record["files"]) == len(attended.tokens)
    np.testing.assert_allclose(record["maps"], attended.maps, atol=1e-5)
    assert {p.name for p in (out / "attention").iterdir()} == {"attention.json", "grid.png", *record["files"]}
    assert Image.open(out / "attention" / "grid.png").size[0] > 64


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
    parser = build_parser("vlm train", COMMANDS["train"])
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


@pytest.mark.parametrize("spelling", [["--beam_size", "3"], ["--beam-size", "3"], ["--beam", "3"]])
def test_options_come_from_the_dataclasses_with_their_aliases(spelling):
    import docstring_parser

    from vlm.config import DecodingConfig, MapConfig

    parser = build_parser("vlm attend", COMMANDS["attend"])
    args = parser.parse_args(["img.png", "--model", "m", "--out", "o", *spelling, "--no-repeat-ngram", "2",
                              "--top-k", "5", "--layers", "[1]"])
    assert (args.beam_size, args.no_repeat_ngram_size, args.top_k, args.layers) == (3, 2, 5, [1])
    assert args.temperature == DecodingConfig.temperature and args.method == MapConfig.method  # one default each
    fields = {p.arg_name: p.description for p in docstring_parser.parse_from_object(DecodingConfig).params}
    assert " ".join(fields["top_k"].split()) in " ".join(parser.format_help().split())  # help: the field's docstring


def test_every_option_has_help_and_shared_options_say_the_same():
    """--model and --runtime mean the same on every command: their help is said once (`SHARED_HELP`)."""
    for name, command in COMMANDS.items():
        if not callable(command):
            continue
        parser = build_parser(f"vlm {name}", command)
        helps = {a.dest: a.help for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
        assert all(helps.values()), (name, [dest for dest, text in helps.items() if not text])
        for option in SHARED_HELP.keys() & inspect.signature(command).parameters.keys():
            assert helps[option] == SHARED_HELP[option], (name, option)


def test_cli_passes_decoding_flags(tiny_model, tokenizer, tmp_path, capsys):
    captioner = Captioner(tiny_model, tokenizer, device="cpu")
    model_dir = captioner.save(tmp_path / "model")
    paths = []
    for i, image in enumerate(random_images(2)):
        paths.append(str(tmp_path / f"{i}.png"))
        image.save(paths[-1])
    cases = [
        (["--sample", "--seed", "3", "--top-k", "5", "--temperature", "1.5", "--top-p", "0.9"],
         dict(sample=True, seed=3, top_k=5, temperature=1.5, top_p=0.9)),
        (["--beam", "3", "--length-penalty", "1.0", "--no-repeat-ngram", "2"],
         dict(beam_size=3, length_penalty=1.0, no_repeat_ngram_size=2)),
    ]
    for flags, options in cases:
        assert main(["caption", "--model", str(model_dir), *paths, *flags]) == 0
        assert capsys.readouterr().out.splitlines() == captioner.caption(paths, **options)
    assert main(["ask", "--model", str(model_dir), paths[0], "what shape is it?", "--sample", "--seed", "1"]) == 0
    assert capsys.readouterr().out.strip() == captioner.ask(paths[0], "what shape is it?", sample=True, seed=1)[0]
    assert main(["caption", "--model", str(model_dir), paths[0], "--sample", "--temperature", "0"]) == 1
    assert "temperature" in capsys.readouterr().err


@pytest.fixture
def saved(tiny_model, tokenizer, tmp_path) -> tuple[Captioner, Path, list[str]]:
    """(the tiny model, its exported directory, two image files)."""
    captioner = Captioner(tiny_model, tokenizer, device="cpu")
    paths = []
    for i, image in enumerate(random_images(2)):
        paths.append(str(tmp_path / f"{i}.png"))
        image.save(paths[-1])
    return captioner, captioner.save(tmp_path / "model"), paths


def test_num_samples_prints_k_captions_per_image_and_k_answers(saved, capsys):
    captioner, model_dir, paths = saved
    flags = ["--sample", "--num_samples", "3", "--seed", "0"]
    expected = captioner.caption(paths, sample=True, num_samples=3, seed=0)  # image after image
    assert len(expected) == 6 and expected[:3] != expected[3:]  # each image's own samples
    assert main(["caption", "--model", str(model_dir), *paths, *flags]) == 0
    assert capsys.readouterr().out.splitlines() == expected
    assert main(["caption", "--model", str(model_dir), *paths, *flags, "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == [{"image": paths[i // 3], "sample": i % 3, "caption": text} for i, text in enumerate(expected)]
    question = "what shape is it?"
    answers = captioner.ask([paths[0]], [question], sample=True, num_samples=3, seed=0)
    assert len(answers) == 3 and len(set(answers)) > 1
    assert main(["ask", "--model", str(model_dir), paths[0], question, *flags]) == 0
    assert capsys.readouterr().out.splitlines() == answers
    assert main(["ask", "--model", str(model_dir), paths[0], question, *flags, "--json"]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == [
        {"image": paths[0], "question": question, "sample": k, "answer": a} for k, a in enumerate(answers)]


def test_every_alias_takes_dashes_or_underscores():
    from vlm.cli import ALIASES

    parser = build_parser("vlm caption", COMMANDS["caption"])
    spellings = {name: {s for alias in aliases for s in (alias.replace("_", "-"), "--" + alias[2:].replace("-", "_"))}
                 for name, aliases in ALIASES.items()}
    assert "--no_repeat_ngram" in spellings["no_repeat_ngram_size"]
    for name, options in spellings.items():
        for option in options:
            args = parser.parse_args(["img.png", "--model", "m", option, "2"])
            assert getattr(args, name) == 2, option


def test_an_onnx_export_where_a_torch_model_is_needed_names_the_commands_that_run_it(tmp_path, capsys):
    from vlm.checkpoint import ONNX_COMMANDS

    with_runtime = [name for name, command in COMMANDS.items()
                    if callable(command) and "runtime" in inspect.signature(command).parameters]
    assert list(ONNX_COMMANDS) == with_runtime  # the message is true of every command
    export = tmp_path / "onnx"
    export.mkdir()
    (export / "onnx.json").write_text("{}")  # an export's facts and no torch weights
    _one_error_line(main(["export", "--model", str(export), "--out", str(tmp_path / "again")]), capsys,
                    "vlm caption, ask, attend, eval, ground, predict, demo and serve run it with --runtime onnx",
                    "needs the torch model")


def test_export_refuses_to_overwrite_a_torch_model(saved, tmp_path, capsys):
    _, model_dir, _ = saved
    other = Captioner(image_sensitive_model(saved[0].tokenizer), saved[0].tokenizer, "cpu").save(tmp_path / "other")
    for out in (model_dir, model_dir / ".", other):
        before = {p.name: p.read_bytes() for p in Path(out).iterdir()}
        _one_error_line(main(["export", "--model", str(model_dir), "--out", str(out)]), capsys, f"--out {out}",
                        "model.safetensors")
        assert {p.name: p.read_bytes() for p in Path(out).iterdir()} == before


def test_ground_reports_the_tokens_its_maps_are_for(saved, capsys):
    captioner, model_dir, paths = saved
    room = captioner.model.cfg.decoder.max_length - len(captioner.tokenizer.caption_prompt())
    long = " ".join(["a small red circle to the left of"] * 6)  # cut to fit max_length
    for phrase in (long, "a\x01red \t circle"):  # control characters count as spaces
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the cut's warning
            assert main(["ground", "--model", str(model_dir), paths[0], phrase]) == 0
            (maps,) = captioner.text_maps([paths[0]], [phrase])
        tokens = json.loads(capsys.readouterr().out)["tokens"]
        cleaned = " ".join(phrase.replace("\x01", " ").split())
        assert tokens == captioner.tokenizer.tokens(captioner.tokenizer.encode(cleaned))[:room]
        assert len(tokens) == len(maps)
    assert len(tokens) == 3 and len(captioner.tokenizer.encode(long)) > room
