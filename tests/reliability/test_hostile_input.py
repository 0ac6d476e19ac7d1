"""Hostile and odd input through `cusa-cache build`, each in a real process: bad images, bad captions and bad
annotation files fail with exit code 1 and one line naming the file and the entry or image row — never a
traceback; odd but valid images (16-bit, CMYK, palette, EXIF-rotated, ...) and odd captions (over-long, control
characters, invalid code points) are embedded, and what was done to the captions is recorded in the store."""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reliability_support import one_error_line
from teacher_cache.store import Store


def picture(path: Path, seed: int, size=(40, 30), mode="RGB") -> Path:
    """A small asymmetric picture (a bar on its left), so a rotation changes what a model sees."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    pixels[:, : size[0] // 4] = (255, 255, 0)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height RGB pixels, followed by a few bytes of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def entry(image, caption, image_id=None, split="train") -> dict:
    e = {"image": image, "caption": caption, "split": split}
    if image_id is not None:
        e["image_id"] = image_id
    return e


def write_json(path: Path, payload) -> Path:
    path.write_text(json.dumps(payload, indent=1))
    return path


def good_pair(root: Path) -> list[dict]:
    picture(root / "a.png", 1)
    picture(root / "b.png", 2)
    return [entry("a.png", "a yellow bar beside noise", "a"), entry("b.png", "another yellow bar", "b")]


# ---------------------------------------------------------------------------------------------- bad images

def bad_image_case(kind: str, root: Path) -> tuple[Path, str]:
    """Writes the image of one kind as b.png (row 1); returns the file and the words its error must contain."""
    target = root / "b.png"
    if kind == "truncated":
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2])
        return target, "truncated or corrupt"
    if kind == "zero-bytes":
        target.write_bytes(b"")
        return target, "empty file (0 bytes)"
    if kind == "not-an-image":
        target.write_text("a caption list, not a picture\n")
        return target, "not an image file"
    if kind == "decompression-bomb":  # 2.5 gigapixels claimed: refused from the header, nothing decoded
        png_header_only(target, 50_000, 50_000)
        return target, "decompression bomb"
    if kind == "over-the-pixel-limit":  # 90 megapixels: over Pillow's limit, under its own refusal
        png_header_only(target, 10_000, 9_000)
        return target, "exceeds the limit of 89478485"
    if kind == "a-directory":
        target.unlink()
        target.mkdir()
        return target, "is a directory"
    if kind == "missing":
        target.unlink()
        return target, "file not found"
    raise AssertionError(kind)


BAD_IMAGES = ["truncated", "zero-bytes", "not-an-image", "decompression-bomb", "over-the-pixel-limit", "a-directory",
              "missing"]


CASES = [(kind, 0) for kind in BAD_IMAGES] + [("truncated", 1), ("decompression-bomb", 1)]  # 1: a decoding worker


@pytest.mark.parametrize("kind, workers", CASES, ids=[f"{k}-{'worker' if w else 'in-process'}" for k, w in CASES])
def test_a_bad_image_fails_the_build_with_one_line_naming_the_file_and_row(kind, workers, server, tiny, tmp_path):
    ann = write_json(tmp_path / "ann.json", good_pair(tmp_path))
    target, words = bad_image_case(kind, tmp_path)
    t0 = time.monotonic()
    line = one_error_line(server.run(tiny.build_args(tmp_path / "store", pixels=True, workers=workers,
                                                     annotations=ann)))
    assert f"{target} (image row 1)" in line and words in line, line
    assert "--on-bad-image skip" in line
    if kind == "decompression-bomb":
        assert time.monotonic() - t0 < 60  # refused from the header, not after decoding 7.5 GB of pixels


def test_bad_images_are_skipped_on_request_and_listed(server, tiny, tmp_path):
    entries = good_pair(tmp_path)
    for i, kind in enumerate(["truncated", "decompression-bomb", "zero-bytes"]):
        picture(tmp_path / "b.png", 2)
        target, _ = bad_image_case(kind, tmp_path)
        target.rename(tmp_path / f"bad{i}.png")
        entries.append(entry(f"bad{i}.png", f"broken picture {i}", f"bad{i}"))
    picture(tmp_path / "b.png", 2)
    result = server.run(tiny.build_args(tmp_path / "store", pixels=True, neighbors=1,
                                        annotations=write_json(tmp_path / "ann.json", entries),
                                        extra=("--on-bad-image", "skip")))
    assert result["rc"] == 0, result["stderr"]
    skipped = json.loads(result["stdout"])["skipped_images"]
    assert [s["row"] for s in skipped] == [2, 3, 4]
    assert Store.open(tmp_path / "store", require_complete=True).skipped_images == skipped


# ---------------------------------------------------------------------------------------------- odd images

def test_odd_but_valid_images_embed_like_their_plain_twins(server, tiny, tmp_path):
    base = picture(tmp_path / "plain.png", 3)
    rgb = Image.open(base).convert("RGB")
    upright = np.asarray(rgb)
    files = {
        "plain.png": None,
        "gray16.png": lambda p: Image.fromarray(
            (np.asarray(rgb.convert("L")).astype(np.uint16) * 257)).save(p),
        "gray8.png": lambda p: rgb.convert("L").save(p),
        "cmyk.jpg": lambda p: rgb.convert("CMYK").save(p, quality=98),
        "palette.png": lambda p: rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=256).save(p),
        "palette-transparent.png": lambda p: rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=255).save(
            p, transparency=254),
        "gray-alpha.png": lambda p: rgb.convert("LA").save(p),
        "bilevel.png": lambda p: rgb.convert("1").save(p),
        # stored turned a quarter left, with the EXIF orientation that turns it back (6: rotate 270 to view)
        "exif-rotated.png": lambda p: _save_with_orientation(Image.fromarray(np.rot90(upright, 1)), p, 6),
        "raw-rotated.png": lambda p: Image.fromarray(np.rot90(upright, 1)).save(p),
    }
    for name, save in files.items():
        if save:
            save(tmp_path / name)
    assert Image.open(tmp_path / "gray16.png").mode == "I;16" and Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    assert Image.open(tmp_path / "palette.png").mode == "P"
    entries = [entry(name, f"picture {i}", f"p{i}") for i, name in enumerate(files)]
    result = server.run(tiny.build_args(tmp_path / "store", pixels=True, neighbors=1,
                                        annotations=write_json(tmp_path / "ann.json", entries)))
    assert result["rc"] == 0, result["stderr"]
    emb = Store.open(tmp_path / "store", require_complete=True).load("images")
    row = {name: i for i, name in enumerate(files)}

    def cos(a: str, b: str) -> float:
        return float(emb[row[a]] @ emb[row[b]])

    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=2e-3)
    assert cos("exif-rotated.png", "plain.png") > 0.9999  # turned upright before the teacher saw it
    assert cos("raw-rotated.png", "plain.png") < cos("exif-rotated.png", "plain.png") - 1e-3
    assert cos("gray16.png", "gray8.png") > 0.999  # 16-bit scaled to 8-bit
    assert cos("cmyk.jpg", "plain.png") > 0.95  # JPEG loss only
    assert cos("palette.png", "plain.png") > 0.95


def _save_with_orientation(img: Image.Image, path: Path, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, exif=exif.tobytes())


# ---------------------------------------------------------------------------------------------- captions

def test_odd_captions_are_embedded_and_what_was_done_to_them_is_recorded(server, tiny, tmp_path):
    long_caption = " ".join(f"word{i}" for i in range(600))  # far past MiniLM's 256 tokens
    entries = good_pair(tmp_path) + [
        entry("a.png", long_caption, "a"),
        entry("b.png", "a bell\x07 and an escape\x1b[0m in the text\x00", "b"),
        entry("a.png", "an invalid code point \ud800 here", "a"),
        entry("b.png", "tabs\tand\nline breaks are kept", "b"),
    ]
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(entries))  # json escapes the lone surrogate as \ud800
    result = server.run(tiny.build_args(tmp_path / "store", pixels=True, text_teacher="minilm-l6", annotations=ann))
    assert result["rc"] == 0, result["stderr"]
    notes = json.loads(result["stdout"])["caption_notes"]
    assert notes["max_tokens"] == 256 and notes["truncated"] == 1 and notes["truncated_rows"] == [2]
    assert notes["longest_tokens"] > 256
    assert notes["cleaned"] == 2 and notes["cleaned_rows"] == [3, 4]
    store = Store.open(tmp_path / "store", require_complete=True)
    assert store.attrs["caption_notes"] == notes
    assert store.captions[3] == "a bell  and an escape [0m in the text"
    assert store.captions[4] == "an invalid code point \ufffd here"
    assert store.captions[5] == "tabs\tand\nline breaks are kept"
    assert np.allclose(np.linalg.norm(store.load("texts"), axis=1), 1, atol=2e-3)


# ---------------------------------------------------------------------------------------------- annotation files

def bad_annotation_case(kind: str, root: Path) -> tuple[Path, list[str]]:
    """Writes one kind of bad annotation file; returns it and the words its one-line error must contain."""
    good = good_pair(root)
    ann = root / "ann.json"
    if kind == "empty-caption":
        return write_json(ann, [good[0], entry("b.png", "")]), ["entry 1", "caption is empty"]
    if kind == "whitespace-caption":
        return write_json(ann, [good[0], entry("b.png", " \t\n ")]), ["entry 1", "caption is empty"]
    if kind == "control-characters-only":
        return write_json(ann, [good[0], entry("b.png", "\x00\x07\x1b")]), [
            "entry 1", "caption is empty (only control characters)"]
    if kind == "non-utf8-json":
        ann.write_bytes(b'[{"image": "a.png", "caption": "caf\xe9 au lait"}]')
        return ann, ["not UTF-8 text (byte 35)"]
    if kind == "non-utf8-csv":
        ann = root / "ann.csv"
        ann.write_bytes(b"image,caption\na.png,ok\nb.png,na\xefve\n")
        return ann, ["not UTF-8 text (byte 31)"]
    if kind == "malformed-json":
        ann.write_text('[{"image": "a.png", "caption": "x"},')
        return ann, ["malformed JSON at line 1"]
    if kind == "top-level-string":
        return write_json(ann, "a.png"), ["top level is a str"]
    if kind == "duplicate-id-other-path":
        return write_json(ann, [good[0], entry("b.png", "x", "a")]), [
            "entry 1", "image id 'a' has path 'b.png'", "entry 0 gave it path 'a.png'"]
    if kind == "same-image-two-splits":
        return write_json(ann, [good[0], entry("a.png", "again", "a", split="val")]), [
            "entry 1", "is in split 'val'", "entry 0 put it in split 'train'"]
    if kind == "missing-caption-field":
        return write_json(ann, [good[0], {"image": "b.png"}]), ["entry 1", "missing field 'caption'"]
    if kind == "missing-image-field":
        return write_json(ann, [good[0], {"caption": "x"}]), ["entry 1", "missing field 'image'"]
    if kind == "caption-not-a-string":
        return write_json(ann, [good[0], entry("b.png", 42)]), ["entry 1", "caption must be a string, got int"]
    if kind == "id-not-a-string":
        return write_json(ann, [good[0], entry("b.png", "x", {"nested": 1})]), [
            "entry 1", "'image_id' must be a string or an integer, got dict"]
    if kind == "id-a-boolean":
        return write_json(ann, [good[0], entry("b.png", "x", True)]), [
            "entry 1", "'image_id' must be a string or an integer, got bool"]
    if kind == "split-not-a-string":
        return write_json(ann, [good[0], entry("b.png", "x", "b", split=3)]), [
            "entry 1", "field 'split' must be a string, got 3"]
    if kind == "path-not-a-string":
        return write_json(ann, [good[0], entry(["b.png"], "x", "b")]), [
            "entry 1", "field 'image' must be a non-empty string"]
    if kind == "path-escapes-root":
        return write_json(ann, [good[0], entry("../../etc/passwd", "x", "b")]), [
            "entry 1", "'../../etc/passwd' escapes the image root via '..'"]
    if kind == "path-escapes-root-midway":
        return write_json(ann, [good[0], entry("imgs/../../b.png", "x", "b")]), [
            "entry 1", "escapes the image root"]
    if kind == "control-character-in-path":
        return write_json(ann, [good[0], entry("b\x00.png", "x", "b")]), [
            "entry 1", "image path", "U+0000"]
    if kind == "invalid-code-point-in-id":
        ann.write_text('[{"image": "a.png", "caption": "x", "image_id": "a\\udc80"}]')
        return ann, ["entry 0", "image id", "U+DC80 (lone surrogate)"]
    if kind == "karpathy-wrong-types":
        return write_json(ann, {"images": [{"filename": "a.png", "cocoid": [1], "sentences": [{"raw": "x"}]}]}), [
            "images[0]", "'cocoid' must be a string or an integer, got list"]
    if kind == "karpathy-missing-sentences":
        return write_json(ann, {"images": [{"filename": "a.png", "split": "train"}]}), [
            "images[0]", "missing field 'sentences'"]
    if kind == "csv-missing-column":
        ann = root / "ann.csv"
        ann.write_text("image,text\na.png,hello\n")
        return ann, ["missing column(s) 'caption'"]
    raise AssertionError(kind)


BAD_ANNOTATIONS = ["empty-caption", "whitespace-caption", "control-characters-only", "non-utf8-json", "non-utf8-csv",
                   "malformed-json", "top-level-string", "duplicate-id-other-path", "same-image-two-splits",
                   "missing-caption-field", "missing-image-field", "caption-not-a-string", "id-not-a-string",
                   "id-a-boolean", "split-not-a-string", "path-not-a-string", "path-escapes-root",
                   "path-escapes-root-midway", "control-character-in-path", "invalid-code-point-in-id",
                   "karpathy-wrong-types", "karpathy-missing-sentences", "csv-missing-column"]


@pytest.mark.parametrize("kind", BAD_ANNOTATIONS)
def test_a_bad_annotation_file_fails_with_one_line_naming_the_file_and_entry(kind, server, tiny, tmp_path):
    ann, words = bad_annotation_case(kind, tmp_path)
    out = tmp_path / "store"
    line = one_error_line(server.run(tiny.build_args(out, pixels=True, annotations=ann)))
    assert str(ann) in line, line
    for word in words:
        assert word in line, line
    assert not out.exists()  # refused before anything was written
