"""Safe image decoding: every image comes out as a fully decoded RGB picture or as a one-line ImageError.

`open_image(manifest, row)` is the one way every stage reads a manifest's image (the build, training an image-level
student, evaluation, the report's figures), whether it is a file or a member of a webdataset shard.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.errors import ImageError

if TYPE_CHECKING:
    from pipeline.manifest import Manifest

# Pillow's own default: larger images are refused as likely decompression bombs.
DEFAULT_MAX_PIXELS = 89_478_485
_WHITE = (255, 255, 255)


def open_image(manifest: "Manifest", row: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Image ``row`` of ``manifest`` decoded as :func:`load_image` decodes a file: from its file, or from its
    shard member's bytes (one seek and read, never extracting the shard). Errors name the file, or the shard and
    the sample's member."""
    member = manifest.images[row].member
    if member is None:
        return load_image(manifest.image_path(row), row=row, max_pixels=max_pixels)
    from pipeline.shards import read_member

    if member.missing:
        raise ImageError(f"{member.shard}: sample {member.key!r} (image row {row}): {member.missing}")
    where = f"{member.shard}: member {member.name!r} (image row {row})"
    if member.size == 0:
        raise ImageError(f"{where}: empty member (0 bytes)")
    data = read_member(member.shard, member.offset, member.size, member.stat)
    return decode_image(io.BytesIO(data), where, max_pixels)


def load_image(
    path: str | os.PathLike[str], row: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Decode ``path`` into an RGB image, upright per its EXIF orientation.

    Grayscale, palette, alpha (composited on white), CMYK and 16-bit/float images are converted to
    8-bit RGB. Missing, empty, truncated, undecodable and over-large (> ``max_pixels``) files raise
    ImageError naming the path and, when given, the manifest row.
    """
    path = Path(path)
    where = f"{path} (image row {row})" if row is not None else str(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageError(f"{where}: file not found") from None
    except OSError as e:
        raise ImageError(f"{where}: cannot read file ({e.strerror or e})") from None
    if path.is_dir():
        raise ImageError(f"{where}: is a directory, not an image file")
    if size == 0:
        raise ImageError(f"{where}: empty file (0 bytes)")
    try:
        # Opening our own file object keeps the decoded image usable after the file is closed.
        with open(path, "rb") as fh:
            return decode_image(fh, where, max_pixels)
    except OSError as e:  # the file itself could not be opened or read (its content's errors are ImageErrors)
        raise ImageError(f"{where}: cannot read file ({e.strerror or e})") from None


def decode_image(stream: IO[bytes], where: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image from an open binary stream into RGB, upright; ``where`` names it in ImageError messages."""
    try:
        with warnings.catch_warnings():
            # The size check below replaces Pillow's bomb warning with a refusal.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(stream)
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(
                    f"{where}: refused, {width}x{height} = {width * height} pixels exceeds the limit of "
                    f"{max_pixels} (possible decompression bomb)"
                )
            # Decode everything now: a truncated file must fail here, not later inside a batch.
            img.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{where}: refused as a possible decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{where}: not an image file, or a format Pillow cannot read") from None
    except MemoryError:
        raise
    except OSError as e:
        reason = str(e) or type(e).__name__
        raise ImageError(f"{where}: truncated or corrupt image data ({reason})") from None
    except Exception as e:  # decoders signal malformed data with many exception types
        raise ImageError(f"{where}: cannot decode image ({type(e).__name__}: {e})") from None
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except Exception:  # broken orientation metadata should not lose an otherwise good image
        pass
    try:
        return _to_rgb(img)
    except (ValueError, OSError) as e:
        raise ImageError(f"{where}: cannot convert {img.mode} image to RGB ({e})") from None


def as_rgb(img: Image.Image) -> Image.Image:
    """An image already in memory, converted to 8-bit RGB exactly as ``load_image`` converts decoded files."""
    try:
        return _to_rgb(img)
    except (ValueError, OSError) as e:
        raise ImageError(f"cannot convert {img.mode} image to RGB ({e})") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        # 16-bit (and 32-bit int images, which Pillow uses for 16-bit data) are scaled by 255/65535.
        values = np.asarray(img, dtype=np.float64)
        gray = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "F":
        values = np.asarray(img, dtype=np.float64)
        # Float images are conventionally in [0, 1]; anything larger is taken as already 0..255.
        scale = 255.0 if np.nanmax(values, initial=0.0) <= 1.0 else 1.0
        gray = np.clip(np.rint(np.nan_to_num(values * scale)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
