"""Attention maps over the encoder's patch grid, mapped back onto image pixels.

A *map* is a non-negative float array of shape ``(h, w)`` over the patch grid (rows, cols). The image
was resized (not cropped) to the model input, so the grid covers the whole image: cell ``(r, c)``
covers pixels ``x in [c*W/w, (c+1)*W/w)`` and ``y in [r*H/h, (r+1)*H/h)`` for an image of size
``(W, H)``. Pixel coordinates are continuous, pixel ``(i, j)`` (row, col) spanning ``[j, j+1) x [i, i+1)``,
which matches the `PixelBox` ``(x, y, w, h)`` that the grounding metrics below take.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np

from vlm.data.boxes import PixelBox


def _as_map(map_: np.ndarray) -> np.ndarray:
    """Return ``map_`` as a float64 2-D array, rejecting anything that is not a single (h, w) map."""
    arr = np.asarray(map_, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"expected a non-empty (h, w) map, got shape {arr.shape}")
    return arr


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    """Validate an image size ``(W, H)`` and return it as ints."""
    width, height = int(size[0]), int(size[1])
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive (W, H), got {size}")
    return width, height


@functools.lru_cache(maxsize=1024)
def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Linear-interpolation matrix ``(n_out, n_in)`` with cell centres aligned (``align_corners=False``), read-only
    (kept for the next map of the same sizes).

    Output sample ``i`` reads source position ``(i + 0.5) * n_in / n_out - 0.5``, clamped to the valid
    range exactly like ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``.
    """
    src = _sources(n_in, n_out)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    mat = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    np.add.at(mat, (rows, lo), 1.0 - frac)
    np.add.at(mat, (rows, hi), frac)
    mat.flags.writeable = False
    return mat


def _sources(n_in: int, n_out: int) -> np.ndarray:
    """The source position (ascending, clamped to ``[0, n_in - 1]``) each of n_out output samples reads."""
    return np.clip((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)


def resize(map_: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinearly resize a grid map to pixel resolution ``(H, W)`` for ``size=(W, H)``, without normalising.

    Separable interpolation as two small matrix products; values keep their scale so that mass ratios
    (see :func:`pixel_mass_in_box`) stay meaningful.
    """
    arr = _as_map(map_)
    width, height = _check_size(size)
    return _interp_matrix(arr.shape[0], height) @ arr @ _interp_matrix(arr.shape[1], width).T


def upsample(map_: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Upsample a grid map to ``(H, W)`` for ``size=(W, H)`` and min-max normalise it to ``[0, 1]``.

    A constant map carries no spatial information, so it becomes all zeros rather than all ones.
    """
    up = resize(map_, size)
    lo, hi = float(up.min()), float(up.max())
    if not hi > lo:
        return np.zeros_like(up)
    return (up - lo) / (hi - lo)


def peak(map_: np.ndarray, size: tuple[int, int], upsampled: bool = True) -> tuple[float, float]:
    """Pixel coordinates ``(x, y)`` of the map's maximum: the centre of the argmax pixel of the bilinearly
    upsampled map, or with ``upsampled=False`` the centre of the argmax grid cell.

    Ties resolve to the first pixel (or cell) in row-major order (pixels whose values differ by rounding alone may
    count as tied or not). The upsampled map is evaluated only at the pixels that can hold its maximum
    (`_peak_candidates`), not over the whole image.
    """
    arr = _as_map(map_)
    width, height = _check_size(size)
    if not upsampled:
        row, col = np.unravel_index(int(np.argmax(arr)), arr.shape)
        return (float(col) + 0.5) * width / arr.shape[1], (float(row) + 0.5) * height / arr.shape[0]
    rows, cols = _peak_candidates(arr.shape[0], height), _peak_candidates(arr.shape[1], width)
    up = _interp_matrix(arr.shape[0], height)[rows] @ arr @ _interp_matrix(arr.shape[1], width)[cols].T
    row, col = np.unravel_index(int(np.argmax(up)), up.shape)
    return float(cols[col]) + 0.5, float(rows[row]) + 0.5


@functools.lru_cache(maxsize=1024)
def _peak_candidates(n_in: int, n_out: int) -> np.ndarray:
    """The output samples (ascending) among which a linear interpolation of n_in values to n_out samples
    (`_interp_matrix`) takes its maximum, the first of tied ones included: on each interval between two source
    samples the interpolation is linear, so its largest output there is the one nearest an end of the interval.
    Those are, for every source sample, the last output at or before it and the first at or after it. A bilinear map
    is linear along rows within each interval of columns and along columns within each interval of rows, so the
    first maximum of the whole map lies on a candidate row and a candidate column.
    """
    src = _sources(n_in, n_out)
    knots = np.arange(n_in, dtype=np.float64)
    first = np.searchsorted(src, knots, side="left")  # first output at or after each source sample
    last = np.searchsorted(src, knots, side="right") - 1  # last output at or before it
    found = np.unique(np.concatenate([first, last]))
    found = found[(found >= 0) & (found < n_out)]
    found.flags.writeable = False
    return found


def pointing_hit(map_: np.ndarray, box: PixelBox, size: tuple[int, int], upsampled: bool = True) -> bool:
    """Pointing game: whether the map's `peak` lies inside ``box = (x, y, w, h)`` (edges inclusive)."""
    px, py = peak(map_, size, upsampled)
    x, y, w, h = (float(v) for v in box)
    return x <= px <= x + w and y <= py <= y + h


def _box_mask(box: PixelBox, height: int, width: int) -> np.ndarray:
    """Boolean ``(H, W)`` mask of the pixels whose centres lie inside ``box`` (edges inclusive)."""
    x, y, w, h = (float(v) for v in box)
    xs = np.arange(width, dtype=np.float64) + 0.5
    ys = np.arange(height, dtype=np.float64) + 0.5
    in_x = (xs >= x) & (xs <= x + w)
    in_y = (ys >= y) & (ys <= y + h)
    return in_y[:, None] & in_x[None, :]


def pixel_mass_in_box(map_: np.ndarray, box: PixelBox, size: tuple[int, int]) -> float:
    """Share of the upsampled attention mass inside ``box = (x, y, w, h)``, in ``[0, 1]``: the benchmark's measure.

    The map is resized without min-max normalisation and divided by its total, so the result is the
    fraction of attention that falls on the box. A map with no mass yields 0.

    The grounding loss measures on the patch grid instead (`vlm.train.module.grid_mass_in_boxes`: each patch counted
    by its share of area inside the box), which is exact and differentiable where this is neither; this one scores
    the map as it is drawn over the image. The two agree when the box lies on patch boundaries and the map does not
    change across them (tests/test_overlay.py); bilinear upsampling otherwise moves some mass over the box's edges.
    """
    up = np.clip(resize(map_, size), 0.0, None)
    total = float(up.sum())
    if total <= 0.0:
        return 0.0
    return float(up[_box_mask(box, *up.shape)].sum()) / total


def combine(maps: np.ndarray) -> np.ndarray:
    """Mean over the leading axis, e.g. merging the maps of the several tokens of one phrase."""
    arr = np.asarray(maps, dtype=np.float64)
    if arr.ndim < 1 or arr.shape[0] == 0:
        raise ValueError(f"need at least one map to combine, got shape {arr.shape}")
    return arr.mean(axis=0)


def box_from_map(map_: np.ndarray, size: tuple[int, int], fraction: float = 0.5, resolution: int = 128) -> PixelBox:
    """A box ``(x, y, w, h)`` in pixels around the map's peak: the bounding box of the connected region
    (4-neighbour) of the peak where the upsampled map is at least ``fraction`` of its maximum.

    The region is found on the map resized to at most ``resolution`` pixels on the longer side, then scaled.
    """
    width, height = _check_size(size)
    scale = min(1.0, resolution / max(width, height))
    small = (max(1, round(width * scale)), max(1, round(height * scale)))
    up = resize(map_, small)
    keep = up >= fraction * up.max() if up.max() > 0 else np.ones_like(up, dtype=bool)
    seen = connected_region(keep, np.unravel_index(int(np.argmax(up)), up.shape))
    rows, cols = np.flatnonzero(seen.any(1)), np.flatnonzero(seen.any(0))
    sx, sy = width / small[0], height / small[1]
    x0, y0 = cols[0] * sx, rows[0] * sy
    return float(x0), float(y0), float((cols[-1] + 1) * sx - x0), float((rows[-1] + 1) * sy - y0)


def connected_region(keep: np.ndarray, start: tuple[int, int]) -> np.ndarray:
    """The 4-neighbour connected region of ``keep`` (a boolean (H, W) array) holding ``start`` (which it must hold).

    Grown run by run rather than pixel by pixel: passes take in, by turns, the whole of every row run and of every
    column run of ``keep`` that the region touches, until a pass adds nothing (or the region is all of ``keep``); the
    passes count the turns of a path through the region, not its pixels.
    """
    keep = np.asarray(keep, dtype=bool)
    if not keep[start]:
        raise ValueError(f"the region's start {tuple(start)} is not in it")
    rows, cols = _run_labels(keep), _run_labels(keep.T).T  # (H, W) run numbers, 0 outside keep
    seen = np.zeros_like(keep)
    seen[start] = True
    size, most = 1, int(np.count_nonzero(keep))
    for passes in itertools.count(1):
        labels = cols if passes % 2 == 0 else rows
        touched = np.zeros(int(labels.max()) + 1, dtype=bool)
        touched[labels[seen]] = True
        seen = touched.take(labels)
        grown = int(np.count_nonzero(seen))
        # Done when it holds all of keep, or when a pass adds nothing to what a pass the other way closed.
        if grown == most or (grown == size and passes > 1):
            return seen
        size = grown


def _run_labels(keep: np.ndarray) -> np.ndarray:
    """Each row's maximal runs of True in keep (H, W) numbered 1, 2, ... across the array; 0 where keep is False."""
    padded = np.zeros((keep.shape[0], keep.shape[1] + 1), dtype=bool)  # a False column ends every row's last run
    padded[:, :-1] = keep
    flat = padded.ravel()
    starts = flat & ~np.concatenate(([False], flat[:-1]))
    return (np.cumsum(starts) * flat).reshape(padded.shape)[:, :-1]


def iou(a: PixelBox, b: PixelBox) -> float:
    """Intersection over union of two ``(x, y, w, h)`` boxes."""
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0
