"""A small synthetic image-caption dataset that real teachers can make sense of.

Each image is a rendered scene of one to three groups of coloured shapes on a plain background; each
group has a shape, a colour, a size, a count and a position. Five captions per image describe the scene
in plain English with varied wording, and attributes repeat across images, so a scene's nearest
neighbors by image features and by caption embeddings are scenes with similar content and retrieval is
not trivial. Output is byte-identical for a given seed.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

SHAPE_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "blue": (40, 85, 215),
    "green": (40, 160, 60),
    "yellow": (240, 205, 35),
    "orange": (245, 135, 25),
    "purple": (135, 55, 185),
    "pink": (240, 120, 175),
}
# Background colour and the words a caption may use for it.
BACKGROUNDS: dict[str, tuple[tuple[int, int, int], tuple[str, ...]]] = {
    "white": ((248, 248, 248), ("white",)),
    "gray": ((190, 190, 190), ("gray", "grey", "light gray")),
    "black": ((22, 22, 22), ("black", "dark")),
    "beige": ((236, 224, 196), ("beige", "cream-colored")),
}
# Singular and plural nouns per shape; synonyms make captions vary like human ones do.
SHAPE_NOUNS: dict[str, tuple[tuple[str, str], ...]] = {
    "circle": (("circle", "circles"), ("disc", "discs"), ("round shape", "round shapes")),
    "square": (("square", "squares"), ("box", "boxes"), ("block", "blocks")),
    "triangle": (("triangle", "triangles"),),
    "star": (("star", "stars"), ("five-pointed star", "five-pointed stars")),
    "cross": (("cross", "crosses"), ("plus sign", "plus signs")),
}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
POSITION_PHRASES = {
    "left": ("on the left", "on the left side", "at the left"),
    "right": ("on the right", "on the right side", "at the right"),
    "top": ("at the top", "near the top", "in the upper part"),
    "bottom": ("at the bottom", "near the bottom", "in the lower part"),
    "center": ("in the center", "in the middle"),
}
COUNT_WORDS = {1: ("a", "one"), 2: ("two", "a pair of"), 3: ("three",)}
TOTAL_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
CAPTIONS_PER_IMAGE = 5
SPLIT_NAMES = ("train", "val", "test")
# A large test split and a modest train split: more distractors at test time make the recalls informative
# (not saturated near 100%), and a student trained on fewer scenes is where soft labels matter.
DEFAULT_SPLIT_FRACTIONS = (0.50, 0.15, 0.35)
_SUPERSAMPLE = 2  # shapes are drawn at twice the size and downscaled, for smooth (antialiased) edges


@dataclass(frozen=True)
class ShapeGroup:
    """One or more identical shapes placed together in one part of the image."""

    shape: str
    colour: str
    size: str
    count: int
    position: str


@dataclass(frozen=True)
class Scene:
    background: str
    groups: tuple[ShapeGroup, ...]


def write_demo_dataset(out_dir: Path, n_images: int = 800, seed: int = 0, image_size: int = 128,
                       split_fractions: tuple[float, float, float] = DEFAULT_SPLIT_FRACTIONS, shards: bool = False,
                       samples_per_shard: int = 100, clip_benchmark: bool = False) -> dict[str, Any]:
    """Write PNG scenes under ``out_dir/images`` and caption-list JSON files train/val/test/all.json.

    Returns a summary with the files written and the counts. Each JSON entry is
    ``{"image": "images/demo_00000.png", "caption": [5 captions], "image_id": "demo_00000", "split": ...}``,
    paths relative to ``out_dir`` (the default image root of a manifest read from there).

    With ``shards`` the same images and captions are also written as webdataset shards,
    ``out_dir/shards/{train,val,test}-NNNNNN.tar`` with ``samples_per_shard`` samples each (``KEY.png``, ``KEY.txt``
    with the 5 captions, ``KEY.json`` with the image id; see ``pipeline.shard_writer``); the summary's ``"shards"``
    gives each split's brace pattern.

    With ``clip_benchmark`` the test split is also written in CLIP_benchmark's webdataset retrieval layout,
    ``out_dir/clip_benchmark/{dataset_type.txt, test/nshards.txt, test/0.tar, ...}`` (``pipeline.shard_writer``), which
    ``clip_benchmark eval --dataset wds/NAME --dataset_root out_dir/clip_benchmark`` and every cusa command read; the
    summary's ``"clip_benchmark"`` gives its root and shards.
    """
    if n_images < len(SPLIT_NAMES):
        raise ValueError(f"n_images must be at least {len(SPLIT_NAMES)} (one per split), got {n_images}")
    if len(split_fractions) != 3 or min(split_fractions) <= 0 or abs(sum(split_fractions) - 1) > 1e-6:
        raise ValueError(f"split fractions (train, val, test) must be three positive numbers summing to 1, "
                         f"got {tuple(split_fractions)}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 pixels, got {image_size}")
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)

    entries: list[dict[str, Any]] = []
    for index in range(n_images):
        scene = random_scene(rng)
        image_id = f"demo_{index:05d}"
        relative = f"images/{image_id}.png"
        render_scene(scene, image_size, rng).save(out_dir / relative, format="PNG")
        entries.append({"image": relative, "caption": scene_captions(scene, rng), "image_id": image_id, "split": ""})

    order = list(range(n_images))
    rng.shuffle(order)
    split_of = _assign_splits(order, split_fractions)
    for index, entry in enumerate(entries):
        entry["split"] = split_of[index]

    files: dict[str, str] = {}
    counts: dict[str, int] = {"images": n_images, "captions": n_images * CAPTIONS_PER_IMAGE}
    for split in SPLIT_NAMES:
        chosen = [e for e in entries if e["split"] == split]
        files[split] = str(_write_json(out_dir / f"{split}.json", chosen))
        counts[split] = len(chosen)
    files["all"] = str(_write_json(out_dir / "all.json", entries))
    summary = {
        "root": str(out_dir),
        "images_dir": str(image_dir),
        "files": files,
        "counts": counts,
        "seed": seed,
        "image_size": image_size,
    }
    if shards:
        from pipeline.manifest import read_manifest
        from pipeline.shard_writer import write_manifest_shards

        summary["shards"] = {
            split: write_manifest_shards(read_manifest(files[split]), out_dir / "shards", split,
                                         samples_per_shard)["pattern"]
            for split in SPLIT_NAMES
        }
    if clip_benchmark:
        from pipeline.manifest import read_manifest
        from pipeline.shard_writer import write_clip_benchmark_split

        summary["clip_benchmark"] = write_clip_benchmark_split(read_manifest(files["test"]),
                                                               out_dir / "clip_benchmark", "test", samples_per_shard)
    return summary


def _assign_splits(order: list[int], fractions: tuple[float, float, float]) -> dict[int, str]:
    n = len(order)
    sizes = [max(1, round(n * fraction)) for fraction in fractions[1:]]
    n_train = n - sum(sizes)
    split_of: dict[int, str] = {}
    start = 0
    for split, size in zip(SPLIT_NAMES, [n_train, *sizes]):
        for index in order[start : start + size]:
            split_of[index] = split
        start += size
    return split_of


def _write_json(path: Path, entries: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps(entries, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def random_scene(rng: random.Random) -> Scene:
    """A scene of one to three groups with distinct (shape, colour) pairs and non-overlapping positions."""
    n_groups = rng.choices((1, 2, 3), weights=(0.4, 0.45, 0.15))[0]
    if n_groups == 1:
        positions = [rng.choice(("left", "right", "top", "bottom", "center"))]
    elif n_groups == 2:
        positions = list(rng.choice((("left", "right"), ("top", "bottom"))))
        rng.shuffle(positions)
    else:
        positions = list(rng.choice((("left", "center", "right"), ("top", "center", "bottom"))))
        rng.shuffle(positions)
    used: set[tuple[str, str]] = set()
    groups = []
    for position in positions:
        while True:
            shape, colour = rng.choice(list(SHAPE_NOUNS)), rng.choice(list(SHAPE_COLOURS))
            if (shape, colour) not in used:
                break
        used.add((shape, colour))
        count = 1 if n_groups == 3 else rng.choices((1, 2, 3), weights=(0.5, 0.3, 0.2))[0]
        groups.append(ShapeGroup(shape, colour, rng.choice(("small", "large")), count, position))
    return Scene(rng.choice(list(BACKGROUNDS)), tuple(groups))


def _region(position: str, n_groups: int, stacked: bool) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) in unit coordinates: halves for one or two groups, thirds for three.

    ``stacked``: the groups are arranged top-to-bottom, so a middle third is a horizontal band.
    """
    third = n_groups == 3
    lo, hi = (1 / 3, 2 / 3) if third else (0.5, 0.5)
    if third and stacked and position == "center":
        return (0.0, 1 / 3, 1.0, 2 / 3)
    return {
        "left": (0.0, 0.0, lo, 1.0),
        "right": (hi, 0.0, 1.0, 1.0),
        "top": (0.0, 0.0, 1.0, lo),
        "bottom": (0.0, hi, 1.0, 1.0),
        "center": (1 / 3, 0.0, 2 / 3, 1.0) if third else (0.2, 0.2, 0.8, 0.8),
    }[position]


def render_scene(scene: Scene, image_size: int, rng: random.Random) -> Image.Image:
    """Draw the scene as an RGB image of ``image_size`` x ``image_size`` pixels."""
    canvas = image_size * _SUPERSAMPLE
    image = Image.new("RGB", (canvas, canvas), BACKGROUNDS[scene.background][0])
    draw = ImageDraw.Draw(image)
    stacked = any(g.position in ("top", "bottom") for g in scene.groups)
    for group in scene.groups:
        x0, y0, x1, y1 = (v * canvas for v in _region(group.position, len(scene.groups), stacked))
        radius = canvas * (0.13 if group.size == "large" else 0.07)
        along_x = (x1 - x0) >= (y1 - y0)  # spread several shapes along the region's long side
        length = (x1 - x0) if along_x else (y1 - y0)
        width = (y1 - y0) if along_x else (x1 - x0)
        slot = length / group.count
        for k in range(group.count):
            slack_along = max(0.0, (slot - 2.3 * radius) / 2)
            slack_across = max(0.0, (width - 2.3 * radius) / 2)
            along = slot * (k + 0.5) + rng.uniform(-slack_along, slack_along)
            across = width / 2 + rng.uniform(-slack_across, slack_across)
            cx, cy = (x0 + along, y0 + across) if along_x else (x0 + across, y0 + along)
            # Slight shade and rotation changes keep identical descriptions from being identical pixels.
            colour = tuple(max(0, min(255, c + rng.randint(-12, 12))) for c in SHAPE_COLOURS[group.colour])
            _draw_shape(draw, group.shape, cx, cy, radius, rng.uniform(-15.0, 15.0), colour)
    return image.resize((image_size, image_size), Image.Resampling.LANCZOS)


def _polygon(cx: float, cy: float, radii: list[float], start_deg: float) -> list[tuple[float, float]]:
    step = 2 * math.pi / len(radii)
    start = math.radians(start_deg)
    return [(cx + r * math.cos(start + i * step), cy + r * math.sin(start + i * step)) for i, r in enumerate(radii)]


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float, colour: tuple[int, ...]
) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, [r * 1.15] * 4, 45 + angle), fill=colour)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, [r * 1.15] * 3, -90 + angle), fill=colour)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, [r * 1.2, r * 0.5] * 5, -90 + angle), fill=colour)
    elif shape == "cross":
        # A plus sign: 12 corners of two crossing bars, rotated as one polygon.
        arm, half = r * 1.1, r * 0.36
        corners = [(half, arm), (half, half), (arm, half), (arm, -half), (half, -half), (half, -arm),
                   (-half, -arm), (-half, -half), (-arm, -half), (-arm, half), (-half, half), (-half, arm)]
        cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        draw.polygon([(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in corners], fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _group_phrase(group: ShapeGroup, rng: random.Random, full: bool) -> str:
    """e.g. "two small red circles on the left"; outside ``full`` mode size/colour/position may be left out."""
    singular, plural = rng.choice(SHAPE_NOUNS[group.shape])
    words = []
    if full or rng.random() < 0.6:
        words.append(rng.choice(SIZE_WORDS[group.size]))
    if full or rng.random() < 0.9:
        words.append(group.colour)
    words.append(singular if group.count == 1 else plural)
    count = rng.choice(COUNT_WORDS[group.count])
    if count == "a" and words[0][0] in "aeiou":
        count = "an"
    phrase = f"{count} {' '.join(words)}"
    if full or rng.random() < 0.6:
        phrase += " " + rng.choice(POSITION_PHRASES[group.position])
    return phrase


def _join(phrases: list[str], rng: random.Random) -> str:
    if len(phrases) == 1:
        return phrases[0]
    if len(phrases) == 2:
        return rng.choice((" and ", " next to ", " together with ")).join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _caption(scene: Scene, rng: random.Random, full: bool) -> str:
    groups = list(scene.groups)
    if not full:
        rng.shuffle(groups)
    objects = _join([_group_phrase(g, rng, full) for g in groups], rng)
    background = rng.choice(BACKGROUNDS[scene.background][1])
    total = sum(g.count for g in scene.groups)
    templates = [
        "{objects}",
        "{objects} on a {background} background",
        "an image showing {objects}",
        "a picture of {objects}",
        "a simple drawing of {objects}",
        "there {verb} {objects}",
        "{background} background with {objects}",
        "{objects} against a {background} backdrop",
        "a {background} canvas with {objects}",
    ]
    if len(groups) > 1:
        templates.append(f"{TOTAL_WORDS[total]} shapes: {{objects}}")
    template = "{objects} on a {background} background" if full else rng.choice(templates)
    verb = "is" if groups[0].count == 1 else "are"
    text = template.format(objects=objects, background=background, verb=verb)
    return text[0].upper() + text[1:] + "."


def scene_captions(scene: Scene, rng: random.Random) -> list[str]:
    """Five distinct captions: the first names every attribute, the others vary wording and detail."""
    captions = [_caption(scene, rng, full=True)]
    attempts = 0
    while len(captions) < CAPTIONS_PER_IMAGE:
        attempts += 1
        # A one-shape scene has a finite set of phrasings; after many repeats, fall back to full detail.
        text = _caption(scene, rng, full=attempts > 200)
        if text not in captions:
            captions.append(text)
    return captions
