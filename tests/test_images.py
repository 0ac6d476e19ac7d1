"""pipeline.images.load_image: every mode comes out as upright RGB; every bad file as a one-line ImageError."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import ImageError
from pipeline.images import DEFAULT_MAX_PIXELS, load_image


def close(pixel: tuple[int, ...], expected: tuple[int, ...], tol: int = 6) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(pixel, expected, strict=True))


def test_rgb_png_round_trips_exactly(tmp_path: Path) -> None:
    data = np.random.default_rng(0).integers(0, 256, (9, 13, 3), dtype=np.uint8)
    Image.fromarray(data).save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert img.mode == "RGB" and img.size == (13, 9)
    assert np.array_equal(np.asarray(img), data)


def test_grayscale_jpeg_becomes_rgb_with_equal_channels(tmp_path: Path) -> None:
    Image.new("L", (30, 20), 100).save(tmp_path / "g.jpg")
    img = load_image(tmp_path / "g.jpg", row=3)
    assert img.mode == "RGB" and img.size == (30, 20)
    assert close(img.getpixel((5, 5)), (100, 100, 100), tol=2)


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    Image.new("CMYK", (24, 16), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    img = load_image(tmp_path / "c.jpg")
    assert img.mode == "RGB" and img.size == (24, 16)
    assert close(img.getpixel((10, 8)), (255, 0, 0))


def test_alpha_png_is_composited_on_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (10, 6), (255, 0, 0, 0))
    rgba.putpixel((1, 1), (255, 0, 0, 255))
    rgba.putpixel((2, 2), (0, 0, 255, 128))
    rgba.save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert img.mode == "RGB" and img.size == (10, 6)
    assert img.getpixel((0, 0)) == (255, 255, 255)  # fully transparent -> background
    assert img.getpixel((1, 1)) == (255, 0, 0)
    assert close(img.getpixel((2, 2)), (127, 127, 255), tol=1)


def test_gray_with_alpha_is_composited_on_white(tmp_path: Path) -> None:
    la = Image.new("LA", (5, 5), (0, 0))
    la.putpixel((4, 4), (0, 255))
    la.save(tmp_path / "la.png")
    img = load_image(tmp_path / "la.png")
    assert img.getpixel((0, 0)) == (255, 255, 255)
    assert img.getpixel((4, 4)) == (0, 0, 0)


def test_palette_png_with_transparency_becomes_rgb(tmp_path: Path) -> None:
    pal = Image.new("P", (8, 4), 0)
    pal.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    for x in range(4, 8):
        for y in range(4):
            pal.putpixel((x, y), 1)
    pal.save(tmp_path / "p.png", transparency=0)
    assert Image.open(tmp_path / "p.png").mode == "P"
    img = load_image(tmp_path / "p.png")
    assert img.mode == "RGB" and img.size == (8, 4)
    assert img.getpixel((0, 0)) == (255, 255, 255)  # transparent index, not black
    assert img.getpixel((6, 2)) == (0, 200, 0)


def test_palette_gif_without_transparency(tmp_path: Path) -> None:
    Image.new("RGB", (7, 3), (10, 20, 250)).convert("P").save(tmp_path / "p.gif")
    img = load_image(tmp_path / "p.gif")
    assert img.mode == "RGB" and img.size == (7, 3)
    assert close(img.getpixel((3, 1)), (10, 20, 250), tol=20)


def test_sixteen_bit_png_is_scaled_to_eight_bits(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    img = load_image(tmp_path / "d.png")
    assert img.mode == "RGB" and img.size == (4, 1)
    assert [img.getpixel((x, 0))[0] for x in range(4)] == [0, 1, 128, 255]
    assert img.getpixel((2, 0)) == (128, 128, 128)


def test_int32_and_float_tiffs(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 65535]], dtype=np.int32)).save(tmp_path / "i.tif")
    assert Image.open(tmp_path / "i.tif").mode == "I"
    assert np.asarray(load_image(tmp_path / "i.tif"))[0, :, 0].tolist() == [0, 255]
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    assert np.asarray(load_image(tmp_path / "f.tif"))[0, :, 0].tolist() == [0, 128, 255]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # stored 40x20: left half red, right half blue; orientation 6 = display rotated 90 degrees clockwise
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "r.jpg", exif=exif, quality=95)
    img = load_image(tmp_path / "r.jpg")
    assert img.mode == "RGB" and img.size == (20, 40)
    assert close(img.getpixel((10, 5)), (255, 0, 0), tol=10)  # the left half is now on top
    assert close(img.getpixel((10, 35)), (0, 0, 255), tol=10)


# ---------------------------------------------------------------- failures


def image_error(path: Path, row: int | None = 7, **kwargs: object) -> str:
    with pytest.raises(ImageError) as err:
        load_image(path, row=row, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    prefix = f"{path} (image row {row}): " if row is not None else f"{path}: "
    assert message.startswith(prefix), message
    return message


def test_missing_file(tmp_path: Path) -> None:
    assert image_error(tmp_path / "none.jpg").endswith("file not found")
    assert image_error(tmp_path / "none.jpg", row=None).endswith("file not found")


def test_zero_byte_file(tmp_path: Path) -> None:
    (tmp_path / "z.png").write_bytes(b"")
    assert "empty file (0 bytes)" in image_error(tmp_path / "z.png")


def test_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "t.jpg").write_text("this is text, not pixels\n")
    assert "not an image file" in image_error(tmp_path / "t.jpg")


def test_directory(tmp_path: Path) -> None:
    (tmp_path / "d.png").mkdir()
    assert "is a directory" in image_error(tmp_path / "d.png")


@pytest.mark.parametrize("suffix", ["jpg", "png"])
def test_truncated_file_fails_on_full_decode(tmp_path: Path, suffix: str) -> None:
    noise = np.random.default_rng(1).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    full = tmp_path / f"full.{suffix}"
    Image.fromarray(noise).save(full)
    cut = tmp_path / f"cut.{suffix}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    # the header is intact, so opening alone would succeed
    assert Image.open(cut).size == (96, 96)
    message = image_error(cut)
    assert "truncated or corrupt" in message or "cannot decode" in message


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height pixels, without the pixel data (a cheap bomb stand-in)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def test_images_over_the_pixel_limit_are_refused(tmp_path: Path) -> None:
    assert DEFAULT_MAX_PIXELS == 89_478_485
    # between the limit and Pillow's hard error: Pillow only warns, the loader refuses
    message = image_error(png_header_only(tmp_path / "big.png", 10_000, 10_000))
    assert "refused, 10000x10000 = 100000000 pixels exceeds the limit of 89478485" in message
    # beyond twice the limit Pillow itself raises; still an ImageError
    assert "decompression bomb" in image_error(png_header_only(tmp_path / "huge.png", 20_000, 20_000))


def test_custom_pixel_limit(tmp_path: Path) -> None:
    Image.new("RGB", (20, 10)).save(tmp_path / "s.png")
    assert "200 pixels exceeds the limit of 199" in image_error(tmp_path / "s.png", max_pixels=199)
    assert load_image(tmp_path / "s.png", max_pixels=200).size == (20, 10)
