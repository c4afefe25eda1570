"""The one image loader: every mode to RGB, animations, EXIF, bombs, broken files, bytes and streams."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from vlm.data.images import MAX_PIXELS_ENV, is_single_image, load_image, pixel_limit
from vlm.errors import VLMError


def png_bytes(width: int, height: int, bit_depth: int, colour_type: int, row: bytes, rows: int | None = None) -> bytes:
    """A PNG of identical rows written directly: fast for huge sizes; ``rows`` < height cuts the data short."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    pixels = zlib.compress((b"\x00" + row) * (height if rows is None else rows), 1)  # filter byte 0 before each row
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def pixel(im: Image.Image, xy=(0, 0)) -> tuple[int, int, int]:
    return tuple(np.asarray(im)[xy[1], xy[0]])


@pytest.mark.parametrize("mode", ["1", "L", "P", "CMYK", "I;16", "I", "F", "RGBA", "LA", "YCbCr"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    path = tmp_path / f"im.{'tiff' if mode in ('CMYK', 'I;16', 'I', 'F', 'YCbCr') else 'png'}"
    Image.new("RGB", (5, 4), (200, 30, 30)).convert(mode).save(path)
    im = load_image(path)
    assert im.mode == "RGB" and im.size == (5, 4)


@pytest.mark.parametrize(("mode", "value", "expected"), [
    ("I;16", 65535, 255), ("I;16", 32896, 128), ("I", 65535, 255), ("I", 1 << 20, 255), ("I", -5, 0),
    ("F", 1.0, 255), ("F", 0.5, 128), ("F", 7.0, 255), ("F", float("nan"), 0),
])
def test_high_bit_depth_pixels_are_scaled_to_8_bits(tmp_path, mode, value, expected):
    path = tmp_path / "deep.tiff"
    Image.new(mode, (3, 2), value).save(path)
    assert pixel(load_image(path)) == (expected,) * 3


def test_16_bit_png_is_scaled(tmp_path):
    path = tmp_path / "deep.png"
    path.write_bytes(png_bytes(2, 2, 16, 0, struct.pack(">HH", 65535, 0)))  # 16-bit grayscale
    im = load_image(path)
    assert pixel(im, (0, 0)) == (255, 255, 255) and pixel(im, (1, 0)) == (0, 0, 0)


def test_transparency_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    im = load_image(rgba)
    assert pixel(im, (0, 0)) == (255, 0, 0) and pixel(im, (3, 3)) == (255, 255, 255)
    path = tmp_path / "clear.png"
    Image.new("LA", (2, 2), (0, 0)).save(path)
    assert pixel(load_image(path)) == (255, 255, 255)
    palette = Image.new("P", (2, 2), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0])
    palette.save(path, transparency=0)
    assert pixel(load_image(path)) == (255, 255, 255)
    keyed = Image.new("RGB", (2, 1), (0, 0, 0))  # an RGB PNG whose tRNS colour key makes black transparent
    keyed.putpixel((1, 0), (0, 0, 9))
    keyed.save(path, transparency=(0, 0, 0))
    assert pixel(load_image(path), (0, 0)) == (255, 255, 255) and pixel(load_image(path), (1, 0)) == (0, 0, 9)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animations_give_their_first_frame(tmp_path, fmt):
    path = tmp_path / f"anim.{fmt.lower()}"
    red, blue, green = (Image.new("RGB", (6, 6), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)])
    red.save(path, format=fmt, save_all=True, append_images=[blue, green], duration=50, loop=0, lossless=True)
    with Image.open(path) as check:
        assert getattr(check, "n_frames", 1) == 3
    assert pixel(load_image(path)) == (255, 0, 0)


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.new("RGB", (8, 4)).save(path, exif=exif)
    assert load_image(path).size == (4, 8)
    assert load_image(path.read_bytes()).size == (4, 8)
    with Image.open(path) as opened:  # a PIL image the caller opened
        assert load_image(opened).size == (4, 8)


@pytest.mark.parametrize("content", [b"", b"not an image at all", "png", "jpeg", "gif", b"GIF89a\x10\x00\x10\x00"])
def test_unreadable_files_name_the_file(tmp_path, content):
    path = tmp_path / "broken.img"
    if isinstance(content, str):  # a real image cut short
        Image.effect_noise((64, 64), 50).convert("RGB").save(path, format=content)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(VLMError, match=r"broken\.img: cannot read image") as info:
        load_image(path)
    assert "\n" not in str(info.value)


def test_missing_file_and_directory_name_the_path(tmp_path):
    with pytest.raises(VLMError, match="nope.png: no such image file"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(VLMError, match="is a directory, not an image file"):
        load_image(tmp_path)


def test_bytes_and_file_objects_go_through_the_same_checks(tmp_path):
    path = tmp_path / "a.png"
    Image.new("P", (3, 5), 0).save(path)
    expected = np.asarray(load_image(path))
    np.testing.assert_array_equal(np.asarray(load_image(path.read_bytes())), expected)
    np.testing.assert_array_equal(np.asarray(load_image(bytearray(path.read_bytes()))), expected)
    with open(path, "rb") as fh:
        np.testing.assert_array_equal(np.asarray(load_image(fh)), expected)
    with pytest.raises(VLMError, match=r"^<bytes>: cannot read image"):
        load_image(b"\x89PNG junk")
    with pytest.raises(VLMError, match=r"^upload\.png: cannot read image"):
        load_image(io.BytesIO(b"junk"), name="upload.png")
    with pytest.raises(VLMError, match=r"^<bytes>: 4 x 5 = 20 pixels exceeds the limit of 10"):
        load_image(png_bytes(4, 5, 8, 0, bytes(4)), max_pixels=10)
    assert all(map(is_single_image, ["a.png", path, b"x", io.BytesIO(), Image.new("L", (1, 1))]))
    assert not is_single_image([path, path])


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    bomb = tmp_path / "bomb.png"  # declares 10^10 pixels in a few bytes; decoding it would need 30 GB
    bomb.write_bytes(png_bytes(100_000, 100_000, 1, 0, bytes(12_500), rows=10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's own DecompressionBombWarning must not leak
        with pytest.raises(VLMError, match=r"bomb\.png: .*pixels exceeds the limit"):
            load_image(bomb)


def test_pixel_limit_is_configurable(tmp_path, monkeypatch):
    path = tmp_path / "wide.png"
    Image.new("RGB", (11, 10)).save(path)
    with pytest.raises(VLMError, match=r"wide\.png: 11 x 10 = 110 pixels exceeds the limit of 100 \(raise "
                                        r"max_pixels to allow it\)"):  # the variable would not override it
        load_image(path, max_pixels=100)
    assert load_image(path, max_pixels=110).size == (11, 10)
    monkeypatch.setenv(MAX_PIXELS_ENV, "100")
    assert pixel_limit() == 100 and pixel_limit(500) == 500
    with pytest.raises(VLMError, match=r"exceeds the limit of 100 \(set VLM_MAX_PIXELS to allow it\)"):
        load_image(path)
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(VLMError, match="VLM_MAX_PIXELS: expected a positive number of pixels, got 'lots'"):
        load_image(path)
    with pytest.raises(VLMError, match="max_pixels: expected a positive number of pixels, got 0"):
        load_image(path, max_pixels=0)


def test_a_one_pixel_image_loads(tmp_path):
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (9, 8, 7)).save(path)
    im = load_image(path)
    assert im.size == (1, 1) and pixel(im) == (9, 8, 7)


def test_a_10000_by_10000_image_loads_quietly(tmp_path):
    path = tmp_path / "huge.png"  # 10^8 pixels, more than PIL's own warning threshold
    path.write_bytes(png_bytes(10_000, 10_000, 1, 0, b"\xff" * 1250))  # 1-bit white: 70 kB, 2 s to load
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        im = load_image(path)
    assert im.size == (10_000, 10_000) and im.mode == "RGB" and pixel(im, (9_999, 9_999)) == (255, 255, 255)
