"""Rendering of per-token attention maps: heat-map overlays, token grids and on-disk attention dumps.

Matplotlib is used only through ``Figure`` + ``FigureCanvasAgg`` (never pyplot), so rendering is
thread-safe, headless and leaves no global figure state behind.
"""

from __future__ import annotations

import json
import math
import os
import re
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from vlm.grounding.maps import upsample

MIN_DISPLAY_SIDE = 256
PANEL_INCHES = 2.0
DPI = 100
MAX_NAME_LEN = 40
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def _rgb_array(image: Image.Image) -> np.ndarray:
    """The image as a float ``(H, W, 3)`` array in ``[0, 1]``, whatever its PIL mode."""
    return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0


def overlay(image: Image.Image, map_: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> Image.Image:
    """Blend the colourised, upsampled ``map_`` over ``image``; returns an RGB image of the same size.

    The blend weight of each pixel is ``alpha * m`` with ``m`` the normalised map value, so cold regions
    leave the image visible and only attended regions take the colormap's colour.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    heat = upsample(map_, image.size)
    colour = matplotlib.colormaps[cmap](heat)[..., :3]
    weight = (alpha * heat)[..., None]
    blended = _rgb_array(image) * (1.0 - weight) + colour * weight
    return Image.fromarray(np.clip(np.rint(blended * 255.0), 0, 255).astype(np.uint8), mode="RGB")


def _display_image(image: Image.Image, min_side: int = MIN_DISPLAY_SIDE) -> Image.Image:
    """RGB copy of ``image`` scaled up (bicubic, aspect kept) so its short side is at least ``min_side``.

    Tiny inputs (e.g. 64x64) would otherwise be unreadable once drawn; the map is then upsampled
    straight to this display size, which is smoother than enlarging a finished overlay.
    """
    rgb = image.convert("RGB")
    short = min(rgb.size)
    if short >= min_side:
        return rgb
    scale = min_side / short
    size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
    return rgb.resize(size, Image.Resampling.BICUBIC)


def _check_maps(tokens: Sequence[str], maps: np.ndarray) -> np.ndarray:
    """``maps`` as a float ``(T, h, w)`` array with ``T == len(tokens)``; raises ValueError otherwise."""
    arr = np.asarray(maps, dtype=np.float64)
    if arr.ndim != 3:
        raise ValueError(f"maps must have shape (T, h, w), got {arr.shape}")
    if arr.shape[0] != len(tokens):
        raise ValueError(f"got {len(tokens)} tokens but {arr.shape[0]} maps")
    return arr


def _figure_to_image(fig: Figure) -> Image.Image:
    """Render a matplotlib figure with the Agg canvas and return it as an RGB PIL image."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return Image.fromarray(rgba[..., :3].copy(), mode="RGB")


def token_grid(
    image: Image.Image,
    tokens: Sequence[str],
    maps: np.ndarray,
    title: str | None = None,
    cols: int | None = None,
) -> Image.Image:
    """One figure with the original image (panel "image") followed by one overlay panel per token.

    Panels are laid out ``cols`` wide (default ``ceil(sqrt(T + 1))``) at about 2 inches each; titles are
    drawn literally (no mathtext), so tokens such as ``$x$`` cannot break rendering.
    """
    arr = _check_maps(tokens, maps)
    n_panels = len(tokens) + 1
    cols = cols if cols is not None else math.ceil(math.sqrt(n_panels))
    if cols < 1:
        raise ValueError(f"cols must be positive, got {cols}")
    cols = min(cols, n_panels)
    rows = math.ceil(n_panels / cols)
    shown = _display_image(image)
    panels = [("image", shown)] + [(tok, overlay(shown, m)) for tok, m in zip(tokens, arr, strict=True)]

    title_inches = 0.5 if title else 0.0
    fig = Figure(
        figsize=(cols * PANEL_INCHES, rows * PANEL_INCHES + title_inches), dpi=DPI, layout="constrained"
    )
    for k, (label, panel) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.imshow(np.asarray(panel))
        ax.set_title(label, fontsize=9, parse_math=False)
        ax.set_axis_off()
    if title:
        wrapped = textwrap.fill(title, width=max(20, int(cols * PANEL_INCHES * 10)))
        fig.suptitle(wrapped, fontsize=10, parse_math=False)
    return _figure_to_image(fig)


def safe_name(token: str) -> str:
    """Filename-safe form of ``token``: ASCII letters, digits, '-' and '_' only, never empty, <= 40 chars.

    Every other character (including '/', '\\' and '.') becomes '_', so the result can never name a
    parent directory or an absolute path.
    """
    return _UNSAFE.sub("_", token)[:MAX_NAME_LEN] or "_"


def _json_default(value: Any) -> Any:
    """Make numpy scalars and arrays found in ``extra`` JSON-serialisable."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"object of type {type(value).__name__} is not JSON serialisable")


def write_attention(
    out_dir: str | os.PathLike,
    image: Image.Image,
    tokens: Sequence[str],
    maps: np.ndarray,
    *,
    text: str,
    question: str | None = None,
    extra: dict | None = None,
) -> dict[str, Any]:
    """Write per-token overlays, a ``grid.png`` and ``attention.json`` into ``out_dir``; return the JSON dict.

    Per-token files are named ``token_{i:02d}_{safe_name(token)}.png``; all files are written inside
    ``out_dir`` only. ``extra`` keys are added to the JSON but may not replace the standard ones. The
    returned dict is the JSON content plus ``"dir"`` (the output folder as a string).
    """
    arr = _check_maps(tokens, maps)
    record: dict[str, Any] = {
        "text": text,
        "question": question,
        "tokens": list(tokens),
        "grid": [int(arr.shape[1]), int(arr.shape[2])],
        "image_size": [int(image.width), int(image.height)],
        "maps": np.round(arr, 6).tolist(),
        "files": [f"token_{i:02d}_{safe_name(tok)}.png" for i, tok in enumerate(tokens)],
    }
    clash = sorted(set(extra or {}) & (set(record) | {"dir"}))
    if clash:
        raise ValueError(f"extra keys would overwrite standard attention.json keys: {clash}")
    record.update(extra or {})

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shown = _display_image(image)
    for name, map_ in zip(record["files"], arr, strict=True):
        overlay(shown, map_).save(out / name)
    grid_title = f"{question} -> {text}" if question else text
    token_grid(image, tokens, arr, title=grid_title).save(out / "grid.png")
    with open(out / "attention.json", "w", encoding="utf-8") as fh:
        json.dump(record, fh, default=_json_default, ensure_ascii=False)
    return {**record, "dir": str(out)}
