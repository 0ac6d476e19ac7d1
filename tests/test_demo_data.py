"""pipeline.demo_data: deterministic synthetic scenes whose pixels and captions agree."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipeline.demo_data import (
    BACKGROUNDS,
    SHAPE_COLOURS,
    SHAPE_NOUNS,
    Scene,
    ShapeGroup,
    render_scene,
    write_demo_dataset,
)
from pipeline.images import load_image
from pipeline.manifest import read_manifest


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files_and_other_seed_differs(tmp_path: Path) -> None:
    a = write_demo_dataset(tmp_path / "a", n_images=30, seed=5, image_size=64)
    write_demo_dataset(tmp_path / "b", n_images=30, seed=5, image_size=64)
    write_demo_dataset(tmp_path / "c", n_images=30, seed=6, image_size=64)
    files_a, files_b, files_c = (all_files(tmp_path / name) for name in "abc")
    assert len(files_a) == 30 + 4  # images + train/val/test/all.json
    assert files_a == files_b
    assert files_a.keys() == files_c.keys()
    assert files_a["all.json"] != files_c["all.json"]
    assert sum(files_a[k] != files_c[k] for k in files_a if k.endswith(".png")) >= 25
    assert a["counts"] == {"images": 30, "captions": 150, "train": 16, "val": 4, "test": 10}
    assert a["files"]["train"] == str(tmp_path / "a" / "train.json")


def test_splits_are_readable_manifests_with_five_distinct_captions(tmp_path: Path) -> None:
    summary = write_demo_dataset(tmp_path, n_images=60, seed=0, image_size=64, split_fractions=(0.7, 0.15, 0.15))
    assert summary["counts"] == {"images": 60, "captions": 300, "train": 42, "val": 9, "test": 9}
    ids: set[str] = set()
    for split in ("train", "val", "test"):
        m = read_manifest(summary["files"][split])
        assert m.format == "caption-json"
        assert m.splits() == [split]
        assert len(m.images) == summary["counts"][split]
        assert len(m.captions) == 5 * len(m.images)
        assert np.bincount(m.caption_image_rows()).tolist() == [5] * len(m.images)
        for row in range(len(m.images)):
            texts = [c.text for c in m.captions if c.image_row == row]
            assert len(set(texts)) == 5
        img = load_image(m.image_path(0), row=0)
        assert img.size == (64, 64) and img.mode == "RGB"
        ids |= set(m.image_ids())
    assert len(ids) == 60  # splits are disjoint and cover every image
    everything = read_manifest(summary["files"]["all"])
    assert Counter(r.split for r in everything.images) == {"train": 42, "val": 9, "test": 9}
    assert everything.select_split("val").image_ids() == read_manifest(summary["files"]["val"]).image_ids()


def test_entries_use_relative_paths_and_the_documented_keys(tmp_path: Path) -> None:
    write_demo_dataset(tmp_path, n_images=10, seed=1, image_size=48)
    entries = json.loads((tmp_path / "all.json").read_text())
    assert [e["image_id"] for e in entries] == [f"demo_{i:05d}" for i in range(10)]
    for e in entries:
        assert set(e) == {"image", "caption", "image_id", "split"}
        assert e["image"] == f"images/{e['image_id']}.png"
        assert (tmp_path / e["image"]).is_file()
        assert len(e["caption"]) == 5


def test_attributes_are_shared_across_images_and_captions_name_them(tmp_path: Path) -> None:
    write_demo_dataset(tmp_path, n_images=200, seed=0, image_size=48)
    entries = json.loads((tmp_path / "all.json").read_text())
    first = [e["caption"][0].lower() for e in entries]  # the fully detailed caption
    for colour in SHAPE_COLOURS:
        assert sum(colour in c for c in first) >= 15, colour
    for shape, nouns in SHAPE_NOUNS.items():
        assert sum(any(s in c for s, _ in nouns) for c in first) >= 15, shape
    for words in (w for _, w in BACKGROUNDS.values()):
        assert sum(any(f"{w} background" in c for w in words) for c in first) >= 20
    for position in ("on the left", "on the right", "at the top", "at the bottom", "in the middle"):
        assert sum(position in " ".join(e["caption"]).lower() for e in entries) >= 10, position
    all_captions = [c for e in entries for c in e["caption"]]
    # varied wording: many distinct sentences, several openings, no template dominates
    assert len(set(all_captions)) >= 0.9 * len(all_captions)
    openings = Counter(" ".join(c.split()[:2]) for c in all_captions)
    assert len(openings) >= 40 and max(openings.values()) < 0.15 * len(all_captions)


def colour_mask(image: np.ndarray, rgb: tuple[int, int, int], tol: int = 40) -> np.ndarray:
    return (np.abs(image.astype(int) - np.array(rgb)).max(axis=2) <= tol)


@pytest.mark.parametrize(
    ("position", "inside", "outside"),
    [
        ("left", (slice(None), slice(0, 64)), (slice(None), slice(64, None))),
        ("right", (slice(None), slice(64, None)), (slice(None), slice(0, 64))),
        ("top", (slice(0, 64), slice(None)), (slice(64, None), slice(None))),
        ("bottom", (slice(64, None), slice(None)), (slice(0, 64), slice(None))),
    ],
)
def test_rendered_shapes_sit_where_the_caption_says(position: str, inside: tuple, outside: tuple) -> None:
    scene = Scene("white", (ShapeGroup("square", "red", "large", 2, position),))
    pixels = np.asarray(render_scene(scene, 128, random.Random(0)))
    red = colour_mask(pixels, SHAPE_COLOURS["red"])
    assert red[inside].sum() > 2 * 600  # two large squares of ~34 px side
    assert red[outside].sum() == 0
    assert colour_mask(pixels, BACKGROUNDS["white"][0], tol=3).mean() > 0.6


def test_three_groups_fill_three_thirds_with_their_colours() -> None:
    groups = (ShapeGroup("circle", "blue", "large", 1, "top"),
              ShapeGroup("star", "yellow", "small", 1, "center"),
              ShapeGroup("cross", "green", "large", 1, "bottom"))
    pixels = np.asarray(render_scene(Scene("black", groups), 96, random.Random(3)))
    for (group, band) in zip(groups, (slice(0, 32), slice(32, 64), slice(64, 96)), strict=True):
        mask = colour_mask(pixels, SHAPE_COLOURS[group.colour])
        assert mask[band].sum() > 20, group
        assert mask.sum() == mask[band].sum(), group  # nothing of that colour outside its band


def test_default_dataset_has_a_large_test_split(tmp_path: Path) -> None:
    summary = write_demo_dataset(tmp_path)
    assert summary["counts"] == {"images": 800, "captions": 4000, "train": 400, "val": 120, "test": 280}
    assert summary["image_size"] == 128
    assert len(list((tmp_path / "images").glob("*.png"))) == 800


def test_invalid_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_images must be at least 3"):
        write_demo_dataset(tmp_path, n_images=2)
    with pytest.raises(ValueError, match="image_size must be at least 32"):
        write_demo_dataset(tmp_path, image_size=16)
