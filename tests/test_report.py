"""The HTML evaluation report: one self-contained file with the metrics, every sample and its maps."""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from vlm.eval.report import write_report

METRICS = {"caption": {"CIDEr-D": 1.2345678, "BLEU-4": 0.5}, "vqa": {"overall": 0.75}, "scenes": 3}


def make_samples() -> list[dict]:
    rng = np.random.default_rng(0)
    samples = []
    for i, (caption, score) in enumerate([("a red circle", 0.9), ("a <b>bold</b> & blue square", 0.1),
                                          (None, None)]):
        tokens = caption.split() if caption else []
        samples.append({
            "id": f"scene-{i}", "image": Image.new("RGB", (64, 48) if i else (800, 600), (40 * i, 100, 200)),
            "caption": caption, "references": [f"reference {i} a", f"reference {i} b"], "score": score,
            "tokens": tokens, "maps": rng.random((len(tokens), 4, 5)),
            "questions": [{"question": "what color is it?", "answer": "red", "truth": ["red", "blue"],
                           "score": 1.0 - i / 2, "tokens": ["red"], "maps": rng.random((1, 4, 5))}],
        })
    return samples


class Collect(HTMLParser):
    """Tags with their attributes, in document order."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


@pytest.fixture
def report(tmp_path):
    samples = make_samples()
    path = write_report(tmp_path / "sub" / "report.html", METRICS, samples, title="tiny <eval>")
    return path, path.read_text(encoding="utf-8"), samples


def test_report_is_self_contained(report):
    path, text, _ = report
    assert path.name == "report.html" and path.is_file()
    parser = Collect()
    parser.feed(text)
    sources = [a.get("src") or a.get("href") for _, a in parser.tags if a.get("src") or a.get("href")]
    assert sources and all(s.startswith("data:image/") for s in sources)
    assert not re.search(r"https?://", text)
    images = [Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))) for s in sources]
    assert [im.size for im in images] == [(256, 192), (64, 48), (64, 48)]  # large images scaled down


def test_metrics_come_first_and_text_is_escaped(report):
    _, text, _ = report
    assert text.index('id="metrics"') < text.index('class="sample"')
    assert '<tr><th>caption</th><td><span class="metric">CIDEr-D <b>1.235</b></span>' in text
    assert '<span class="metric">overall <b>0.75</b>' in text and '<span class="metric">scenes <b>3</b>' in text
    assert "<title>tiny &lt;eval&gt;</title>" in text
    assert "<b>bold</b>" not in text and "&lt;b&gt;bold&lt;/b&gt;" in text
    assert "(no caption)" in text and "no score" in text
    assert "reference 1 b" in text and "red, blue" in text


def test_maps_round_trip_for_every_token(report):
    _, text, samples = report
    maps = json.loads(re.search(r'<script type="application/json" id="maps">(.*?)</script>', text, re.S).group(1))
    assert len(maps) == len(samples)
    for got, sample in zip(maps, samples, strict=True):
        np.testing.assert_allclose(np.array(got["c"]).reshape(sample["maps"].shape), sample["maps"], atol=1e-5)
        np.testing.assert_allclose(np.array(got["q"][0]), sample["questions"][0]["maps"], atol=1e-5)
    parser = Collect()
    parser.feed(text)
    spans = [(int(a["data-s"]), int(a["data-p"]), int(a["data-t"])) for tag, a in parser.tags if tag == "span"
             and a.get("class") == "tok"]
    caption_spans = [(s, t) for s, p, t in spans if p == -1]
    assert caption_spans == [(0, 0), (0, 1), (0, 2)] + [(1, t) for t in range(5)]
    assert [(s, p, t) for s, p, t in spans if p >= 0] == [(0, 0, 0), (1, 0, 0), (2, 0, 0)]


def test_scores_are_data_for_sorting(report):
    _, text, _ = report
    parser = Collect()
    parser.feed(text)
    scores = [a["data-score"] for tag, a in parser.tags if tag == "article"]
    assert scores == ["0.9", "0.1", ""]


def test_tokens_and_maps_must_agree(tmp_path):
    samples = make_samples()
    samples[1]["maps"] = samples[1]["maps"][:2]
    with pytest.raises(ValueError, match="sample 'scene-1': 5 tokens need maps of shape"):
        write_report(tmp_path / "r.html", METRICS, samples)
