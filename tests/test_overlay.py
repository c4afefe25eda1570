"""Behavioural tests for vlm.grounding: grid-to-pixel maps, grounding metrics and attention rendering."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlm.grounding import (
    combine,
    overlay,
    peak,
    pixel_mass_in_box,
    pointing_hit,
    safe_name,
    token_grid,
    upsample,
    write_attention,
)
from vlm.train.module import grid_mass_in_boxes

# (image size (W, H), grid (h, w)): non-square, exact and non-integer pixels-per-cell ratios.
GEOMETRIES = [((64, 48), (6, 8)), ((70, 45), (5, 7)), ((48, 64), (4, 4))]
CELLS = [(0, 0), (1, 2), (-1, -1)]


def one_hot(grid: tuple[int, int], cell: tuple[int, int]) -> np.ndarray:
    """A grid map with all attention on ``cell`` (negative indices count from the end)."""
    map_ = np.zeros(grid)
    map_[cell] = 1.0
    return map_


def cell_box(size: tuple[int, int], grid: tuple[int, int], cell: tuple[int, int]) -> tuple[float, ...]:
    """COCO box ``(x, y, w, h)`` of the pixels covered by grid ``cell``."""
    (width, height), (rows, cols) = size, grid
    r, c = cell[0] % rows, cell[1] % cols
    cw, ch = width / cols, height / rows
    return (c * cw, r * ch, cw, ch)


def noise_image(size: tuple[int, int]) -> Image.Image:
    """A deterministic mid-grey noise image, so blending changes are visible in every channel."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(90, 166, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


@pytest.mark.parametrize(("size", "grid"), GEOMETRIES)
def test_upsample_shape_and_range(size: tuple[int, int], grid: tuple[int, int]) -> None:
    map_ = np.random.default_rng(1).random(grid)
    up = upsample(map_, size)
    assert up.shape == (size[1], size[0])
    assert up.min() == pytest.approx(0.0)
    assert up.max() == pytest.approx(1.0)


def test_upsample_constant_map_is_zero() -> None:
    assert not upsample(np.full((6, 8), 0.3), (64, 48)).any()


@pytest.mark.parametrize(("size", "grid"), GEOMETRIES)
def test_upsample_matches_torch_bilinear(size: tuple[int, int], grid: tuple[int, int]) -> None:
    torch = pytest.importorskip("torch")
    map_ = np.random.default_rng(2).random(grid)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(map_)[None, None], size=(size[1], size[0]), mode="bilinear", align_corners=False
    )[0, 0].numpy()
    ref = (ref - ref.min()) / (ref.max() - ref.min())
    np.testing.assert_allclose(upsample(map_, size), ref, atol=1e-9)


@pytest.mark.parametrize(("size", "grid"), GEOMETRIES)
@pytest.mark.parametrize("cell", CELLS)
def test_peak_and_pointing_game(size: tuple[int, int], grid: tuple[int, int], cell: tuple[int, int]) -> None:
    map_ = one_hot(grid, cell)
    x, y, w, h = cell_box(size, grid, cell)
    px, py = peak(map_, size)
    assert x <= px <= x + w and y <= py <= y + h
    assert pointing_hit(map_, (x, y, w, h), size)
    far = (cell[0] + grid[0] // 2, cell[1] + grid[1] // 2)
    assert not pointing_hit(map_, cell_box(size, grid, far), size)


@pytest.mark.parametrize(("size", "grid"), GEOMETRIES)
@pytest.mark.parametrize("cell", CELLS)
def test_mass_in_box_one_hot(size: tuple[int, int], grid: tuple[int, int], cell: tuple[int, int]) -> None:
    map_ = one_hot(grid, cell)
    x, y, w, h = cell_box(size, grid, cell)
    # Bilinear upsampling spreads a cell's mass at most one cell further: its 3x3 neighbourhood holds it all.
    neighbourhood = (x - w, y - h, 3 * w, 3 * h)
    assert pixel_mass_in_box(map_, neighbourhood, size) == pytest.approx(1.0)
    assert pixel_mass_in_box(map_, (0, 0, *size), size) == pytest.approx(1.0)
    own = pixel_mass_in_box(map_, (x, y, w, h), size)
    assert own > 0.5
    others = [
        pixel_mass_in_box(map_, cell_box(size, grid, (r, c)), size)
        for r in range(grid[0])
        for c in range(grid[1])
        if (r, c) != (cell[0] % grid[0], cell[1] % grid[1])
    ]
    assert own > max(others)


def test_mass_in_box_uniform_and_empty() -> None:
    size = (64, 48)
    assert pixel_mass_in_box(np.ones((6, 8)), (0, 0, 32, 48), size) == pytest.approx(0.5)
    assert pixel_mass_in_box(np.zeros((6, 8)), (0, 0, 32, 48), size) == 0.0


def test_grid_and_pixel_mass_in_box_agree_for_a_box_on_patch_boundaries() -> None:
    """The loss's share on the grid equals the benchmark's on upsampled pixels when the box lies on patch
    boundaries and the map is the same on both sides of each of its edges (bilinear upsampling then moves as much
    mass into the box as out of it)."""
    (h, w), size = (6, 8), (80, 48)  # cells of 10 x 8 pixels
    (r0, r1), (c0, c1) = (1, 4), (2, 6)  # the box: cell rows 1-3, cell columns 2-5
    map_ = np.random.default_rng(0).uniform(0.1, 1.0, (h, w))
    map_[r0 - 1], map_[r1] = map_[r0], map_[r1 - 1]
    map_[:, c0 - 1], map_[:, c1] = map_[:, c0], map_[:, c1 - 1]
    map_ /= map_.sum()  # an attention map: its weights sum to 1
    box = (c0 * 10, r0 * 8, (c1 - c0) * 10, (r1 - r0) * 8)
    pixel = pixel_mass_in_box(map_, box, size)
    assert abs(pixel - (r1 - r0) * (c1 - c0) / (h * w)) > 0.01  # not the area's share: the map is not uniform
    attention = [torch.tensor(map_).view(1, 1, 1, h * w)]  # one layer's (sequences, heads, positions, patches)
    boxes = torch.tensor([box], dtype=torch.float64)
    grid = grid_mass_in_boxes(attention, [0], torch.tensor([[0, 0]]), boxes, (h, w), size)
    assert grid.item() == pytest.approx(pixel, abs=1e-12)


def test_combine_is_mean_over_leading_axis() -> None:
    maps = np.stack([one_hot((2, 3), (0, 0)), one_hot((2, 3), (1, 2))])
    expected = np.array([[0.5, 0, 0], [0, 0, 0.5]])
    np.testing.assert_allclose(combine(maps), expected)


@pytest.mark.parametrize(("size", "grid"), GEOMETRIES)
def test_overlay_changes_hot_region_most(size: tuple[int, int], grid: tuple[int, int]) -> None:
    image = noise_image(size)
    cell = (1, 2)
    out = overlay(image, one_hot(grid, cell), alpha=0.6)
    assert out.size == image.size and out.mode == "RGB"
    diff = np.abs(np.asarray(out, dtype=float) - np.asarray(image, dtype=float)).sum(axis=2)
    x, y, w, h = cell_box(size, grid, cell)
    hot = diff[int(y + h / 2), int(x + w / 2)]
    far = cell_box(size, grid, (-1, -1))
    cold = diff[int(far[1] + far[3] / 2), int(far[0] + far[2] / 2)]
    assert hot > 50 and cold < 5
    assert overlay(image, one_hot(grid, cell), alpha=0.0) == image


def test_token_grid_is_readable_for_tiny_images() -> None:
    image = noise_image((64, 64))
    maps = np.random.default_rng(3).random((3, 4, 4))
    grid = token_grid(image, ["a", "$x$", "cat"], maps, title="what? -> a cat")
    assert grid.mode == "RGB"
    assert min(grid.size) >= 350  # 2 x 2 panels of ~2 inches at 100 dpi


@pytest.mark.parametrize(
    ("token", "expected"),
    [("cat", "cat"), ("../../etc/passwd", "______etc_passwd"), ("a/b", "a_b"), ("", "_"), ("é", "_")],
)
def test_safe_name(token: str, expected: str) -> None:
    assert safe_name(token) == expected


def test_safe_name_length_limit() -> None:
    assert len(safe_name("x" * 100)) == 40


@pytest.mark.parametrize("question", [None, "what is it?"])
def test_write_attention_files_and_json(tmp_path, question: str | None) -> None:
    image = noise_image((64, 48))
    tokens = ["a", "../../etc/passwd", "a/b", "cat"]
    maps = np.random.default_rng(4).random((len(tokens), 6, 8))
    out_dir = tmp_path / "run" / "sample"

    result = write_attention(out_dir, image, tokens, maps, text="a cat", question=question, extra={"id": 7})

    expected_files = [
        "token_00_a.png",
        "token_01_______etc_passwd.png",
        "token_02_a_b.png",
        "token_03_cat.png",
    ]
    assert result["files"] == expected_files
    assert result["dir"] == str(out_dir)
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert written == sorted(f"run/sample/{n}" for n in [*expected_files, "grid.png", "attention.json"])
    for name in expected_files:
        with Image.open(out_dir / name) as png:
            assert min(png.size) >= 256

    data = json.loads((out_dir / "attention.json").read_text(encoding="utf-8"))
    assert data == {k: v for k, v in result.items() if k != "dir"}
    assert data["text"] == "a cat" and data["question"] == question and data["id"] == 7
    assert data["tokens"] == tokens
    assert data["grid"] == [6, 8] and data["image_size"] == [64, 48]
    np.testing.assert_allclose(np.array(data["maps"]), maps, atol=1e-6)


def test_write_attention_rejects_length_mismatch(tmp_path) -> None:
    image = noise_image((64, 48))
    with pytest.raises(ValueError, match=r"3 tokens.*2 maps"):
        write_attention(tmp_path, image, ["a", "b", "c"], np.zeros((2, 6, 8)), text="a b c")
    assert not any(tmp_path.iterdir())


def test_write_attention_rejects_clobbering_extra(tmp_path) -> None:
    with pytest.raises(ValueError, match="tokens"):
        write_attention(
            tmp_path, noise_image((64, 48)), ["a"], np.ones((1, 6, 8)), text="a", extra={"tokens": 1}
        )
