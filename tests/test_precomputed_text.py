"""Caption embeddings made elsewhere as the text teacher (`precomputed:` in caption order or with a keys file), and a
store made from clip-retrieval inference output without running a teacher: the stored rows are the given
embeddings, the annotation file is written from the metadata, bad input is a one-line error, and the store trains."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr
from click.testing import CliRunner

from helpers_train import invoke_json, one_torch_thread
from pipeline.build import BuildConfig, build_store
from pipeline.captions import teacher_captions
from pipeline.cli import main as cache_main
from pipeline.teachers.registry import build_encoder
from pipeline.errors import EncoderError
from pipeline.manifest import read_manifest
from teacher_cache.store import Store
from teacher_cache.verify import verify_store
from train.cli import train_main


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def stored(store_path: Path, modality: str) -> np.ndarray:
    return np.asarray(zarr.open_group(str(store_path), mode="r")[f"{modality}/emb"][:], dtype=np.float32)


@pytest.fixture(scope="module")
def demo_train(demo_dir):
    return read_manifest(demo_dir / "train.json")


@pytest.fixture(scope="module")
def image_features(demo_train, tmp_path_factory):
    """An image teacher that runs nothing either: a precomputed [N, D] array with its ids file."""
    folder = tmp_path_factory.mktemp("image-features")
    np.save(folder / "images.npy", unit_rows(len(demo_train.images), 24, seed=1))
    (folder / "images.ids.txt").write_text("\n".join(im.image_id for im in demo_train.images))
    return f"precomputed:{folder / 'images.npy'}"


def build(demo_dir, out, text_spec, image_spec, **kw):
    return build_store(BuildConfig(annotations=str(demo_dir / "train.json"), out=str(out), text_teacher=text_spec,
                                   image_teacher=image_spec, workers=0, neighbors=4, chunk_rows=64, progress=False,
                                   device="cpu", **kw))


# ------------------------------------------------------------------------------------------------ precomputed text
def test_caption_embeddings_in_manifest_order_become_the_text_rows(demo_dir, demo_train, image_features, tmp_path):
    captions = unit_rows(len(demo_train.captions), 16, seed=2)
    path = tmp_path / "captions.npy"
    np.save(path, captions.astype(np.float16))
    summary = build(demo_dir, tmp_path / "store", f"precomputed:{path}", image_features)
    assert summary.complete and summary.dims == {"images": 24, "texts": 16}
    np.testing.assert_allclose(stored(tmp_path / "store", "texts"), captions, atol=2e-3)
    teacher = Store.open(tmp_path / "store").teachers["text"]
    assert teacher["spec"] == f"precomputed:{path}" and teacher["order"] == "manifest"
    assert teacher["weights"].startswith("sha256:")
    assert verify_store(Store.open(tmp_path / "store")).ok


def test_caption_embeddings_with_a_keys_file_are_looked_up_by_text_in_any_order(demo_dir, demo_train,
                                                                                  image_features, tmp_path):
    texts = teacher_captions([c.text for c in demo_train.captions])[0]
    rows = unit_rows(len(texts), 12, seed=3)
    order = np.random.default_rng(0).permutation(len(texts))
    extra = unit_rows(3, 12, seed=4)  # rows no caption asks for are fine
    np.save(tmp_path / "bank.npy", np.concatenate([rows[order], extra]))
    (tmp_path / "bank.keys.json").write_text(json.dumps([texts[i] for i in order] + ["x", "y", "z"]))
    build(demo_dir, tmp_path / "store", f"precomputed:{tmp_path / 'bank.npy'}", image_features)
    got = stored(tmp_path / "store", "texts")
    # a caption text that appears twice gets its first row, as a deterministic text teacher would
    first = {}
    for j, text in enumerate(texts):
        first.setdefault(text, j)
    want = np.stack([rows[first[t]] for t in texts])
    np.testing.assert_allclose(got, want, atol=1e-3)  # stored as float16
    assert np.abs(got - want).max() < np.abs(got - np.roll(want, 1, axis=0)).max() / 10
    assert Store.open(tmp_path / "store").teachers["text"]["order"] == "keys"
    # the keyed teacher embeds a query that is one of its keys, as `cusa-cache neighbors --query` asks
    encoder = build_encoder(f"precomputed:{tmp_path / 'bank.npy'}", "text")
    np.testing.assert_allclose(encoder.encode([texts[5]]), want[5:6], atol=1e-6)


@pytest.mark.parametrize("case, message", [
    ("short", "40 caption rows, but"),
    ("missing-key", "no embedding for caption 0 of"),
    ("pickled", "holds pickled Python objects, not a plain numeric array of caption embeddings"),
    ("key-count", "4 caption keys for 3 embedding rows"),
])
def test_unusable_caption_embeddings_are_refused_before_the_store_is_made(demo_dir, demo_train, image_features,
                                                                           tmp_path, case, message):
    path = tmp_path / "captions.npy"
    spec = f"precomputed:{path}"
    if case == "short":
        np.save(path, unit_rows(40, 8, 0))
    elif case == "missing-key":
        np.save(path, unit_rows(2, 8, 0))
        (tmp_path / "keys.txt").write_text("a caption\nanother caption\n")
        spec += f":{tmp_path / 'keys.txt'}"
    elif case == "pickled":
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    else:
        np.save(path, unit_rows(3, 8, 0))
        (tmp_path / "keys.txt").write_text("one\ntwo\nthree\nfour\n")
        spec += f":{tmp_path / 'keys.txt'}"
    with pytest.raises(EncoderError, match=message) as err:
        build(demo_dir, tmp_path / "store", spec, image_features)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "store").exists()  # refused before anything was created


def test_caption_embeddings_in_manifest_order_cannot_embed_free_text(tmp_path):
    np.save(tmp_path / "c.npy", unit_rows(5, 8, 0))
    with pytest.raises(EncoderError, match="cannot embed free text"):
        build_encoder(f"precomputed:{tmp_path / 'c.npy'}", "text").encode(["a query"])


# ------------------------------------------------------------------------------------------------ clip-retrieval
def write_clip_retrieval(folder: Path, demo_dir: Path, manifest, image_rows: np.ndarray, text_rows: np.ndarray,
                         parts: int = 3, repeat_first_image_at_end: bool = True) -> list[dict]:
    """clip-retrieval inference output for the demo train split: one sample per caption (image path, caption),
    float16 unit embeddings, split into partitions; the first image's first caption is also the last sample (an
    image seen again, far from its first sight). Returns the samples."""
    samples = [{"image_path": str((demo_dir / manifest.images[c.image_row].path).resolve()), "caption": c.text,
                "image_row": c.image_row, "caption_row": j} for j, c in enumerate(manifest.captions)]
    if repeat_first_image_at_end:
        samples.append({**samples[0], "caption": "the same scene once more, described again"})
    img = np.stack([image_rows[s["image_row"]] for s in samples]).astype(np.float16)
    txt = text_rows[:len(samples)].astype(np.float16)  # sample k's caption embedding
    for sub in ("img_emb", "text_emb", "metadata"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(samples), parts + 1).astype(int)
    for i in range(parts):
        lo, hi = bounds[i], bounds[i + 1]
        np.save(folder / "img_emb" / f"img_emb_{i}.npy", img[lo:hi])
        np.save(folder / "text_emb" / f"text_emb_{i}.npy", txt[lo:hi])
        table = pa.table({"image_path": [s["image_path"] for s in samples[lo:hi]],
                          "caption": [s["caption"] for s in samples[lo:hi]],
                          "split": ["val" if s["image_row"] % 7 == 0 else "train" for s in samples[lo:hi]]})
        pq.write_table(table, folder / "metadata" / f"metadata_{i}.parquet")
    return samples


@pytest.fixture(scope="module")
def clip_output(demo_dir, demo_train, tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip-retrieval") / "out"
    image_rows = unit_rows(len(demo_train.images), 32, seed=5)
    text_rows = unit_rows(len(demo_train.captions) + 1, 32, seed=6)
    samples = write_clip_retrieval(folder, demo_dir, demo_train, image_rows, text_rows)
    return folder, samples


def import_cli(folder: Path, out: Path, *extra: str) -> dict:
    result = CliRunner().invoke(cache_main, ["import-clip-retrieval", str(folder), "--out", str(out), "--neighbors",
                                             "4", "--chunk-rows", "64", "--json", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_clip_retrieval_output_becomes_a_store_and_an_annotation_file(clip_output, tmp_path):
    folder, samples = clip_output
    summary = import_cli(folder, tmp_path / "store", "--model", "ViT-B-32/openai")
    annotations = Path(summary["annotations"])
    assert annotations == Path(str(tmp_path / "store") + ".annotations.json")
    manifest = read_manifest(annotations)
    n_images = len({s["image_path"] for s in samples})
    assert summary["complete"] and summary["counts"] == {"images": n_images, "texts": len(samples)}
    # captions in sample order; the repeated image is one row that gained a caption
    assert [c.text for c in manifest.captions] == [s["caption"] for s in samples]
    assert manifest.captions[-1].image_row == 0 and len(manifest.images) == n_images
    # the stored rows are the given embeddings: each caption's sample, each image's first sample
    img = np.concatenate([np.load(folder / "img_emb" / f"img_emb_{i}.npy") for i in range(3)]).astype(np.float32)
    txt = np.concatenate([np.load(folder / "text_emb" / f"text_emb_{i}.npy") for i in range(3)]).astype(np.float32)
    first = {}
    for k, s in enumerate(samples):
        first.setdefault(s["image_path"], k)
    np.testing.assert_allclose(stored(tmp_path / "store", "texts"), txt, atol=2e-3)
    np.testing.assert_allclose(stored(tmp_path / "store", "images"), img[list(first.values())], atol=2e-3)
    store = Store.open(tmp_path / "store", require_complete=True)
    assert store.teachers["image"]["model"] == "ViT-B-32/openai"
    assert store.teachers["text"]["spec"] == f"clip-retrieval:{folder.resolve()}"
    assert store.has_neighbors("images") and store.neighbors("texts")[0].shape == (len(samples), 4)
    assert verify_store(store).ok
    assert manifest.splits() == [""]  # without --split-column or --split: one unlabelled split


def test_clip_retrieval_import_takes_splits_from_a_column_and_resumes_as_a_build_does(clip_output, tmp_path):
    folder, samples = clip_output
    first = import_cli(folder, tmp_path / "store", "--split-column", "split")
    manifest = read_manifest(first["annotations"])
    assert [im.split for im in manifest.images] == ["val" if i % 7 == 0 else "train" for i in range(len(manifest.images))]
    again = import_cli(folder, tmp_path / "store", "--split-column", "split")
    assert again["images"]["rows"] == 0 and again["texts"]["rows"] == 0  # nothing redone


@pytest.mark.parametrize("damage, message", [
    ("no-text", "no text_emb/ folder (clip-retrieval inference ran without --enable_text?)"),
    ("row-count", "but metadata_1.parquet has"),
    ("no-partner", "partition 2 has no metadata/metadata_2.parquet"),
    ("column", "no column 'key'"),
])
def test_broken_clip_retrieval_output_is_a_one_line_error(clip_output, tmp_path, damage, message):
    folder = tmp_path / "out"
    shutil.copytree(clip_output[0], folder)
    extra = []
    if damage == "no-text":
        shutil.rmtree(folder / "text_emb")
    elif damage == "row-count":
        np.save(folder / "img_emb" / "img_emb_1.npy", np.load(folder / "img_emb" / "img_emb_1.npy")[:-1])
    elif damage == "no-partner":
        (folder / "metadata" / "metadata_2.parquet").unlink()
    else:
        extra = ["--id-column", "key"]
    result = CliRunner().invoke(cache_main, ["import-clip-retrieval", str(folder), "--out", str(tmp_path / "s"),
                                             *extra])
    assert result.exit_code == 1 and message in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "s").exists()


def test_a_store_imported_from_clip_retrieval_trains(clip_output, demo_cache, demo_dir, tmp_path):
    folder, _ = clip_output
    summary = import_cli(folder, tmp_path / "store")
    with one_torch_thread():
        result = invoke_json(train_main, ["--data", summary["annotations"], "--cache", summary["store"], "--out",
                                          str(tmp_path / "run"), "--epochs", "1", "--batch-size", "32", "--workers",
                                          "0", "--device", "cpu", "--json", "--set", "frozen.hidden=32",
                                          "--set", "frozen.embed_dim=32", "--set",
                                          f"frozen.feature_cache={tmp_path / 'features'}"])
    assert result["teacher_passes"] == 0 and result["soft_labels_mode"] == "dense"
    assert result["train_pairs"] == len(clip_output[1])
