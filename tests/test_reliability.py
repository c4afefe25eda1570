"""Hostile and broken input: mismatched or malicious models, awkward text, output paths, and every CLI command
against every bad input it can meet (one line on stderr naming the problem, non-zero exit, no traceback)."""

from __future__ import annotations

import json
import os
import pickle
import re
import shlex
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import tiny_config
from tests.test_images import png_bytes
from vlm import Captioner, load
from vlm.cli import COMMANDS, main
from vlm.data.scenes import make_scene
from vlm.errors import VLMError
from vlm.grounding.overlay import write_attention
from vlm.model.vlm import VisionLanguageModel
from vlm.text.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


class RunsCode:
    """Unpickling this object runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def write_code_running_checkpoint(path: Path, marker: Path, zipped: bool) -> Path:
    """A checkpoint whose unpickling creates ``marker``: torch.save's zip format, or a bare pickle."""
    if zipped:
        torch.save({"state_dict": RunsCode(marker)}, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump({"state_dict": RunsCode(marker), "hyper_parameters": {}}, fh)
    return path


@pytest.fixture(scope="module")
def captioner(tokenizer) -> Captioner:
    """A tiny untrained model whose short max_length keeps generation (never ended by [EOS]) quick."""
    torch.manual_seed(0)
    cfg = tiny_config()
    cfg = replace(cfg, decoder=replace(cfg.decoder, max_length=12))
    return Captioner(VisionLanguageModel(cfg, len(tokenizer)).eval(), tokenizer, device="cpu")


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return make_scene(0, "val").image


@pytest.fixture(scope="module")
def f(tmp_path_factory, captioner) -> SimpleNamespace:
    """Good and bad files shared by the tests; ``marker`` must never come to exist."""
    d = tmp_path_factory.mktemp("files")
    files = SimpleNamespace(dir=d, model=captioner.save(d / "model"), marker=d / "pwned", empty_dir=d / "empty")
    files.empty_dir.mkdir()
    files.image = d / "scene.png"
    make_scene(0, "val").image.save(files.image)
    files.missing = d / "missing.png"
    files.text = d / "notes.png"
    files.text.write_text("not an image")
    files.truncated = d / "cut.png"
    files.truncated.write_bytes(files.image.read_bytes()[:200])
    files.bomb = d / "bomb.png"  # declares 10^10 pixels
    files.bomb.write_bytes(png_bytes(100_000, 100_000, 1, 0, bytes(12_500), rows=4))
    files.evil = write_code_running_checkpoint(d / "evil.ckpt", files.marker, zipped=False)
    files.evil_zip = write_code_running_checkpoint(d / "evil_zip.ckpt", files.marker, zipped=True)
    files.ckpt = d / "good.ckpt"
    torch.save(_checkpoint(captioner), files.ckpt)
    files.jsonl = d / "data.jsonl"
    files.jsonl.write_text("\n".join(json.dumps({"image": p.name, "caption": "a red circle"})
                                     for p in (files.missing, files.text, files.truncated, files.bomb)) + "\n{oops\n")
    files.yaml = d / "bad.yaml"
    files.yaml.write_text("trainer:\n  max_steps: many\n")
    return files


def _checkpoint(captioner: Captioner, **model_changes) -> dict:
    """A checkpoint in the training module's format: plain dicts, the tokenizer's JSON and tensors."""
    model = asdict(captioner.model.cfg)
    for section, values in model_changes.items():
        model[section].update(values)
    state = {f"model.{k}": v for k, v in captioner.model.state_dict().items()}
    return {"state_dict": state, "hyper_parameters": {"model": model, "tokenizer": captioner.tokenizer.to_str()}}


def _copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for file in src.iterdir():
        (dst / file.name).write_bytes(file.read_bytes())
    return dst


def _edit_config(model: Path, edit) -> None:
    config = json.loads((model / "config.json").read_text())
    edit(config)
    (model / "config.json").write_text(json.dumps(config))


# ---------------------------------------------------------------- models and checkpoints


def test_a_crafted_checkpoint_loads_like_the_exported_model(f, image):
    from_ckpt, from_dir = load(f.ckpt, device="cpu"), load(f.model, device="cpu")
    assert from_ckpt.caption(image, max_new_tokens=4) == from_dir.caption(image, max_new_tokens=4)


def _wider(c):
    c["model"]["decoder"]["width"] = 64


MODEL_DIR_CASES = {
    "shape mismatch": (lambda m: _edit_config(m, _wider), "weights do not match the model config (size mismatch"),
    "missing tokenizer": (lambda m: (m / "tokenizer.json").unlink(), "missing tokenizer.json"),
    "missing weights": (lambda m: (m / "model.safetensors").unlink(), "missing model.safetensors"),
    "format_version": (lambda m: _edit_config(m, lambda c: c.update(format_version=99)),
                       "format_version 99, this vlm reads 1"),
    "vocab mismatch": (lambda m: _edit_config(m, lambda c: c.update(vocab_size=7)), "config says 7"),
    "other tokenizer": (lambda m: Tokenizer.train(["just a few words"]).save(str(m / "tokenizer.json")),
                        "tokens, config says"),
    "corrupt tokenizer": (lambda m: (m / "tokenizer.json").write_text('{"not": "a tokenizer"}'),
                          "tokenizer.json: not a vlm tokenizer"),
    "corrupt safetensors": (lambda m: (m / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{bad"),
                            "model.safetensors: cannot read safetensors weights"),
    "truncated safetensors": (lambda m: (m / "model.safetensors").write_bytes((m / "model.safetensors").read_bytes()
                                                                              [:5000]),
                              "model.safetensors: cannot read safetensors weights"),
    "config not JSON": (lambda m: (m / "config.json").write_text("{"), "config.json: invalid JSON"),
    "config not an object": (lambda m: (m / "config.json").write_text("[1]"), "expected a JSON object, got list"),
    "unknown config key": (lambda m: _edit_config(m, lambda c: c["model"]["decoder"].update(widht=3)),
                           "bad 'model' section"),
    "bad config value": (lambda m: _edit_config(m, lambda c: c["model"]["decoder"].update(depth="two")),
                         "cannot build a model from its config"),
    "unknown encoder": (lambda m: _edit_config(m, lambda c: c["model"]["encoder"].update(name="no_such_net")),
                        "cannot build a model from its config"),
}


@pytest.mark.parametrize("case", MODEL_DIR_CASES, ids=lambda c: c.replace(" ", "_"))
def test_a_mismatched_or_broken_model_dir_is_one_line(f, tmp_path, case):
    break_it, message = MODEL_DIR_CASES[case]
    model = _copy_model(f.model, tmp_path / "model")
    break_it(model)
    with pytest.raises(VLMError, match=re.escape(message)) as info:
        load(model, device="cpu")
    assert "\n" not in str(info.value) and str(model) in str(info.value)


def _truncated(path: Path, captioner) -> None:
    torch.save(_checkpoint(captioner), path)
    path.write_bytes(path.read_bytes()[:3000])


CHECKPOINT_CASES = {
    "shape mismatch": (lambda p, c: torch.save(_checkpoint(c, decoder={"width": 64}), p),
                       "weights do not match the model config (size mismatch"),
    "fewer layers": (lambda p, c: torch.save(_checkpoint(c, decoder={"depth": 1}), p), "unexpected decoder.blocks.1"),
    "truncated": (_truncated, "cannot load checkpoint"),
    "not a checkpoint": (lambda p, c: p.write_text("hello"), "cannot load checkpoint"),
    "other module": (lambda p, c: torch.save({"state_dict": {}, "epoch": 3}, p), "not a vlm checkpoint"),
    "bad tokenizer": (lambda p, c: torch.save({**_checkpoint(c), "hyper_parameters": {
        **_checkpoint(c)["hyper_parameters"], "tokenizer": "{}"}}, p), "not a vlm tokenizer"),
    "weights file": (None, "pass the exported model's directory"),
}


@pytest.mark.parametrize("case", CHECKPOINT_CASES, ids=lambda c: c.replace(" ", "_"))
def test_a_mismatched_or_broken_checkpoint_is_one_line(f, captioner, tmp_path, case):
    write, message = CHECKPOINT_CASES[case]
    path = tmp_path / "run.ckpt"
    if write is None:
        path = f.model / "model.safetensors"
    else:
        write(path, captioner)
    with pytest.raises(VLMError, match=re.escape(message)) as info:
        load(path, device="cpu")
    assert "\n" not in str(info.value) and str(path) in str(info.value)


PLAIN_TORCH_LOAD = """
import sys, torch
for path in sys.argv[1:]:
    try:
        torch.load(path, weights_only=False)
    except Exception:
        pass  # a bare pickle is no torch checkpoint: torch.load fails, after unpickling it
"""


def test_a_checkpoint_that_runs_code_is_refused_and_the_code_does_not_run(f, tmp_path, capsys):
    # Copies with their own markers (f.marker must never exist), which plain torch.load must create below.
    files = {zipped: (write_code_running_checkpoint(tmp_path / f"evil{i}.ckpt", tmp_path / f"ran{i}", zipped),
                      tmp_path / f"ran{i}") for i, zipped in enumerate((False, True))}
    for path, marker in files.values():
        refused = rf"{re.escape(str(path))}: refused to unpickle: a checkpoint may hold only tensors"
        with pytest.raises(VLMError, match=refused):
            load(path, device="cpu")
        assert main(["caption", "--model", str(path), str(f.image)]) == 1
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and re.match(f"vlm caption: error: {refused}", err), err
        assert not marker.exists()
    # The positive control: unpickled without care, in a fresh process, the same files do run their code.
    subprocess.run([sys.executable, "-c", PLAIN_TORCH_LOAD, *(str(path) for path, _ in files.values())],
                   capture_output=True, timeout=300)
    assert all(marker.exists() for _, marker in files.values())


# ---------------------------------------------------------------- text


@pytest.mark.parametrize("question", ["what color is the circle?", "qué colór tiene el círculo? 中文 🙂",
                                      "what\x00 color\x07 is\x1b[31m the\u200b circle?", "is there a [SEP] [EOS]?",
                                      "\udcff what color", "？？？", "\t\nwhat color is the circle\r\n"])
def test_any_question_text_gets_an_answer(captioner, image, question):
    (answer,) = captioner.ask(image, question, max_new_tokens=2)
    assert isinstance(answer, str)
    attended = captioner.attend(image, question=question, max_new_tokens=2)
    assert attended.maps.shape == (len(attended.tokens), 8, 8)
    assert attended.question.isprintable()  # what was answered, without control characters


def test_control_characters_count_as_spaces(captioner, image):
    clean = captioner.attend(image, question="what color is the circle?", max_new_tokens=3)
    noisy = captioner.attend(image, question="what\x00color\x07 is the\u200bcircle?\x7f", max_new_tokens=3)
    assert noisy.question == "what color is the circle?"
    assert noisy.tokens == clean.tokens and np.allclose(noisy.maps, clean.maps, atol=1e-6)


@pytest.mark.parametrize("question", ["", "   ", "\t\n", "\x00\x1f\u200b"])
def test_an_empty_question_is_a_clear_error_everywhere(captioner, image, question):
    with pytest.raises(VLMError, match="^question is empty"):
        captioner.ask(image, question)
    with pytest.raises(VLMError, match="^question is empty"):
        captioner.attend(image, question=question)
    with pytest.raises(VLMError, match="^question 1 is empty"):
        captioner.ask([image, image], ["what color?", question])
    with pytest.raises(VLMError, match="^text 0 is empty"):
        captioner.text_maps([image], [question])


def test_a_question_that_is_not_text_is_a_clear_error(captioner, image):
    with pytest.raises(VLMError, match="question 1: expected text, got NoneType"):
        captioner.ask([image, image], ["what color?", None])


def test_a_long_question_is_truncated_with_one_warning(captioner, image):
    limit = captioner.model.cfg.decoder.max_length // 2 - 2  # question tokens that fit
    with pytest.warns(UserWarning) as caught:
        long = captioner.ask([image] * 3, ["red " * 500, "is there?", "blue " * 1000], max_new_tokens=3)
    assert len(caught) == 1 and "2 question(s) longer than the model's limit" in str(caught[0].message)
    assert long[0] == captioner.ask(image, "red " * limit, max_new_tokens=3)[0]
    assert long[2] == captioner.ask(image, "blue " * limit, max_new_tokens=3)[0]
    with pytest.warns(UserWarning, match="1 question"):
        attended = captioner.attend(image, question="red " * 500, max_new_tokens=3)
    assert len(attended.tokens) == attended.maps.shape[0]


def test_a_long_text_is_truncated_with_one_warning(captioner, image):
    room = captioner.model.cfg.decoder.max_length - 1  # after [BOS]
    with pytest.warns(UserWarning, match="1 text"):
        maps = captioner.text_maps([image, image], ["a red circle " * 200, "a red circle"])
    assert maps[0].shape == (room, 8, 8) and maps[1].shape == (3, 8, 8)
    np.testing.assert_allclose(maps[0][:3], maps[1], atol=1e-5)  # causal: the prefix maps are the same


def test_bad_generation_settings_are_clear_errors(captioner, image):
    with pytest.raises(VLMError, match="beam_size must be at least 1, got 0"):
        captioner.caption(image, beam_size=0)


def test_bytes_and_streams_are_single_images(captioner, image, f):
    expected = captioner.caption(image, max_new_tokens=3)
    assert captioner.caption(f.image.read_bytes(), max_new_tokens=3) == expected
    with open(f.image, "rb") as fh:
        assert captioner.caption(fh, max_new_tokens=3) == expected
    assert captioner.caption([f.image.read_bytes(), image], max_new_tokens=3) == expected * 2


# ---------------------------------------------------------------- output paths

HOSTILE_TOKENS = ["../x", "/etc/passwd", "a\x00b", "x" * 1000, "..", "", ".", "~", "\\..\\win", "é", "$HOME",
                  "a/../../b"]


def _all_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def test_overlays_stay_inside_the_output_folder_whatever_the_tokens(tmp_path, image):
    out = tmp_path / "deep" / "out"
    maps = np.full((len(HOSTILE_TOKENS), 2, 2), 0.25)
    record = write_attention(out, image, HOSTILE_TOKENS, maps, text="../../t", question="/etc/q\x00")
    written = _all_files(tmp_path)
    assert written == {out / name for name in [*record["files"], "grid.png", "attention.json"]}
    assert len(set(record["files"])) == len(HOSTILE_TOKENS)
    for name in record["files"]:
        assert re.fullmatch(r"token_\d{2}_[A-Za-z0-9_-]{1,40}\.png", name), name
    assert json.loads((out / "attention.json").read_text())["tokens"] == HOSTILE_TOKENS


@pytest.mark.parametrize("command", ["attend", "ground"])
def test_cli_writes_only_inside_out_whatever_the_image_name(f, tmp_path, capsys, command):
    image = tmp_path / "in" / "..evil name; rm -rf ~ ..png"
    image.parent.mkdir()
    image.write_bytes(f.image.read_bytes())
    out = tmp_path / "out"
    text = ["--question", "../../x?"] if command == "attend" else ["../../etc/passwd"]
    assert main([command, "--model", str(f.model), str(image), "--out", str(out), *text]) == 0
    written = _all_files(tmp_path) - {image}
    assert written and {p.parent for p in written} == {out}


# ---------------------------------------------------------------- every CLI command x every bad input

IMAGE_COMMANDS = {"caption": [], "ask": ["q?"], "attend": ["--out", "{dir}/overlays"], "ground": ["a red circle"]}
BAD_IMAGES = {"missing": ("missing", "missing.png: no such image file"),
              "directory": ("empty_dir", "is a directory, not an image file"),
              "not an image": ("text", "notes.png: cannot read image"),
              "truncated": ("truncated", "cut.png: cannot read image"),
              "bomb": ("bomb", "bomb.png: more than")}
BAD_MODELS = {"bad model dir": ("{empty_dir}", "not an exported vlm model (missing model.safetensors)"),
              "no model": ("{missing}", "no such model directory or checkpoint"),
              "malicious checkpoint": ("{evil}", "evil.ckpt: refused to unpickle"),
              "malicious zip checkpoint": ("{evil_zip}", "evil_zip.ckpt: refused to unpickle")}


def _cases() -> list[tuple[str, str, list[str], str]]:
    """(command, bad input, argv with {placeholders} for the files, what the error line must contain)."""
    cases = []
    for cmd, extra in IMAGE_COMMANDS.items():
        for label, (attr, needle) in BAD_IMAGES.items():
            cases.append((cmd, label, [cmd, "--model", "{model}", f"{{{attr}}}", *extra], needle))
        cases.append((cmd, "unknown flag", [cmd, "--model", "{model}", "{image}", *extra, "--bream", "2"], "--bream"))
    for cmd, extra in list(IMAGE_COMMANDS.items())[:3]:
        cases.append((cmd, "bad flag type", [cmd, "--model", "{model}", "{image}", *extra, "--beam", "two"], "beam"))
        cases.append((cmd, "bad flag value", [cmd, "--model", "{model}", "{image}", *extra, "--beam", "0"],
                      "beam_size must be at least 1, got 0"))
    cases.append(("ask", "empty question", ["ask", "--model", "{model}", "{image}", " \t"], "question is empty"))
    cases.append(("attend", "empty question", ["attend", "--model", "{model}", "{image}", "--out", "{dir}/o",
                                               "--question", ""], "question is empty"))
    cases.append(("attend", "bad layers", ["attend", "--model", "{model}", "{image}", "--out", "{dir}/o",
                                           "--layers", "[7]"], "out of range"))
    cases += [
        ("ground", "empty phrase", ["ground", "--model", "{model}", "{image}", " "], "phrase"),
        ("ground", "control-character phrase", ["ground", "--model", "{model}", "{image}", "\x00\x07"], "empty"),
        ("ground", "bad flag value", ["ground", "--model", "{model}", "{image}", "red", "--threshold", "2"],
         "threshold"),
        ("ground", "bad method", ["ground", "--model", "{model}", "{image}", "red", "--method", "magic"], "magic"),
    ]
    model_args = {"caption": ["{image}"], "ask": ["{image}", "q?"], "attend": ["{image}", "--out", "{dir}/o"],
                  "ground": ["{image}", "red"],
                  "eval": ["--num-scenes", "2"], "demo": ["--out", "{dir}/demo"], "serve": ["--port", "0"]}
    for cmd, rest in model_args.items():
        for label, (model, needle) in BAD_MODELS.items():
            cases.append((cmd, label, [cmd, "--model", model, *rest], needle))
    cases += [
        ("eval", "bad flag value", ["eval", "--model", "{model}", "--num-scenes", "0"], "--num-scenes: expected a"),
        ("eval", "bad flag type", ["eval", "--model", "{model}", "--num-scenes", "many"], "num_scenes"),
        ("demo", "output is a file", ["demo", "--model", "{model}", "--out", "{text}"], "notes.png"),
        ("serve", "bad flag type", ["serve", "--model", "{model}", "--port", "http"], "port"),
        ("serve", "bad flag value", ["serve", "--model", "{model}", "--max-pixels", "0"],
         "max_pixels: expected a positive number of pixels, got 0"),
        ("serve", "bad upload limit", ["serve", "--model", "{model}", "--max-upload-mb", "0"], "upload limit"),
        ("serve", "missing model flag", ["serve"], "required: model"),
        ("data", "missing file", ["data", "validate", "{dir}/none.jsonl"], "none.jsonl: no such file"),
        ("data", "directory", ["data", "validate", "{empty_dir}"], "is a directory"),
        ("data", "bad images and lines", ["data", "validate", "{jsonl}"], "data.jsonl: 5 problem(s) found"),
        ("data", "bad flag type", ["data", "shapes", "--out", "{dir}/shapes", "--num-images", "lots"],
         "num_images"),
        ("data", "unknown action", ["data", "frobnicate"], "frobnicate"),
        ("predict", "missing input", ["predict", "--model", "{model}", "--input", "{dir}/none", "--out", "{dir}/p"],
         "none"),
        ("predict", "bad output format", ["predict", "--model", "{model}", "--input", "{dir}", "--out", "{dir}/p",
                                          "--format", "xml"], "xml"),
        ("predict", "missing model", ["predict", "--model", "{dir}/nomodel", "--input", "{dir}", "--out",
                                      "{dir}/p"], "nomodel"),
        ("export", "bad format", ["export", "--model", "{model}", "--format", "tflite", "--out", "{dir}/e"],
         "tflite"),
        ("export", "missing model", ["export", "--model", "{dir}/nomodel", "--format", "onnx", "--out", "{dir}/e"],
         "nomodel"),
        ("import", "missing directory", ["import", "--from", "hf:{dir}/nohub", "--out", "{dir}/i"], "nohub"),
        ("import", "no hf prefix", ["import", "--from", "{dir}", "--out", "{dir}/i"], "hf:"),
        ("predict", "no patches per map", ["predict", "--model", "{model}", "--input", "{dir}", "--out", "{dir}/p",
                                           "--maps", "--map_top_k", "0"], "--map_top_k 0: expected a positive"),
        ("predict", "no progress interval", ["predict", "--model", "{model}", "--input", "{dir}", "--out", "{dir}/p",
                                             "--progress_every", "0"], "--progress_every 0: expected a positive"),
        ("train", "bad config value", ["train", "--config", "{yaml}"], "max_steps"),
        # An option out of range fails before any work (fast_dev_run: a check that let it through fails in seconds).
        *[("train", label, ["train", option, value, "--trainer.fast_dev_run", "1", "--out", "{dir}/run"], needle)
          for label, option, value, needle in [
              ("no log interval", "--trainer.log_every_n_steps", "0",
               "trainer.log_every_n_steps must be at least 1, got 0"),
              ("no accumulation", "--trainer.accumulate_grad_batches", "0",
               "trainer.accumulate_grad_batches must be at least 1, got 0"),
              ("no decoder layers", "--model.decoder.depth", "0", "model.decoder.depth must be at least 1"),
              ("no scenes", "--data.train_scenes", "0", "data.train_scenes must be at least 1, got 0"),
              ("no room for words", "--data.tokenizer.vocab_size", "5", "data.tokenizer: vocab_size 5: a word-level"),
              ("negative learning rate", "--optim.lr", "-0.1", "optim.lr must be a positive number, got -0.1"),
              ("smoothing all", "--optim.label_smoothing", "1", "optim.label_smoothing must be in [0, 1)"),
              ("missing trunk weights", "--model.encoder.weights", "{dir}/none.safetensors",
               "none.safetensors: no such file")]],
        ("train", "missing config", ["train", "--config", "{dir}/none.yaml"], "none.yaml"),
        ("train", "bad flag type", ["train", "--trainer.max_steps", "many"], "max_steps"),
        ("train", "malicious init checkpoint", ["train", "--config", str(ROOT / "configs" / "tiny.yaml"),
                                                "--out", "{dir}/run", "--init", "{evil}"], "refused to unpickle"),
        ("train", "malicious resume checkpoint", ["train", "--config", str(ROOT / "configs" / "tiny.yaml"),
                                                  "--out", "{dir}/run", "--resume", "{evil}"],
         "evil.ckpt: cannot resume from this checkpoint"),
    ]
    return cases


CASES = _cases()


def test_every_cli_command_meets_bad_input():
    assert {case[0] for case in CASES} == set(COMMANDS), "add bad-input cases for every command in vlm.cli.COMMANDS"


@pytest.mark.parametrize(("command", "label", "argv", "needle"), CASES,
                         ids=[f"{c[0]}-{c[1].replace(' ', '_')}" for c in CASES])
def test_cli_bad_input_is_one_line_naming_it(f, capsys, command, label, argv, needle):
    code = main([arg.format(**vars(f)) for arg in argv])
    err = capsys.readouterr().err
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"vlm {command}: error: ") and "Traceback" not in err
    assert needle in lines[0], lines[0]
    assert not f.marker.exists()


@pytest.mark.parametrize("argv", [["caption", "--model", "{model}", "{truncated}"], ["ask", "--model", "{evil}",
                                                                                        "{image}", "q?"]])
def test_debug_raises_instead(f, argv):
    with pytest.raises(VLMError):
        main([arg.format(**vars(f)) for arg in argv] + ["--debug"])


def test_the_installed_command_prints_one_line(f):
    entry = Path(sys.executable).with_name("vlm")
    command = [str(entry)] if entry.is_file() else [sys.executable, "-m", "vlm.cli"]
    env = {**os.environ, "PYTHONWARNINGS": "default"}  # a warning on stderr would break the one-line promise
    result = subprocess.run([*command, "caption", "--model", str(f.model), str(f.bomb)], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [result.stderr.strip()] and "bomb.png" in result.stderr


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {cmd} " in out for cmd in COMMANDS)

