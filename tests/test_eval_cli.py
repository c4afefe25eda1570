"""`vlm eval --data` and `vlm ground` end to end on a tiny untrained model and the built-in scenes written as files."""

from __future__ import annotations

import csv
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from vlm.api import Captioner
from vlm.cli import main
from vlm.eval.caption import caption_evaluation


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer) -> str:
    import torch

    from tests.conftest import tiny_config
    from vlm.model.vlm import VisionLanguageModel

    torch.manual_seed(0)
    model = VisionLanguageModel(tiny_config(), len(tokenizer)).eval()
    return str(Captioner(model, tokenizer, device="cpu").save(tmp_path_factory.mktemp("model")))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    assert main(["data", "shapes", "--out", str(out), "--num-images", "6"]) == 0
    return out


def _run(capsys, *args: str) -> tuple[int, dict | None, str]:
    code = main(["eval", *args])
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if code == 0 else None, captured.err


def test_eval_a_model_on_coco_captions_writes_results_metrics_and_csv(model_dir, shapes, tmp_path, capsys) -> None:
    out = tmp_path / "eval"
    code, metrics, err = _run(capsys, "--model", model_dir, "--data", str(shapes / "captions.json"),
                              "--images", str(shapes / "images"), "--out", str(out), "--java", "false")
    assert code == 0, err
    results = json.loads((out / "captions_results.json").read_text())
    assert sorted(r["image_id"] for r in results) == list(range(1, 7))
    assert all(isinstance(r["caption"], str) for r in results)
    caption = metrics["caption"]
    expected = {"BLEU-4", "ROUGE-L", "CIDEr-D", "identical_share", "distinct_1", "distinct_2", "mean_length"}
    assert expected <= set(caption)
    assert json.loads((out / "metrics.json").read_text()) == metrics
    with open(out / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {"image_id", "caption", "CIDEr-D"} <= set(rows[0])
    # The printed corpus CIDEr-D is the mean of the per-image column.
    assert caption["CIDEr-D"] == pytest.approx(sum(float(r["CIDEr-D"]) for r in rows) / 6)


def test_eval_scores_a_results_file_like_the_metric_functions(shapes, tmp_path, capsys) -> None:
    coco = json.loads((shapes / "captions.json").read_text())
    refs: dict[int, list[str]] = {}
    for a in coco["annotations"]:
        refs.setdefault(a["image_id"], []).append(a["caption"])
    predictions = {image_id: captions[1].upper() + "!" for image_id, captions in refs.items()}
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"image_id": k, "caption": v} for k, v in predictions.items()]))
    # Scoring a results file needs no images.
    code, metrics, err = _run(capsys, "--results", str(results), "--data", str(shapes / "captions.json"),
                              "--out", str(tmp_path / "o"), "--java", "false")
    assert code == 0, err
    expected, _ = caption_evaluation(predictions, refs)
    assert {k: metrics["caption"][k] for k in expected} == pytest.approx(expected)
    assert metrics["caption"]["BLEU-4"] > 0.5  # each prediction is one of its own references


def test_eval_vqa_results_per_answer_type(shapes, tmp_path, capsys) -> None:
    questions = json.loads((shapes / "questions.json").read_text())["questions"]
    annotations = {a["question_id"]: a for a in json.loads((shapes / "annotations.json").read_text())["annotations"]}
    # Right on every yes/no question, wrong on every other one.
    results = [{"question_id": q["question_id"],
                "answer": annotations[q["question_id"]]["multiple_choice_answer"]
                if annotations[q["question_id"]]["answer_type"] == "yes/no" else "zebra"} for q in questions]
    path = tmp_path / "vqa.json"
    path.write_text(json.dumps(results))
    code, metrics, err = _run(capsys, "--results", str(path), "--data", str(shapes / "questions.json"),
                              "--annotations", str(shapes / "annotations.json"), "--out", str(tmp_path / "o"))
    assert code == 0, err
    vqa = metrics["vqa"]
    assert vqa["accuracy/yes/no"] == 1.0 and vqa["accuracy/other"] == 0.0 and vqa["questions"] == len(questions)
    share = sum(annotations[q["question_id"]]["answer_type"] == "yes/no" for q in questions) / len(questions)
    assert vqa["accuracy"] == pytest.approx(share)


def test_eval_with_regions_reports_grounding(model_dir, shapes, tmp_path, capsys) -> None:
    code, metrics, err = _run(capsys, "--model", model_dir, "--data", str(shapes / "instances.json"),
                              "--images", str(shapes / "images"), "--out", str(tmp_path / "o"), "--method", "rollout")
    assert code == 0, err
    grounding = metrics["grounding"]
    assert grounding["method"] == "rollout" and grounding["phrases"] >= 6
    assert 0 <= grounding["pointing_game"] <= 1 and 0 <= grounding["iou"] <= 1


def test_eval_limit_scores_only_the_results_of_the_limited_images(shapes, tmp_path, capsys) -> None:
    """With --limit N a results file of every image scores the first N (it once failed: "image_id 6 is not in the
    data"); results of images left out are not errors."""
    coco = json.loads((shapes / "captions.json").read_text())
    refs: dict[int, list[str]] = {}
    for a in coco["annotations"]:
        refs.setdefault(a["image_id"], []).append(a["caption"])
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"image_id": k, "caption": v[0]} for k, v in refs.items()]))
    code, metrics, err = _run(capsys, "--results", str(results), "--data", str(shapes / "captions.json"),
                              "--limit", "3", "--out", str(tmp_path / "o"), "--java", "false")
    assert code == 0, err
    first = sorted(refs)[:3]
    expected, _ = caption_evaluation({k: refs[k][0] for k in first}, {k: refs[k] for k in first})
    assert metrics["caption"]["images"] == 3
    assert {k: metrics["caption"][k] for k in expected} == pytest.approx(expected)
    with open(tmp_path / "o" / "per_image.csv") as f:
        assert [int(row["image_id"]) for row in csv.DictReader(f)] == first


@pytest.mark.parametrize(("result", "needle"), [({"image_id": 999, "caption": "a cat"}, "999"),
                                                ({"image_id": 1, "caption": 5}, "caption")])
def test_bad_results_are_one_line_errors(shapes, tmp_path, capsys, result, needle) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([result]))
    code, _, err = _run(capsys, "--results", str(path), "--data", str(shapes / "captions.json"),
                        "--images", str(shapes / "images"), "--out", str(tmp_path / "o"))
    assert code == 1 and needle in err and len(err.strip().splitlines()) == 1


def test_ground_prints_json_and_draws_the_box(model_dir, shapes, tmp_path, capsys) -> None:
    image = next((shapes / "images").iterdir())
    code = main(["ground", "--model", model_dir, str(image), "a small red circle", "--out", str(tmp_path / "g"),
                 "--method", "chefer"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert result["tokens"] == ["a", "small", "red", "circle"] and len(result["box"]) == 4
    assert Path(result["file"]) == tmp_path / "g" / "ground.png" and Path(result["file"]).is_file()


def test_attend_takes_a_method_and_a_head(model_dir, shapes, tmp_path, capsys) -> None:
    image = str(next((shapes / "images").iterdir()))
    out = tmp_path / "a"
    code = main(["attend", "--model", model_dir, image, "--out", str(out), "--method", "rollout", "--head", "1",
                 "--beam", "1"])
    assert code == 0, capsys.readouterr().err
    maps = json.loads((out / "attention.json").read_text())["maps"]
    assert maps and all(abs(sum(map(sum, m)) - 1.0) < 1e-4 for m in maps)  # rollout rows are distributions
    code = main(["attend", "--model", model_dir, image, "--out", str(out), "--method", "chefer", "--head", "1"])
    assert code == 1 and "head" in capsys.readouterr().err


class _Page(HTMLParser):
    """The report's structure: resource URLs, metric spans, sample cards with their token spans, the maps JSON."""

    def __init__(self):
        super().__init__()
        self.urls: list[str] = []
        self.metrics: dict[str, dict[str, str]] = {}
        self.samples: list[dict] = []
        self.maps_json = ""
        self._group = self._metric = self._token = None
        self._in_maps = False
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.urls += [a[k] for k in ("src", "href") if a.get(k)]
        if tag == "tr":
            self._group = ""
        elif tag == "th" and self._group == "":
            self._group = None  # the next text is the group's name
            self._text = []
        elif tag == "span" and a.get("class") == "metric":
            self._metric, self._text = True, []
        elif tag == "article":
            self.samples.append({"id": a["data-id"], "caption": [], "answers": {}})
        elif tag == "span" and a.get("class") == "tok":
            self._token, self._text = (int(a["data-s"]), int(a["data-p"]), int(a["data-t"])), []
        elif tag == "script" and a.get("id") == "maps":
            self._in_maps = True

    def handle_endtag(self, tag):
        if tag == "th" and self._group is None:
            self._group = "".join(self._text).strip()
            self.metrics[self._group] = {}
        elif tag == "span" and self._metric:
            name, value = "".join(self._text).rsplit(" ", 1)
            self.metrics[self._group][name] = value
            self._metric = None
        elif tag == "span" and self._token:
            s, p, t = self._token
            sample = self.samples[s]
            (sample["caption"] if p < 0 else sample["answers"].setdefault(p, [])).append(("".join(self._text), t))
            self._token = None
        elif tag == "script":
            self._in_maps = False

    def handle_data(self, data):
        self._text.append(data)
        if self._in_maps:
            self.maps_json += data


def test_eval_report_is_self_contained_with_metrics_and_each_samples_maps(model_dir, shapes, tmp_path,
                                                                          capsys) -> None:
    out, report = tmp_path / "o", tmp_path / "report.html"
    code, metrics, err = _run(capsys, "--model", model_dir, "--data", str(shapes / "data.jsonl"), "--out", str(out),
                              "--java", "false", "--report", str(report))
    assert code == 0, err
    page = _Page()
    page.feed(report.read_text(encoding="utf-8"))
    # Self-contained: every image is a data URI, nothing is fetched.
    assert page.urls and all(u.startswith("data:image/png;base64,") for u in page.urls)
    assert not re.search(r"https?://|<link|<script src", report.read_text(encoding="utf-8"))
    # The metrics the CLI printed, as the report shows them (4 significant digits).
    for group in ("caption", "vqa", "grounding"):
        for name, value in metrics[group].items():
            if isinstance(value, float):
                assert float(page.metrics[group][name]) == pytest.approx(value, rel=1e-3, abs=1e-4), (group, name)
    # Each sample: its caption and answers as hoverable tokens, each token with the model's map.
    captioner = Captioner.load(model_dir, device="cpu")
    tok = captioner.tokenizer
    captions = {r["image_id"]: r["caption"] for r in json.loads((out / "captions_results.json").read_text())}
    answers = {r["question_id"]: r["answer"] for r in json.loads((out / "vqa_results.json").read_text())}
    records = [json.loads(line) for line in (shapes / "data.jsonl").read_text().splitlines()]
    questions = [r for r in records if "question" in r]
    maps = json.loads(page.maps_json)
    assert [s["id"] for s in page.samples] == [str(i) for i in range(1, 7)] and len(maps) == 6
    assert sum(len(s["caption"]) for s in page.samples) > 6 and all(s["answers"] for s in page.samples)
    expected = []  # (image id, the tokens and maps shown, the text, its question); maps recomputed in one batch
    for sample, sample_maps in zip(page.samples, maps, strict=True):
        image_id = int(sample["id"])
        asked = [q for q in questions if q["image_id"] == image_id]
        assert len(sample_maps["q"]) == len(asked)
        texts = [(sample["caption"], sample_maps["c"], captions[image_id], None)]
        texts += [(sample["answers"].get(k, []), sample_maps["q"][k], answers[q["question_id"]], q["question"])
                  for k, q in enumerate(asked)]
        expected += [(image_id, *t) for t in texts]
    for _, shown, _, text, _ in expected:
        assert shown == [(t, i) for i, t in enumerate(tok.tokens(tok.encode(text)))]
    expected = [e for e in expected if e[3]]
    recomputed = captioner.text_maps([str(shapes / f"images/{e[0]:012d}.png") for e in expected],
                                     [e[3] for e in expected], questions=[e[4] for e in expected])
    for (_, _, shown_maps, _, _), m in zip(expected, recomputed, strict=True):
        np.testing.assert_allclose(np.array(shown_maps), m, atol=1e-5)


@pytest.mark.parametrize("option", [["--report", "r.html"], ["--limit", "2"], ["--results", "r.json"],
                                    ["--images", "imgs"]])
def test_options_of_a_dataset_need_data_not_silently_ignored(model_dir, tmp_path, capsys, option) -> None:
    code, _, err = _run(capsys, "--model", str(model_dir), "--num_scenes", "2", *option)
    assert code == 1 and f"{option[0]}: needs --data" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r.html").exists()
