"""Decoding every supported image mode into float32 H×W×C in [0, 1], and refusing bad files."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import vision_si.data.decode as decode_mod
from vision_si.data import decode_image, resize_image
from vision_si.errors import DataError


def png_bytes(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_8bit_gray_is_one_channel_scaled_by_255():
    arr = np.array([[0, 51], [204, 255]], dtype=np.uint8)
    out = decode_image(png_bytes(Image.fromarray(arr)))
    assert out.shape == (2, 2, 1) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, :, 0], arr / 255.0, atol=1e-7)


def test_1bit_becomes_zero_or_one():
    im = Image.fromarray(np.array([[0, 255], [255, 0]], dtype=np.uint8)).convert("1")
    out = decode_image(png_bytes(im))
    np.testing.assert_array_equal(out[:, :, 0], [[0, 1], [1, 0]])


def test_16bit_gray_keeps_its_precision(tmp_path):
    arr = np.array([[0, 100], [40000, 65535]], dtype=np.uint16)
    im = Image.fromarray(arr)
    path = tmp_path / "x16.png"
    im.save(path)
    assert Image.open(path).mode.startswith("I")
    out = decode_image(path)
    np.testing.assert_allclose(out[:, :, 0], arr / 65535.0, rtol=1e-6)
    # 100/65535 would be 0 in 8 bits: the 16-bit value must survive
    assert 0 < out[0, 1, 0] < 1 / 255


def test_palette_gray_gives_one_channel_and_colour_gives_three():
    gray = Image.fromarray(np.array([[0, 128], [200, 255]], dtype=np.uint8)).convert("P")
    gray.putpalette([v for i in range(256) for v in (i, i, i)])
    out = decode_image(png_bytes(gray))
    assert out.shape == (2, 2, 1)
    np.testing.assert_allclose(out[:, :, 0], np.array([[0, 128], [200, 255]]) / 255.0, atol=1e-7)

    colour = Image.new("P", (2, 2))
    colour.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    colour.putpixel((1, 0), 1)
    out = decode_image(png_bytes(colour))
    assert out.shape == (2, 2, 3)
    np.testing.assert_allclose(out[0, 0], [1, 0, 0])
    np.testing.assert_allclose(out[0, 1], [0, 0, 1])


def test_rgb_and_forced_channels():
    arr = np.zeros((2, 2, 3), dtype=np.uint8)
    arr[0, 0] = (255, 0, 0)
    arr[1, 1] = (255, 255, 255)
    data = png_bytes(Image.fromarray(arr))
    assert decode_image(data).shape == (2, 2, 3)
    gray = decode_image(data, channels=1)
    assert gray.shape == (2, 2, 1)
    np.testing.assert_allclose(gray[0, 0, 0], 0.299, atol=1e-6)  # BT.601 luma of pure red
    np.testing.assert_allclose(gray[1, 1, 0], 1.0, atol=1e-6)
    three = decode_image(png_bytes(Image.fromarray(arr[:, :, 0])), channels=3)
    assert three.shape == (2, 2, 3) and np.all(three[..., 0] == three[..., 2])


@pytest.mark.parametrize("alpha", ["composite_black", "composite_white", "drop"])
def test_rgba_alpha_policies(alpha):
    arr = np.zeros((1, 2, 4), dtype=np.uint8)
    arr[0, 0] = (255, 255, 255, 255)  # opaque white
    arr[0, 1] = (128, 128, 128, 128)  # half-transparent mid gray
    out = decode_image(png_bytes(Image.fromarray(arr)), alpha=alpha)
    assert out.shape == (1, 2, 3)
    np.testing.assert_allclose(out[0, 0], 1.0, atol=1e-6)
    a, c = 128 / 255, 128 / 255
    want = {"composite_black": c * a, "composite_white": c * a + (1 - a), "drop": c}[alpha]
    np.testing.assert_allclose(out[0, 1], want, atol=1e-6)


def test_cmyk_jpeg_is_converted_to_rgb():
    im = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # full magenta + yellow = red
    out = decode_image(png_bytes(im, "JPEG", quality=100))
    assert out.shape == (8, 8, 3)
    r, g, b = out[4, 4]
    assert r > 0.9 and g < 0.1 and b < 0.1


def test_float_tiff_in_range_kept_and_out_of_range_rescaled(tmp_path):
    inside = np.array([[0.0, 0.25], [0.5, 1.0]], dtype=np.float32)
    Image.fromarray(inside).save(tmp_path / "in.tif")
    np.testing.assert_allclose(decode_image(tmp_path / "in.tif")[:, :, 0], inside)

    outside = np.array([[-100.0, 0.0], [100.0, 300.0]], dtype=np.float32)  # e.g. Hounsfield-like units
    Image.fromarray(outside).save(tmp_path / "out.tif")
    np.testing.assert_allclose(decode_image(tmp_path / "out.tif")[:, :, 0], (outside + 100) / 400, atol=1e-6)

    Image.fromarray(np.array([[np.nan, 0.0]], dtype=np.float32)).save(tmp_path / "nan.tif")
    with pytest.raises(DataError, match="nan.tif.*NaN"):
        decode_image(tmp_path / "nan.tif")


def test_exif_orientation_rotates_the_pixels():
    arr = np.zeros((2, 3), dtype=np.uint8)
    arr[0, 0] = 255  # a bright top-left pixel in a 2-high, 3-wide image
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: the viewer must rotate 90° clockwise
    out = decode_image(png_bytes(im, "JPEG", quality=100, exif=exif.tobytes()))[:, :, 0]
    assert out.shape == (3, 2)
    # rotated 90° clockwise: the old top-left corner is now the top-right corner
    assert out[0, 1] > 0.8 and out[0, 0] < 0.2 and out[2, 0] < 0.2


def test_bad_files_raise_naming_the_file(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty.png.*0 bytes"):
        decode_image(empty)

    fake = tmp_path / "notes.png"
    fake.write_text("this is a text file, not a picture")
    with pytest.raises(DataError, match="notes.png.*not an image"):
        decode_image(fake)

    full = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)))
    cut = tmp_path / "cut.png"
    cut.write_bytes(full[: len(full) // 2])
    with pytest.raises(DataError, match="cut.png.*truncated"):
        decode_image(cut)

    with pytest.raises(DataError, match="missing.png"):
        decode_image(tmp_path / "missing.png")


def test_decompression_bombs_are_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("L", (100, 100)).save(path)
    monkeypatch.setattr(decode_mod, "MAX_PIXELS", 5000)
    with pytest.raises(DataError, match="big.png.*decompression bomb"):
        decode_image(path)
    # PIL's own guard (its warning band included) is turned into the same error
    monkeypatch.setattr(decode_mod, "MAX_PIXELS", 10**9)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)
    with pytest.raises(DataError, match="big.png.*decompression bomb"):
        decode_image(path)


def test_resize_policies():
    wide = np.zeros((10, 20, 1), dtype=np.float32)
    wide[:, :5] = 1.0  # a bright band at the far left
    stretched = resize_image(wide, 8, "resize")
    cropped = resize_image(wide, 8, "resize_crop")
    assert stretched.shape == cropped.shape == (8, 8, 1)
    assert stretched[:, 0].mean() > 0.9  # the band survives a stretch
    assert cropped.max() < 0.1  # ... but lies outside the centre square
    assert stretched.min() >= 0 and stretched.max() <= 1
    same = np.random.default_rng(0).random((8, 8, 1)).astype(np.float32)
    np.testing.assert_array_equal(resize_image(same, 8), same)


def test_gray_with_alpha_stays_one_channel():
    arr = np.array([[[200, 255], [200, 0]]], dtype=np.uint8)  # opaque and fully transparent
    im = Image.fromarray(arr)  # H×W×2 uint8 is read as "LA"
    assert im.mode == "LA"
    out = decode_image(png_bytes(im), alpha="composite_white")
    assert out.shape == (1, 2, 1)
    np.testing.assert_allclose(out[0, :, 0], [200 / 255, 1.0], atol=1e-6)
