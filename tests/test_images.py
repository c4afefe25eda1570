import numpy as np
import pytest
from PIL import Image

from vlm.data.images import load_image
from vlm.errors import VLMError


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "I;16", "RGBA", "LA"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    path = tmp_path / f"im.{'tiff' if mode in ('CMYK', 'I;16') else 'png'}"
    Image.new("RGB", (5, 4), (200, 30, 30)).convert(mode).save(path)
    im = load_image(path)
    assert im.mode == "RGB" and im.size == (5, 4)


def test_transparency_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    im = np.asarray(load_image(rgba))
    assert tuple(im[0, 0]) == (255, 0, 0) and tuple(im[3, 3]) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.new("RGB", (8, 4)).save(path, exif=exif)
    assert load_image(path).size == (4, 8)


@pytest.mark.parametrize("content", [b"", b"not an image at all", None])
def test_unreadable_files_name_the_file(tmp_path, content):
    path = tmp_path / "broken.png"
    if content is None:  # a truncated PNG
        Image.new("RGB", (64, 64), (1, 2, 3)).save(path)
        path.write_bytes(path.read_bytes()[:60])
    else:
        path.write_bytes(content)
    with pytest.raises(VLMError, match="broken.png"):
        load_image(path)


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(VLMError, match="nope.png: no such image file"):
        load_image(tmp_path / "nope.png")
