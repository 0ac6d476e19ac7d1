"""Teacher embeddings that travel inside the shards (DataCompDR's layout): `member:npz:FIELD` builds a store without
running a model, whose rows are the npz members' rows (the first augmentation or their mean for images, a sample's
k-th caption's row for captions)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_shards import png_bytes, write_shard

from pipeline.cli import main
from servers import FileServer
from teacher_cache.store import Store

DIM = 8


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def datacompdr_shards(folder: Path, n_shards: int = 2, per_shard: int = 3, seed: int = 0) -> tuple[str, dict]:
    """Shards of samples KEY.png, KEY.txt (one or two captions), KEY.npz (image_emb [3, D], text_emb [1 + 2, D]);
    returns the pattern and each sample's arrays by key."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for k in range(n_shards):
        samples = []
        for i in range(per_shard):
            key = f"{k:03d}{i:04d}"
            captions = [f"sample {key} first"] + ([f"sample {key} second"] if i % 2 else [])
            image_emb = rng.standard_normal((3, DIM)).astype(np.float32)
            text_emb = rng.standard_normal((3, DIM)).astype(np.float32)
            arrays[key] = {"image_emb": image_emb, "text_emb": text_emb, "captions": captions}
            samples.append({"__key__": key, "png": png_bytes((10 * i, 20, 30)), "txt": "\n".join(captions),
                            "npz": npz_bytes(image_emb=image_emb, text_emb=text_emb)})
        write_shard(folder / f"train-{k:06d}.tar", samples)
    return f"{folder}/train-{{000000..{n_shards - 1:06d}}}.tar", arrays


def unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float16)


def build(source: str, out: Path, image: str = "member:npz:image_emb", text: str = "member:npz:text_emb",
          *extra: str):
    return CliRunner().invoke(main, ["build", source, "--out", str(out), "--image-teacher", image, "--text-teacher",
                                     text, "--neighbors", "0", "--workers", "0", "--json", *extra])


@pytest.mark.parametrize("reduce", ["first", "mean"])
def test_a_store_built_from_npz_members_holds_their_rows_and_no_model_runs(tmp_path, reduce, monkeypatch):
    source, arrays = datacompdr_shards(tmp_path / "data")
    monkeypatch.setattr("pipeline.teachers.registry.build_minilm", lambda *a: pytest.fail("a model was built"))
    image = "member:npz:image_emb" + (":mean" if reduce == "mean" else "")
    result = build(source, tmp_path / "store", image)
    assert result.exit_code == 0, result.output
    store = Store.open(tmp_path / "store", require_complete=True)
    keys = [k for k in arrays]  # shard order, then sample order
    want_images = [a["image_emb"][0] if reduce == "first" else a["image_emb"].mean(axis=0) for a in arrays.values()]
    np.testing.assert_array_equal(store.array("images")[:], unit(np.stack(want_images)))
    want_texts = [arrays[k]["text_emb"][j] for k in keys for j in range(len(arrays[k]["captions"]))]
    np.testing.assert_array_equal(store.array("texts")[:], unit(np.stack(want_texts)))
    assert store.counts == {"images": 6, "texts": 8} and store.dims == {"images": DIM, "texts": DIM}
    teacher = store.teachers["image"]
    assert teacher["spec"] == image and teacher["field"] == "image_emb" and teacher["reduce"] == reduce
    assert store.teachers["text"]["reduce"] == "caption row"


def test_a_sample_without_the_array_is_an_unreadable_image_named_and_skippable(tmp_path):
    source, arrays = datacompdr_shards(tmp_path / "data", n_shards=1)
    shard = tmp_path / "data" / "train-000000.tar"
    samples = []
    for i, (key, a) in enumerate(arrays.items()):
        npz = npz_bytes(text_emb=a["text_emb"]) if i == 1 else npz_bytes(image_emb=a["image_emb"],
                                                                          text_emb=a["text_emb"])
        samples.append({"__key__": key, "png": png_bytes(), "txt": "\n".join(a["captions"]), "npz": npz})
    write_shard(shard, samples)
    refused = build(source, tmp_path / "store")
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    line = refused.output.strip().splitlines()[-1]
    assert line.startswith(f"Error: {shard}: sample '0000001' (image row 1): the npz member has no array "
                           "'image_emb' (it has text_emb)"), line
    kept = build(source, tmp_path / "store", "member:npz:image_emb", "member:npz:text_emb", "--on-bad-image", "skip")
    assert kept.exit_code == 0, kept.output
    store = Store.open(tmp_path / "store", require_complete=True)
    assert [s["row"] for s in store.skipped_images] == [1]
    assert not store.array("images")[1].any() and store.array("images")[0].any()


def test_member_teachers_refuse_what_they_cannot_read_in_one_line(tmp_path):
    source, _ = datacompdr_shards(tmp_path / "data", n_shards=1)
    bad_spec = build(source, tmp_path / "s1", "member:zip:image_emb")
    assert bad_spec.exit_code == 1 and "only npz members are read" in bad_spec.output
    assert len(bad_spec.output.strip().splitlines()) == 1
    ann = tmp_path / "captions_train.json"
    ann.write_text(json.dumps([{"image": "a.png", "caption": "a caption"}]))
    (tmp_path / "a.png").write_bytes(png_bytes())
    not_shards = build(str(ann), tmp_path / "s2")
    assert not_shards.exit_code == 1 and "is not a shard source" in not_shards.output
    assert not (tmp_path / "s2" / "zarr.json").exists()


@pytest.mark.parametrize("where", ["http", "pipe"])
def test_member_teachers_read_shards_at_a_url_or_from_a_command_as_they_read_local_ones(tmp_path, where,
                                                                                      monkeypatch):
    monkeypatch.setenv("CUSA_CACHE_DIR", str(tmp_path / "cusa-cache"))
    source, _ = datacompdr_shards(tmp_path / "data")
    local = build(source, tmp_path / "local")
    assert local.exit_code == 0, local.output
    if where == "http":
        server = FileServer(tmp_path / "data").start()
        try:
            remote = build(server.url("train-{000000..000001}.tar"), tmp_path / "remote")
        finally:
            server.stop()
        assert {get.split(" ")[0] for get in server.gets} == {"train-000000.tar", "train-000001.tar"}
    else:
        remote = build(f"pipe:cat {tmp_path}/data/train-{{000000..000001}}.tar", tmp_path / "remote")
    assert remote.exit_code == 0, remote.output
    a, b = Store.open(tmp_path / "local", require_complete=True), Store.open(tmp_path / "remote", require_complete=True)
    for modality in ("images", "texts"):
        np.testing.assert_array_equal(a.array(modality)[:], b.array(modality)[:])
    assert a.counts == b.counts == {"images": 6, "texts": 8}
