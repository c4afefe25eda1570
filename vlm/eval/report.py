"""An evaluation as one self-contained HTML file: metrics, then every sample with its per-token maps.

Images are embedded as data URIs and the maps as JSON; a short script draws a token's map over its image on
hover (click pins it) and sorts or filters the samples by score, so the worst cases are easy to find. The
file needs no network and no other file.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

MAX_IMAGE_SIDE = 256  # embedded images are scaled down to this
SHOWN_SIDE = 256  # every image is shown with this long side (in CSS pixels); maps are drawn at that size


def write_report(path: str | os.PathLike, metrics: dict, samples: list[dict], title: str = "vlm evaluation") -> Path:
    """Write the report to ``path`` and return it.

    Each sample: ``id``, ``image`` (PIL), ``caption`` (or None), ``references``, ``score`` (or None),
    ``tokens`` and ``maps`` (T, h, w) of the caption, and ``questions``: dicts of ``question``, ``answer``,
    ``truth``, ``score``, ``tokens`` and ``maps`` of the answer.
    """
    maps = [_sample_maps(s) for s in samples]
    cards = "\n".join(_card(i, s) for i, s in enumerate(samples))
    page = _PAGE.format(title=html.escape(title), metrics=_metrics_table(metrics), count=len(samples), cards=cards,
                        maps=json.dumps(maps, separators=(",", ":")).replace("<", "\\u003c"), style=_STYLE,
                        script=_SCRIPT)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def _checked_maps(where: str, tokens: list[str], maps: Any) -> list:
    arr = np.asarray(maps, dtype=np.float64)
    if arr.ndim != 3 or arr.shape[0] != len(tokens):
        raise ValueError(f"{where}: {len(tokens)} tokens need maps of shape ({len(tokens)}, h, w), got {arr.shape}")
    return np.round(np.nan_to_num(arr), 5).tolist()


def _sample_maps(sample: dict) -> dict:
    sid = f"sample {sample['id']!r}"
    return {"c": _checked_maps(sid, sample.get("tokens", []), sample.get("maps", np.zeros((0, 1, 1)))),
            "q": [_checked_maps(f"{sid} question {k}", q.get("tokens", []), q.get("maps", np.zeros((0, 1, 1))))
                  for k, q in enumerate(sample.get("questions", []))]}


def _image_uri(image: Image.Image) -> tuple[str, tuple[int, int]]:
    """The image as a data URI (PNG when small, JPEG when large), scaled down to MAX_IMAGE_SIDE."""
    im = image.convert("RGB")
    if max(im.size) > MAX_IMAGE_SIDE:
        im.thumbnail((MAX_IMAGE_SIDE, MAX_IMAGE_SIDE), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    fmt = "PNG" if im.width * im.height <= 128 * 128 else "JPEG"
    im.save(buf, format=fmt, **({"quality": 88} if fmt == "JPEG" else {}))
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}", im.size


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return html.escape(str(value))


def _flatten(metrics: dict, prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        rows += _flatten(value, name + " / ") if isinstance(value, dict) else [(name, value)]
    return rows


def _metrics_table(metrics: dict) -> str:
    """One row per top-level key (its nested metrics side by side), then the loose top-level values."""
    groups = [(k, _flatten(v)) for k, v in metrics.items() if isinstance(v, dict)]
    loose = [(k, v) for k, v in metrics.items() if not isinstance(v, dict)]
    if loose:
        groups.append(("", loose))
    rows = "".join(f"<tr><th>{html.escape(str(group))}</th><td>"
                   + " ".join(f'<span class="metric">{html.escape(str(k))} <b>{_fmt(v)}</b></span>' for k, v in items)
                   + "</td></tr>" for group, items in groups if items)
    return f'<table id="metrics">{rows}</table>' if rows else "<p>(no metrics)</p>"


def _score_attr(score: float | None) -> str:
    return "" if score is None or math.isnan(score) else repr(float(score))


def _score_class(score: float | None) -> str:
    if score is None or math.isnan(score):
        return "none"
    return "good" if score >= 0.999 else "bad" if score <= 0.001 else "mid"


def _tokens(sample: int, part: int, tokens: list[str]) -> str:
    """Hoverable token spans; ``part`` -1 is the caption, k >= 0 the answer to question k."""
    return " ".join(f'<span class="tok" data-s="{sample}" data-p="{part}" data-t="{t}">{html.escape(tok)}</span>'
                    for t, tok in enumerate(tokens))


def _card(index: int, sample: dict) -> str:
    uri, (width, height) = _image_uri(sample["image"])
    crisp = ' class="pixelated"' if SHOWN_SIDE >= 2 * max(width, height) else ""  # small images: no blur
    width, height = (round(side * SHOWN_SIDE / max(width, height)) for side in (width, height))
    score = sample.get("score")
    score_text = "no score" if score is None else _fmt(float(score))
    caption = sample.get("caption")
    refs = "".join(f"<li>{html.escape(r)}</li>" for r in sample.get("references", []))
    rows = "".join(
        f'<tr class="{_score_class(q.get("score"))}"><td>{html.escape(q["question"])}</td>'
        f'<td>{_tokens(index, k, q.get("tokens", [])) or html.escape(q.get("answer", ""))}</td>'
        f'<td>{html.escape(", ".join(q.get("truth", [])))}</td><td>{_fmt(q.get("score", ""))}</td></tr>'
        for k, q in enumerate(sample.get("questions", [])))
    questions = (f'<table class="qa"><tr><th>question</th><th>answer</th><th>truth</th><th>score</th></tr>'
                 f"{rows}</table>") if rows else ""
    caption_html = (_tokens(index, -1, sample.get("tokens", [])) or html.escape(caption)) if caption else \
        "<em>(no caption)</em>"
    search = " ".join([str(sample["id"]), caption or "", *sample.get("references", []),
                       *(q["question"] + " " + q.get("answer", "") for q in sample.get("questions", []))]).lower()
    return f"""<article class="sample" data-index="{index}" data-score="{_score_attr(score)}"
 data-id="{html.escape(str(sample['id']))}" data-search="{html.escape(search)}">
<figure><div class="frame" style="width:{width}px;height:{height}px">
<img{crisp} src="{uri}" alt="{html.escape(str(sample['id']))}"><canvas width="{width}" height="{height}"></canvas>
</div><figcaption class="label">image</figcaption></figure>
<div class="body"><h3>{html.escape(str(sample['id']))}
<span class="score">{score_text}</span></h3>
<p class="caption">{caption_html}</p>
{f'<details><summary>references</summary><ul class="refs">{refs}</ul></details>' if refs else ''}
{questions}</div></article>"""


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.2em; color: #222; }
#metrics { border-collapse: collapse; margin-bottom: 1em; }
#metrics th, #metrics td { border: 1px solid #ddd; padding: 0.2em 0.6em; text-align: left; }
.metric { display: inline-block; margin-right: 1.2em; white-space: nowrap; }
.metric b { font-family: monospace; }
.controls { position: sticky; top: 0; background: #fff; padding: 0.5em 0; border-bottom: 1px solid #ccc;
            display: flex; gap: 1em; flex-wrap: wrap; align-items: center; z-index: 1; }
.sample { display: flex; gap: 1em; padding: 0.8em 0; border-bottom: 1px solid #eee; }
.sample[hidden] { display: none; }
figure { margin: 0; }
.frame { position: relative; }
.frame img, .frame canvas { position: absolute; left: 0; top: 0; width: 100%; height: 100%; }
.pixelated { image-rendering: pixelated; }
figcaption { font-family: monospace; text-align: center; font-size: 0.85em; }
h3 { margin: 0 0 0.3em; font-size: 1em; }
.score { font-family: monospace; padding: 0 0.3em; border-radius: 3px; background: #eee; }
.good { background: #dff3df; } .mid { background: #fff1cc; } .bad { background: #f8d7d7; } .none { background: #eee; }
.tok { padding: 0 0.15em; border-radius: 3px; cursor: pointer; }
.tok:hover, .tok.pinned { background: #2a7ae2; color: #fff; }
.qa { border-collapse: collapse; font-size: 0.9em; }
.qa td, .qa th { padding: 0.1em 0.5em; text-align: left; }
"""

_SCRIPT = """
"use strict";
const MAPS = JSON.parse(document.getElementById("maps").textContent);
const clamp = (v) => Math.min(1, Math.max(0, v));
const jet = (v) => [3, 2, 1].map((k) => clamp(1.5 - Math.abs(4 * v - k)));  // matplotlib's "jet", as r, g, b
let pinned = null;

function draw(card, map, label) {
  const canvas = card.querySelector("canvas");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  card.querySelector(".label").textContent = label || "image";
  if (!map || !map.length) return;
  const h = map.length, w = map[0].length, flat = map.flat();
  const lo = Math.min(...flat), hi = Math.max(...flat);
  const cells = document.createElement("canvas");
  cells.width = w; cells.height = h;
  const img = cells.getContext("2d").createImageData(w, h);
  flat.forEach((x, i) => {  // the map min-max normalised; cold cells stay see-through, as in vlm attend
    const v = hi > lo ? (x - lo) / (hi - lo) : 0;
    const [r, g, b] = jet(v);
    img.data.set([r * 255, g * 255, b * 255, 0.6 * v * 255], 4 * i);
  });
  cells.getContext("2d").putImageData(img, 0, 0);
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(cells, 0, 0, canvas.width, canvas.height);
}

function mapOf(tok) {
  const m = MAPS[tok.dataset.s], p = Number(tok.dataset.p), t = Number(tok.dataset.t);
  return p < 0 ? m.c[t] : m.q[p][t];
}

function show(tok) {
  draw(tok.closest(".sample"), mapOf(tok), `token ${Number(tok.dataset.t) + 1}: ${tok.textContent}`);
}

function restore(card) {
  if (pinned && pinned.closest(".sample") === card) show(pinned); else draw(card, null);
}

document.querySelectorAll(".tok").forEach((tok) => {
  tok.addEventListener("mouseenter", () => show(tok));
  tok.addEventListener("mouseleave", () => restore(tok.closest(".sample")));
  tok.addEventListener("click", () => {
    const old = pinned;
    if (old) old.classList.remove("pinned");
    pinned = old === tok ? null : tok;
    if (pinned) pinned.classList.add("pinned");
    if (old && old.closest(".sample") !== tok.closest(".sample")) restore(old.closest(".sample"));
    restore(tok.closest(".sample"));
  });
});

const cards = [...document.querySelectorAll(".sample")];
const list = document.getElementById("samples");
const scoreOf = (c) => (c.dataset.score === "" ? null : Number(c.dataset.score));

function update() {
  const order = document.getElementById("sort").value;
  const max = document.getElementById("max-score").value;
  const text = document.getElementById("search").value.trim().toLowerCase();
  const sorted = [...cards].sort((a, b) => {
    if (order === "id") return Number(a.dataset.index) - Number(b.dataset.index);
    const x = scoreOf(a), y = scoreOf(b);
    if (x === null || y === null) return (x === null) - (y === null);  // samples without a score last
    return order === "asc" ? x - y : y - x;
  });
  let shown = 0;
  for (const card of sorted) {
    const score = scoreOf(card);
    card.hidden = (max !== "" && (score === null || score > Number(max))) ||
                  (text !== "" && !card.dataset.search.includes(text));
    shown += !card.hidden;
    list.appendChild(card);
  }
  document.getElementById("shown").textContent = `${shown} of ${cards.length} samples`;
}

["sort", "max-score", "search"].forEach((id) => document.getElementById(id).addEventListener("input", update));
update();
"""

_PAGE = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>{title}</title><style>{style}</style></head>
<body>
<h1>{title}</h1>
<h2>Metrics</h2>
{metrics}
<h2>Samples ({count})</h2>
<div class="controls">
<label>sort <select id="sort"><option value="asc">score, worst first</option>
<option value="desc">score, best first</option><option value="id">as evaluated</option></select></label>
<label>score at most <input id="max-score" type="number" step="any" size="6"></label>
<label>contains <input id="search" type="search"></label>
<span id="shown"></span>
<span>hover a word to see its map, click to pin it</span>
</div>
<div id="samples">
{cards}
</div>
<script type="application/json" id="maps">{maps}</script>
<script>{script}</script>
</body>
</html>
"""
