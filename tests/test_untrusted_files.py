"""Opening someone else's files never runs their code: checkpoints (cusa-eval, cusa-train --resume,
StudentEmbedder.from_checkpoint) and precomputed feature files (cusa-cache build, import-features).

Each crafted file holds an object whose unpickling writes a marker file; the first test proves that payload is
live (plain unpickling does write the marker), the others that no command ever writes it. Checkpoints of the
previous release (numpy's RNG state pickled as numpy objects) still evaluate and resume.
"""

from __future__ import annotations

import json
import random
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers_train import assert_identical, invoke, invoke_json, run_script, train_args
from pipeline.cli import main as cache_main
from pipeline.errors import EncoderError
from pipeline.teachers.hashing import file_sha256
from pipeline.teachers.registry import build_encoder
from train.checkpoint import CheckpointError, load_checkpoint, plain_rng_state, rng_state, set_rng_state
from train.cli import eval_main, train_main
from train.embedding import StudentEmbedder

EVAL_FLAGS = ("--json", "--workers", "0", "--device", "cpu")


class RunsCodeWhenUnpickled:
    """Unpickling this object executes Python that writes ``marker``: what a hostile file would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('unpickled')",))


def legacy_rng_state() -> dict:
    """The RNG state exactly as the previous release saved it (numpy's as a tuple holding a numpy array)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def crafted_checkpoint(source: Path, dest: Path, marker: Path, legacy: bool = False) -> Path:
    """A real cusa-train checkpoint with a code-running object added (in the previous format if ``legacy``)."""
    payload = torch.load(source, map_location="cpu", weights_only=True)
    if legacy:
        payload["rng"] = legacy_rng_state()  # numpy globals first: the loader's legacy path meets the payload
    payload["config"]["note"] = RunsCodeWhenUnpickled(marker)
    torch.save(payload, dest)
    return dest


def crafted_npy(path: Path, marker: Path) -> Path:
    """The authors' {image_id: vector} format, with one value that runs code when unpickled."""
    np.save(path, {"img0": np.ones(4, dtype=np.float32), "img1": RunsCodeWhenUnpickled(marker)}, allow_pickle=True)
    return path


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-2000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr[-2000:]
    assert lines[0].startswith("Error: ")
    return lines[0]


@pytest.fixture(scope="module")
def trained_run(demo_dir, demo_cache, tmp_path_factory) -> Path:
    """A run trained by the current code (2 epochs, validated: best.pt and last.pt)."""
    out = tmp_path_factory.mktemp("untrusted") / "run"
    invoke_json(train_main, train_args(demo_dir, demo_cache, out, epochs=2, val=True))
    return out


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(trained_run, dst)
    return dst


# ================================================================================================ the payloads are live
def test_the_crafted_files_do_run_code_when_unpickled_without_restrictions(trained_run, tmp_path):
    ckpt_marker, npy_marker = tmp_path / "ckpt-ran", tmp_path / "npy-ran"
    ckpt = crafted_checkpoint(trained_run / "best.pt", tmp_path / "best.pt", ckpt_marker)
    torch.load(ckpt, map_location="cpu", weights_only=False)
    assert ckpt_marker.read_text() == "unpickled"
    npy = crafted_npy(tmp_path / "features.npy", npy_marker)
    np.load(npy, allow_pickle=True)
    assert npy_marker.read_text() == "unpickled"


# ================================================================================================ checkpoints
def test_cusa_eval_refuses_a_crafted_best_pt_in_one_line_and_never_runs_it(run_copy, demo_dir, tmp_path):
    marker = tmp_path / "ran"
    crafted_checkpoint(run_copy / "best.pt", run_copy / "best.pt", marker)
    proc = run_script("cusa-eval", [run_copy, "--data", demo_dir / "test.json", *EVAL_FLAGS])
    assert proc.returncode == 1 and proc.stdout == ""
    line = one_error_line(proc.stderr)
    assert line.startswith(f"Error: {run_copy / 'best.pt'}: refused: it needs the Python object ")
    assert "exec" in line and "could run code" in line
    assert not marker.exists()


def test_a_crafted_checkpoint_in_the_previous_format_is_refused_too(run_copy, demo_dir, tmp_path):
    # its numpy globals are allowed for the legacy RNG state; the code-running object after them is not
    marker = tmp_path / "ran"
    crafted_checkpoint(run_copy / "best.pt", run_copy / "best.pt", marker, legacy=True)
    result = invoke(eval_main, [run_copy, "--data", demo_dir / "test.json", *EVAL_FLAGS])
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1
    assert f"{run_copy / 'best.pt'}: refused: it needs the Python object " in result.output
    assert "exec" in result.output
    with pytest.raises(CheckpointError, match="refused"):
        StudentEmbedder.from_checkpoint(run_copy / "best.pt")
    assert not marker.exists()


def test_cusa_train_resume_refuses_a_crafted_last_pt_and_never_runs_it(run_copy, demo_dir, demo_cache, tmp_path):
    marker = tmp_path / "ran"
    crafted_checkpoint(run_copy / "last.pt", run_copy / "last.pt", marker)
    before = (run_copy / "last.pt").read_bytes()
    result = invoke(train_main, train_args(demo_dir, demo_cache, run_copy, "--resume", epochs=3, val=True))
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1
    assert f"{run_copy / 'last.pt'}: refused" in result.output
    assert not marker.exists()
    assert (run_copy / "last.pt").read_bytes() == before  # nothing was overwritten


def test_student_embedder_from_checkpoint_refuses_a_crafted_file(trained_run, tmp_path):
    marker = tmp_path / "ran"
    ckpt = crafted_checkpoint(trained_run / "best.pt", tmp_path / "shared.pt", marker)
    with pytest.raises(CheckpointError) as err:
        StudentEmbedder.from_checkpoint(ckpt)
    assert str(err.value).startswith(f"{ckpt}: refused") and "\n" not in str(err.value)
    assert not marker.exists()


def test_a_fresh_run_loads_with_torch_weights_only_and_evaluates(trained_run, demo_dir):
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(trained_run / name, map_location="cpu", weights_only=True)  # no allowlist at all
        rng = ckpt["rng"]
        assert isinstance(rng["numpy"]["key"], torch.Tensor) and isinstance(rng["python"]["state"], torch.Tensor)
    proc = run_script("cusa-eval", [trained_run, "--data", demo_dir / "test.json", *EVAL_FLAGS])
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["checkpoint"] == str(trained_run / "best.pt") and result["images"] == 9
    assert result["rsum"] == pytest.approx(sum(result[k] for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1",
                                                                   "t2i_r5", "t2i_r10")))


def to_previous_format(path: Path) -> dict:
    """Rewrite a checkpoint as the previous release wrote it: the same RNG state, as the tuples of
    ``random.getstate()`` and ``np.random.get_state()``, and epochs numbered from 0."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    before = rng_state()
    set_rng_state(payload["rng"])
    payload["rng"] = legacy_rng_state()
    set_rng_state(before)
    del payload["format"]
    payload["epoch"] -= 1
    payload["best"]["epoch"] -= 1
    torch.save(payload, path)
    return payload


def test_a_checkpoint_of_the_previous_release_still_evaluates_and_resumes_exactly(trained_run, demo_dir, demo_cache,
                                                                                   tmp_path):
    legacy, current = tmp_path / "legacy", tmp_path / "current"
    shutil.copytree(trained_run, legacy)
    shutil.copytree(trained_run, current)
    for name in ("best.pt", "last.pt"):
        to_previous_format(legacy / name)
        with pytest.raises(Exception, match="numpy"):  # the plain safe loader alone refuses it
            torch.load(legacy / name, map_location="cpu", weights_only=True)
    converted, fresh = load_checkpoint(legacy / "last.pt"), load_checkpoint(current / "last.pt")
    for part in ("python", "numpy"):
        for key, value in fresh["rng"][part].items():
            got = converted["rng"][part][key]
            assert torch.equal(got, value) if isinstance(value, torch.Tensor) else got == value, (part, key)

    # evaluates: the same recalls as the same weights in the current format
    proc = run_script("cusa-eval", [legacy, "--data", demo_dir / "test.json", *EVAL_FLAGS])
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = invoke_json(eval_main, [current, "--data", demo_dir / "test.json", *EVAL_FLAGS])
    got = json.loads(proc.stdout)
    assert {k: got[k] for k in ("rsum", "i2t_r1", "t2i_r1", "epoch")} == \
           {k: expected[k] for k in ("rsum", "i2t_r1", "t2i_r1", "epoch")}

    # resumes: one more epoch from the legacy last.pt gives bit for bit what the current format gives
    for run in (legacy, current):
        invoke_json(train_main, train_args(demo_dir, demo_cache, run, "--resume", epochs=3, val=True))
    a, b = load_checkpoint(current / "last.pt"), load_checkpoint(legacy / "last.pt")
    assert a["epoch"] == b["epoch"] == 3 and a["best"] == b["best"]
    for key in ("student", "optimizer", "rng"):
        assert_identical(a[key], b[key], key)


def test_a_previous_release_checkpoint_written_under_numpy_1_loads_too(trained_run, tmp_path):
    # numpy 1 pickles its arrays as numpy.core.multiarray._reconstruct (numpy 2: numpy._core.multiarray)
    numpy2 = tmp_path / "numpy2.pt"
    shutil.copy(trained_run / "last.pt", numpy2)
    to_previous_format(numpy2)
    numpy1 = tmp_path / "numpy1.pt"
    with zipfile.ZipFile(numpy2) as src, zipfile.ZipFile(numpy1, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data.pkl"):  # protocol 2: GLOBAL "module\nname\n", length-free
                assert data.count(b"numpy._core.multiarray\n") == 1
                data = data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
            dst.writestr(info, data)
    expected, got = load_checkpoint(trained_run / "last.pt"), load_checkpoint(numpy1)
    assert torch.equal(got["rng"]["numpy"]["key"], expected["rng"]["numpy"]["key"])
    assert got["rng"]["numpy"]["pos"] == expected["rng"]["numpy"]["pos"]


def test_rng_state_round_trips_through_a_weights_only_file_and_converts_the_legacy_tuples(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.normal(), torch.rand(1)  # a cached gaussian and a moved position
    expected = (random.random(), np.random.normal(size=3).tolist(), torch.rand(3).tolist())
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.normal(), torch.rand(1)
    legacy = legacy_rng_state()
    torch.save({"rng": rng_state()}, tmp_path / "rng.pt")
    random.seed(99), np.random.seed(99), torch.manual_seed(99)

    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    assert (random.random(), np.random.normal(size=3).tolist(), torch.rand(3).tolist()) == expected
    set_rng_state(plain_rng_state(legacy))
    assert (random.random(), np.random.normal(size=3).tolist(), torch.rand(3).tolist()) == expected


def test_damaged_or_foreign_checkpoints_are_refused_in_one_line(tmp_path):
    truncated = tmp_path / "truncated.pt"
    torch.save({"student": {"w": torch.ones(100)}}, tmp_path / "whole.pt")
    truncated.write_bytes((tmp_path / "whole.pt").read_bytes()[:200])
    with pytest.raises(CheckpointError, match=f"^{truncated}: cannot read the checkpoint .*damaged"):
        load_checkpoint(truncated)
    tensor_only = tmp_path / "tensor.pt"
    torch.save(torch.ones(3), tensor_only)
    with pytest.raises(CheckpointError, match=f"^{tensor_only}: not a cusa-train checkpoint \\(a Tensor"):
        load_checkpoint(tensor_only)
    with pytest.raises(CheckpointError, match=r"not a cusa-train checkpoint \(no loss, optimizer"):
        load_checkpoint(tmp_path / "whole.pt")


# ================================================================================================ feature files
def test_cusa_cache_build_refuses_a_pickled_npy_teacher_in_one_line_and_never_runs_it(demo_dir, tmp_path):
    marker = tmp_path / "ran"
    npy = crafted_npy(tmp_path / "features.npy", marker)
    out = tmp_path / "store"
    proc = run_script("cusa-cache", ["build", demo_dir / "train.json", "--out", out, "--image-teacher",
                                     f"precomputed:{npy}", "--workers", "0", "--device", "cpu", "--json"])
    assert proc.returncode == 1 and proc.stdout == ""
    line = one_error_line(proc.stderr)
    assert line.startswith(f"Error: {npy}: holds pickled Python objects")
    # says exactly how to convert it or opt in
    assert f"`cusa-cache import-features {npy} --out FEATURES.npz`" in line
    assert f"precomputed:{npy}?trust_pickle=1" in line
    assert not marker.exists() and not out.exists()


def test_import_features_refuses_a_crafted_pickle_in_one_line_and_never_runs_it(tmp_path):
    marker = tmp_path / "ran"
    npy = crafted_npy(tmp_path / "features.npy", marker)
    out = tmp_path / "features.npz"
    proc = run_script("cusa-cache", ["import-features", npy, "--out", out, "--json"])
    assert proc.returncode == 1 and proc.stdout == ""
    line = one_error_line(proc.stderr)
    assert line == (f"Error: {npy}: refused: unpickling it needs the Python object builtins.exec, which is not "
                    "numpy data and could run code; if you trust its author, pass --trust-pickle")
    assert not marker.exists() and not out.exists()


def authors_features(path: Path) -> dict:
    """The CUSA authors' format: {image_id: vector} saved with np.save (a pickle), COCO-style integer ids."""
    rng = np.random.default_rng(0)
    table = {391895: rng.standard_normal(6).astype(np.float32), 7: rng.standard_normal((1, 6)),
             np.int64(42): rng.standard_normal(6).astype(np.float16)}
    np.save(path, table, allow_pickle=True)
    return table


def test_import_features_converts_the_authors_pickled_dict_to_a_plain_npz(tmp_path):
    table = authors_features(tmp_path / "unicom.npy")
    out = tmp_path / "unicom.npz"
    summary = invoke_json(cache_main, ["import-features", tmp_path / "unicom.npy", "--out", out, "--json"])
    assert summary["rows"] == 3 and summary["dim"] == 6 and summary["source_format"] == "pickled-dict"
    assert summary["spec"] == f"precomputed:{out}" and summary["out_sha256"] == file_sha256(out)
    with np.load(out, allow_pickle=False) as saved:  # plain arrays: no pickle needed
        assert saved["ids"].tolist() == ["391895", "7", "42"] and saved["features"].dtype == np.float32
        for row, vector in enumerate(table.values()):
            np.testing.assert_array_equal(saved["features"][row], np.asarray(vector, np.float32).reshape(-1))

    converted = build_encoder(f"precomputed:{out}", "image")
    trusted = build_encoder(f"precomputed:{tmp_path / 'unicom.npy'}?trust_pickle=1", "image")
    ids = ["42", "391895", "000000000007"]
    np.testing.assert_array_equal(converted.encode_ids(ids), trusted.encode_ids(ids))
    # the same rows, but each names the file it read: stores built from the two are different teachers
    assert converted.identity()["weights"] == f"sha256:{file_sha256(out)}"
    assert trusted.identity()["weights"] == f"sha256:{file_sha256(tmp_path / 'unicom.npy')}"

    again = invoke(cache_main, ["import-features", tmp_path / "unicom.npy", "--out", out])
    assert again.exit_code == 1 and "already exists; pass --overwrite" in again.output
    assert invoke(cache_main, ["import-features", tmp_path / "unicom.npy", "--out", out, "--overwrite"]
                  ).exit_code == 0


def test_precomputed_reads_the_authors_pickle_only_with_the_opt_in(tmp_path):
    path = tmp_path / "unicom.npy"
    authors_features(path)
    with pytest.raises(EncoderError) as err:
        build_encoder(f"precomputed:{path}", "image")
    assert f"cusa-cache import-features {path} --out FEATURES.npz" in str(err.value)
    assert f"precomputed:{path}?trust_pickle=1" in str(err.value)
    enc = build_encoder(f"precomputed:{path}?trust_pickle=1", "image")
    assert (enc.dim, len(enc)) == (6, 3)
    assert build_encoder(f"precomputed:{path}?trust_pickle=1", "image").spec.endswith("?trust_pickle=1")
    with pytest.raises(EncoderError, match="unknown option 'trust'; accepted: trust_pickle=1"):
        build_encoder(f"precomputed:{path}?trust=1", "image")
    with pytest.raises(EncoderError, match="trust_pickle must be 1 or 0"):
        build_encoder(f"precomputed:{path}?trust_pickle=maybe", "image")


def test_npz_features_are_read_without_pickle_and_a_pickled_member_is_refused(tmp_path):
    feats = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)
    good = tmp_path / "good.npz"
    np.savez(good, features=feats, ids=np.array(["a", "b", "c"]))
    enc = build_encoder(f"precomputed:{good}", "image")
    np.testing.assert_array_equal(enc.encode_ids(["c", "a"]), feats[[2, 0]])

    marker = tmp_path / "ran"
    hostile = tmp_path / "hostile.npz"
    ids = np.array(["a", "b", RunsCodeWhenUnpickled(marker)], dtype=object)
    np.savez(hostile, features=feats, ids=ids)
    with pytest.raises(EncoderError, match=f"^{hostile}: cannot read features without pickle"):
        build_encoder(f"precomputed:{hostile}", "image")
    assert not marker.exists()

    np.savez(tmp_path / "unnamed.npz", feats)
    with pytest.raises(EncoderError, match=r"needs the arrays 'features' \[N, D\] and 'ids' \[N\]; it holds "
                                           r"\['arr_0'\]"):
        build_encoder(f"precomputed:{tmp_path / 'unnamed.npz'}", "image")
    np.savez(tmp_path / "no_ids.npz", features=feats)
    (tmp_path / "no_ids.ids.txt").write_text("x\ny\nz\n")  # an ids file beside it serves too
    np.testing.assert_array_equal(build_encoder(f"precomputed:{tmp_path / 'no_ids.npz'}", "image")
                                  .encode_ids(["y"]), feats[[1]])


# ================================================================================================ model weight files
TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}


def test_open_clip_and_timm_weight_files_are_read_without_running_code(tmp_path):
    # open_clip 3.3 reads a local file with torch.load(weights_only=True) (a .npz/.npy with np.load, no pickle);
    # timm:NAME:FILE goes through the encoder registry's own weights_only reader
    import open_clip
    import timm

    from train.students import OpenClipStudent

    config = tmp_path / "configs" / "cusa-untrusted-tiny.json"
    config.parent.mkdir()
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    marker = tmp_path / "ran"
    clip_file, timm_file = tmp_path / "clip.pt", tmp_path / "timm.pth"
    state = open_clip.create_model("cusa-untrusted-tiny").state_dict()
    torch.save({"state_dict": state, "note": RunsCodeWhenUnpickled(marker)}, clip_file)
    state = timm.create_model("test_efficientnet", pretrained=False, num_classes=0).state_dict()
    torch.save({**state, "note": RunsCodeWhenUnpickled(marker)}, timm_file)

    for spec, modality in ((f"open_clip:cusa-untrusted-tiny:{clip_file}", "image"),
                           (f"open_clip:cusa-untrusted-tiny:{clip_file}", "text"),
                           (f"timm:test_efficientnet:{timm_file}", "image")):
        weights = spec.rsplit(":", 1)[1]
        with pytest.raises(EncoderError) as err:
            build_encoder(spec, modality)
        assert str(err.value) == (f"{weights}: refused for {spec!r}: it needs the Python object exec, and "
                                  "unpickling it could run code; save the bare state dict with "
                                  "torch.save(model.state_dict(), path)")
    with pytest.raises(ValueError, match=f"^open_clip:cusa-untrusted-tiny:{clip_file}: refused: it needs the "
                                         "Python object exec, and unpickling it could run code"):
        OpenClipStudent.from_spec(f"open_clip:cusa-untrusted-tiny:{clip_file}")
    assert not marker.exists()
