"""``decode_image``: every image mode PIL opens becomes exactly what training sees, one test per row of the
README's mode table, with images the tests make."""

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data import decode_image, load_image_data

WHITE, RED = (255, 255, 255), (255, 0, 0)


def roundtrip(img: Image.Image, fmt: str = "PNG", **save) -> Image.Image:
    """The image as a file would give it back."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return Image.open(io.BytesIO(buf.getvalue()))


def rgba_with_hidden_colour() -> Image.Image:
    """Left half opaque blue; right half fully transparent, storing green under the alpha (what emoji PNGs do)."""
    arr = np.zeros((4, 8, 4), np.uint8)
    arr[:, :4] = (0, 0, 255, 255)
    arr[:, 4:] = (0, 255, 0, 0)
    return Image.fromarray(arr, "RGBA")


@pytest.mark.parametrize("background", [WHITE, RED])
def test_rgba_is_composited_over_the_background(background):
    img, to_grey = decode_image(roundtrip(rgba_with_hidden_colour()), 3, background)
    arr = np.asarray(img)
    assert img.mode == "RGB" and not to_grey
    assert (arr[:, :4] == (0, 0, 255)).all() and (arr[:, 4:] == background).all()  # never the stored green


def test_half_transparent_pixels_blend():
    arr = np.zeros((2, 2, 4), np.uint8)
    arr[..., :3], arr[..., 3] = (0, 0, 0), 128  # half-transparent black over white: mid grey
    img, _ = decode_image(Image.fromarray(arr, "RGBA"), 3)
    assert np.abs(np.asarray(img).astype(int) - 127).max() <= 1


def test_grey_with_alpha_stays_grey():
    arr = np.zeros((4, 4, 2), np.uint8)
    arr[:2] = (0, 255)  # opaque black
    arr[2:] = (77, 0)  # transparent, storing 77
    img, to_grey = decode_image(roundtrip(Image.fromarray(arr, "LA")), 1)
    assert img.mode == "L" and not to_grey
    assert (np.asarray(img)[:2] == 0).all() and (np.asarray(img)[2:] == 255).all()


def test_palette_transparency_is_honoured():
    pal = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    pal.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)  # index 0 blue, index 1 green (transparent)
    img, _ = decode_image(roundtrip(pal, transparency=1), 3)
    assert (np.asarray(img) == np.array([[(0, 0, 255), WHITE], [WHITE, (0, 0, 255)]])).all()
    opaque, _ = decode_image(roundtrip(pal), 3)  # no transparency: the stored green shows
    assert tuple(np.asarray(opaque)[0, 1]) == (0, 255, 0)


def test_16_bit_grey_is_scaled_by_its_range_not_saturated():
    arr = np.array([[0, 257, 32896, 65535]], np.uint16)
    src = roundtrip(Image.fromarray(arr))
    assert src.mode.startswith("I")
    img, _ = decode_image(src, 1)
    assert np.asarray(img).tolist() == [[0, 1, 128, 255]]  # convert("L") would give 255 for all but 0


def test_float_images_are_scaled_by_their_range():
    unit, _ = decode_image(Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F"), 1)
    assert np.asarray(unit).tolist() == [[0, 128, 255]]
    wide, _ = decode_image(Image.fromarray(np.array([[-2.0, 0.0, 2.0]], np.float32), "F"), 1)
    assert np.asarray(wide).tolist() == [[0, 128, 255]]


def test_32_bit_integers_by_the_range_that_holds_them():
    img, _ = decode_image(Image.fromarray(np.array([[0, 100, 255]], np.int32), "I"), 1)
    assert np.asarray(img).tolist() == [[0, 100, 255]]


def test_cmyk_and_ycbcr_are_converted_to_rgb():
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # red in CMYK
    img, _ = decode_image(roundtrip(cmyk, "JPEG", quality=100), 3)
    assert img.mode == "RGB" and np.abs(np.asarray(img).astype(int) - RED).max() <= 8
    ycc, _ = decode_image(Image.new("RGB", (4, 4), RED).convert("YCbCr"), 3)
    assert np.abs(np.asarray(ycc).astype(int) - RED).max() <= 3


def test_exif_orientation_is_applied():
    arr = np.zeros((10, 20), np.uint8)
    arr[:, :10] = 255  # wide image, bright left half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    img, _ = decode_image(roundtrip(Image.fromarray(arr, "L"), "JPEG", exif=exif, quality=100), 1)
    out = np.asarray(img)
    assert img.size == (10, 20)  # tall now
    assert out[:10].mean() > 200 and out[10:].mean() < 50  # the bright half is on top


def test_one_bit_and_grey_to_rgb_are_lossless():
    bits, _ = decode_image(Image.fromarray(np.array([[0, 1]], bool)).convert("1"), 1)
    assert np.asarray(bits).tolist() == [[0, 255]]
    grey = Image.fromarray(np.array([[3, 200]], np.uint8), "L")
    rgb, to_grey = decode_image(grey, 3)
    assert rgb.mode == "RGB" and not to_grey and (np.asarray(rgb)[..., 0] == np.asarray(grey)).all()
    assert (np.asarray(rgb)[..., 0] == np.asarray(rgb)[..., 2]).all()


def test_colour_to_grey_is_flagged():
    img, to_grey = decode_image(Image.new("RGB", (2, 2), RED), 1)
    assert img.mode == "L" and to_grey and np.asarray(img)[0, 0] == 76  # ITU-R 601 luma of red


def test_a_folder_mixing_modes_trains_in_colour_and_counts_grey_conversions(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        rgba_with_hidden_colour().resize((16, 16)).save(tmp_path / cls / "rgba.png")
        Image.new("L", (16, 16), 40).save(tmp_path / cls / "grey.png")
        Image.fromarray(np.full((16, 16), 40000, np.uint16)).save(tmp_path / cls / "deep.png")
        Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / cls / "cmyk.jpg")
        pal = Image.new("P", (16, 16), 0)
        pal.putpalette([10, 20, 30] + [0] * 765)
        pal.save(tmp_path / cls / "pal.png")
    data = load_image_data(DataConfig(source="folder", path=str(tmp_path), image_size=16, channels=3,
                                      holdout_fraction=0.2))
    assert len(data.train) + len(data.holdout) == 10 and data.num_classes == 2
    with pytest.warns(UserWarning, match=r"converted 6 colour image\(s\) to grey \(data.channels=1"):
        grey = load_image_data(DataConfig(source="folder", path=str(tmp_path), image_size=16, channels=1,
                                          holdout_fraction=0.2))
    assert grey.train.all_pixels().shape[1] == 1
