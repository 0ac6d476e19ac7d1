"""Region-based students end to end on the demo set: `cusa-train` for SGR and SAF on grid regions (computed once,
cached as a store) and on a SCAN-layout precomp folder, `cusa-eval` recalls equal to a hand ranking of the students'
pair scores, `--ensemble` ranking by the mean of two runs' similarity matrices, and the one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers_train import METRIC_KEYS, invoke, invoke_json, one_torch_thread, read_jsonl, run_script, train_args
from train.cli import eval_main, train_main
from train.data import load_split
from train.evaluation_run import load_trained_student
from train.regions import grid_regions, precomp_regions
from train.trainer import default_feature_cache
from train.vocab import CaptionTokens, Vocabulary

GRID = "grid:efficientnet-lite0"
TINY = ["--set", "region.embed_dim=16", "--set", "region.sim_dim=8", "--set", "region.word_dim=8",
        "--set", "region.uni_dim=16", "--set", "region.min_count=1"]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield


def region_args(demo_dir: Path, cache: Path, out: Path, student: str, *extra: str, epochs: int = 2,
                val: bool = True) -> list[str]:
    args = ["--student", student, "--preset", "sgraf-paper", "--data", demo_dir / "train.json", "--cache", cache,
            "--out", out, "--epochs", str(epochs), "--batch-size", "32", "--lr", "1e-3", "--seed", "0",
            "--workers", "0", "--device", "cpu", "--json", *TINY]
    if val:
        args += ["--val-data", demo_dir / "val.json"]
    return [str(a) for a in [*args, *extra]]


@pytest.fixture(scope="module")
def region_runs(demo_dir, demo_cache, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("region")
    runs = {}
    with one_torch_thread():
        for kind, loss in (("sgr", "cusa"), ("saf", "contrastive")):
            out = root / kind
            summary = invoke_json(train_main, region_args(demo_dir, demo_cache, out, f"{kind}:{GRID}", "--loss",
                                                          loss))
            runs[kind] = (out, summary)
    return runs


def test_sgr_and_saf_train_with_the_sgraf_paper_preset_and_their_own_rates(region_runs):
    expected_rates = {"sgr": (0.60, 0.75), "saf": (1.00, 0.75)}
    for kind, (out, summary) in region_runs.items():
        cfg = json.loads((out / "config.json").read_text())
        assert (cfg["csa"]["rate"], cfg["usa"]["rate"]) == expected_rates[kind]
        # --lr 1e-3 without a floor keeps the preset's: 1e-5 / 2e-4 of it
        assert (cfg["lr"], cfg["min_lr"], cfg["weight_decay"], cfg["epochs"]) == (1e-3, pytest.approx(5e-5), 1e-4, 2)
        assert cfg["csa"]["tau"]["init"] == 0.45 and cfg["usa"]["tau_images"]["init"] == 0.45
        assert cfg["itr"] == {"loss": "auto", "margin": 0.2, "max_violation": True, "reduction": "mean"}
        assert cfg["region"]["embed_dim"] == 16 and cfg["student"] == f"{kind}:{GRID}"
        assert summary["steps"] == 14 and summary["teacher_passes"] == 0
        assert (out / "best.pt").is_file() and 0 <= summary["best_val"]["rsum"] <= 600
    assert region_runs["sgr"][1]["loss_terms"] == ["contrastive", "csa", "usa"]
    assert region_runs["saf"][1]["loss_terms"] == ["contrastive"]


def test_the_itr_term_of_a_region_student_is_the_triplet_loss_without_a_temperature(region_runs):
    for kind, (out, _) in region_runs.items():
        steps = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "step"]
        assert "tau" not in steps[0]  # InfoNCE's temperature exists only when the ITR term is InfoNCE
        # margin 0.2, averaged over the batch (sgraf-paper): two hardest-negative hinges a pair, each in [0, 1.2]
        assert all(0 < r["contrastive"] <= 2 * 1.2 for r in steps)
        assert steps[0]["contrastive"] == pytest.approx(2 * 0.2, rel=0.5)  # scores start out nearly equal
    sgr_steps = [r for r in read_jsonl(region_runs["sgr"][0] / "metrics.jsonl") if r["kind"] == "step"]
    assert all(r["csa"] > 0 and r["usa"] > 0 and 0.1 <= r["tau_csa"] <= 0.99 for r in sgr_steps)


def test_the_run_keeps_the_vocabulary_of_its_training_captions(region_runs, demo_dir):
    out, _ = region_runs["sgr"]
    manifest = load_split(str(demo_dir / "train.json"), "train")
    expected = Vocabulary.build(manifest.caption_texts(), min_count=1).to_dict()
    ckpt = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    assert ckpt["vocab"] == expected == json.loads((out / "vocab.json").read_text())
    assert ckpt["dims"] == {"image_dim": 1280, "vocab_size": len(expected["words"])}


def test_grid_regions_are_computed_once_per_split_and_reused_by_every_later_run(region_runs, demo_dir, demo_cache):
    # the first run embedded the train and val splits; the second run found both in the feature cache
    assert region_runs["sgr"][1]["backbone_passes"] == 2
    assert region_runs["saf"][1]["backbone_passes"] == 0
    manifest = load_split(str(demo_dir / "train.json"), "train")
    regions = grid_regions(str(demo_dir / "train.json"), "train", manifest, "efficientnet-lite0",
                           default_feature_cache(str(demo_cache)), progress=False, workers=0, device="cpu")
    assert not regions.computed and len(regions) == 42
    block = regions.take([0, 5])
    assert block.shape == (2, 49, 1280)
    # rows are stored at unit norm and read back scaled by √49: the mean squared region norm is 1
    assert float((block ** 2).sum(-1).mean(-1).min()) == pytest.approx(1.0, abs=1e-2)


def student_scores(run: Path, demo_dir: Path, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """A region run's best checkpoint scoring every test pair in one batch, by hand (no chunking, no evaluator)."""
    student, cfg, _ = load_trained_student(run / "best.pt", "cpu")
    manifest = load_split(str(demo_dir / f"{split}.json"), split)
    regions = grid_regions(str(demo_dir / f"{split}.json"), split, manifest, "efficientnet-lite0",
                           default_feature_cache(cfg.cache), progress=False, workers=0, device="cpu")
    tokens = CaptionTokens(manifest.caption_texts(), student.vocab, cfg.region.max_words)
    with torch.no_grad():
        sims = student(regions.take(np.arange(len(regions))), tokens.take(np.arange(len(tokens))))["sims"]
    return sims.double().numpy(), manifest.caption_image_rows()


def hand_ranked(sims: np.ndarray, image_of_caption: np.ndarray) -> dict[str, float]:
    i2t = [min(int((sims[i] > sims[i, j]).sum()) for j in np.flatnonzero(image_of_caption == i))
           for i in range(sims.shape[0])]
    t2i = [int((sims[:, j] > sims[image_of_caption[j], j]).sum()) for j in range(sims.shape[1])]
    out = {f"{name}_r{k}": 100.0 * float(np.mean(np.array(r) < k)) for name, r in (("i2t", i2t), ("t2i", t2i))
           for k in (1, 5, 10)}
    out["rsum"] = sum(out.values())
    return out


@pytest.fixture(scope="module")
def sgr_eval(region_runs, demo_dir) -> dict:
    """`cusa-eval SGR_RUN --data test.json --json` through the installed script."""
    proc = run_script("cusa-eval", [region_runs["sgr"][0], "--data", demo_dir / "test.json", "--device", "cpu",
                                    "--json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_eval_recalls_equal_a_hand_ranking_of_the_students_pair_scores(region_runs, sgr_eval, demo_dir):
    sims, rows = student_scores(region_runs["sgr"][0], demo_dir)
    assert sims.shape == (9, 45) and sims.std() > 1e-4
    expected = hand_ranked(sims, rows)
    for key in (*METRIC_KEYS, "rsum"):
        assert sgr_eval[key] == pytest.approx(expected[key]), key
    assert sgr_eval["checkpoint"] == str(region_runs["sgr"][0] / "best.pt")
    assert sgr_eval["backbone_passes"] == 1  # the test split's regions, computed now and cached


def test_ensemble_ranks_by_the_mean_of_the_two_runs_pair_scores(region_runs, sgr_eval, demo_dir):
    result = invoke_json(eval_main, [region_runs["sgr"][0], "--ensemble", region_runs["saf"][0], "--data",
                                     demo_dir / "test.json", "--device", "cpu", "--json"])
    sgr, rows = student_scores(region_runs["sgr"][0], demo_dir)
    saf, _ = student_scores(region_runs["saf"][0], demo_dir)
    expected = hand_ranked((sgr + saf) / 2, rows)
    for key in (*METRIC_KEYS, "rsum"):
        assert result[key] == pytest.approx(expected[key]), key
    members = result["ensemble"]["members"]
    assert [m["student"] for m in members] == [f"sgr:{GRID}", f"saf:{GRID}"]
    assert members[0]["rsum"] == pytest.approx(sgr_eval["rsum"])
    assert members[1]["rsum"] == pytest.approx(hand_ranked(saf, rows)["rsum"])
    assert result["backbone_passes"] == 0  # both runs read the test regions the first evaluation cached
    human = invoke(eval_main, [region_runs["sgr"][0], "--ensemble", region_runs["saf"][0], "--data",
                               demo_dir / "test.json", "--device", "cpu"])
    assert human.exit_code == 0 and "ensemble of" in human.stdout and "rsum" in human.stdout


def test_a_dual_encoder_and_a_region_student_ensemble_through_their_similarity_matrices(region_runs, demo_dir,
                                                                                       demo_cache, tmp_path):
    frozen = tmp_path / "frozen"
    invoke_json(train_main, train_args(demo_dir, demo_cache, frozen, epochs=1))
    result = invoke_json(eval_main, [frozen, "--ensemble", region_runs["sgr"][0], "--data", demo_dir / "test.json",
                                     "--device", "cpu", "--workers", "0", "--json"])
    from train.features import frozen_features

    student, cfg, _ = load_trained_student(frozen / "last.pt", "cpu")
    manifest = load_split(str(demo_dir / "test.json"), "test")
    fs = frozen_features(str(demo_dir / "test.json"), "test", manifest, "efficientnet-lite0",
                         "minilm-l6", default_feature_cache(cfg.cache), progress=False, workers=0, device="cpu")
    with torch.no_grad():
        cosine = (student.encode_images(torch.from_numpy(fs.images)) @ student.encode_texts(
            torch.from_numpy(fs.texts)).T).double().numpy()
    sgr, rows = student_scores(region_runs["sgr"][0], demo_dir)
    expected = hand_ranked((cosine + sgr) / 2, rows)
    for key in (*METRIC_KEYS, "rsum"):
        assert result[key] == pytest.approx(expected[key]), key


def test_uni_modal_evaluations_use_the_region_students_uni_embeddings(region_runs, demo_dir, tmp_path):
    entries = json.loads((demo_dir / "test.json").read_text())
    labels = tmp_path / "labels.csv"
    labels.write_text("image,label\n" + "".join(f"{demo_dir / e['image']},{i % 2}\n" for i, e in enumerate(entries)))
    sts = tmp_path / "sts.tsv"
    sts.write_text("sentence1\tsentence2\tscore\n" + "".join(
        f"{e['caption'][0]}\t{e['caption'][j]}\t{j}\n" for e in entries for j in (1, 2)))
    run = region_runs["sgr"][0]
    result = invoke_json(eval_main, [run, "--data", demo_dir / "test.json", "--device", "cpu", "--workers", "0",
                                     "--image-labels", labels, "--sts", sts, "--json"])
    assert result["image_retrieval"]["images"] == 9 and result["image_retrieval"]["embedding"] == "uni"
    assert result["sts"]["pairs"] == 18 and -100 <= result["sts"]["spearman"] <= 100
    # the image files embedded directly equal the cached test regions through the same uni head
    from train.embedding import StudentEmbedder

    embedder = StudentEmbedder.from_checkpoint(run / "best.pt", "cpu")
    student = embedder.student
    manifest = load_split(str(demo_dir / "test.json"), "test")
    regions = grid_regions(str(demo_dir / "test.json"), "test", manifest, "efficientnet-lite0",
                           default_feature_cache(embedder.config.cache), progress=False, workers=0, device="cpu")
    with torch.no_grad():
        direct = embedder.images([manifest.image_path(r) for r in range(9)], "uni")
        cached = student.encode_images_uni(regions.take(np.arange(9)))
    assert torch.allclose(direct, cached, atol=2e-3)
    for flag, message in ((["--image-labels", labels, "--image-embedding", "cross"], "cross-modal image embeddings"),
                          (["--sts", sts, "--text-embedding", "cross"], "cross-modal text embeddings"),
                          (["--examples", "2"], "--examples ranks by cross-modal embeddings")):
        out = invoke(eval_main, [run, "--data", demo_dir / "test.json", "--device", "cpu", *flag])
        assert out.exit_code == 1 and message in out.output and len(out.output.strip().splitlines()) == 1, out.output


class Interrupted(BaseException):
    pass


def test_resuming_a_region_run_reproduces_the_uninterrupted_one(demo_dir, demo_cache, tmp_path, monkeypatch):
    from train.metrics_log import MetricsLogger

    whole, part = tmp_path / "whole", tmp_path / "part"
    invoke_json(train_main, region_args(demo_dir, demo_cache, whole, f"saf:{GRID}", val=False))
    log = MetricsLogger.log

    def log_then_stop(self, record):
        log(self, record)
        if record["kind"] == "step" and record["epoch"] == 2:
            raise Interrupted  # stopped inside the second epoch: last.pt holds the first

    monkeypatch.setattr(MetricsLogger, "log", log_then_stop)
    with pytest.raises(Interrupted):
        invoke(train_main, region_args(demo_dir, demo_cache, part, f"saf:{GRID}", val=False))
    monkeypatch.setattr(MetricsLogger, "log", log)
    assert torch.load(part / "last.pt", map_location="cpu", weights_only=True)["epoch"] == 1
    invoke_json(train_main, region_args(demo_dir, demo_cache, part, f"saf:{GRID}", "--resume", val=False))
    a = torch.load(whole / "last.pt", map_location="cpu", weights_only=True)["student"]
    b = torch.load(part / "last.pt", map_location="cpu", weights_only=True)["student"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["filtration.norm.running_mean"], torch.zeros(()))  # SAF's BatchNorm did train


def test_bad_region_settings_are_one_line_errors(demo_dir, demo_cache, tmp_path):
    cases = [
        (["--student", "sgr:efficientnet-lite0"], "reads regions from 'grid:IMAGE_SPEC'"),
        (["--student", "frozen:efficientnet-lite0+minilm-l6"], "preset 'sgraf-paper' holds settings for sgr:, saf:"),
        (["--student", "saf:grid:minilm-l6"], "cannot encode image"),
        (["--student", f"sgr:{GRID}", "--set", "region.pooling=max"], "region.pooling must be attention or mean"),
        (["--student", f"sgr:{GRID}", "--set", "itr.loss=hinge"], "loss must be one of auto|contrastive|triplet"),
    ]
    for extra, message in cases:
        args = [a for a in region_args(demo_dir, demo_cache, tmp_path / "run", f"sgr:{GRID}", val=False)]
        args[1] = extra[1]  # the --student value
        result = invoke(train_main, [*args, *extra[2:]])
        assert result.exit_code == 1 and message in result.output, (extra, result.output)
        assert len(result.output.strip().splitlines()) == 1, result.output


# ------------------------------------------------------------------------------------------ precomp:DIR
def write_precomp(root: Path, demo_dir: Path, regions: int = 4, dim: int = 16) -> Path:
    """A SCAN/SGRAF-layout folder for the demo splits: random bottom-up-like features, captions from the data
    (val under SCAN's name "dev")."""
    rng = np.random.default_rng(0)
    root.mkdir()
    for split, name in (("train", "train"), ("val", "dev"), ("test", "test")):
        manifest = load_split(str(demo_dir / f"{split}.json"), split)
        np.save(root / f"{name}_ims.npy",
                rng.gamma(1.0, 1.0, size=(len(manifest.images), regions, dim)).astype(np.float32))
        (root / f"{name}_caps.txt").write_text("".join(f"{t} \n" for t in manifest.caption_texts()))
    return root


def test_a_precomp_region_student_trains_and_evaluates(demo_dir, demo_cache, tmp_path):
    precomp = write_precomp(tmp_path / "precomp", demo_dir)
    out = tmp_path / "run"
    summary = invoke_json(train_main, region_args(demo_dir, demo_cache, out, f"sgr:precomp:{precomp}", epochs=1))
    assert summary["backbone_passes"] == 0 and summary["best_val"] is not None
    assert torch.load(out / "last.pt", map_location="cpu", weights_only=True)["dims"]["image_dim"] == 16
    result = invoke_json(eval_main, [out, "--data", demo_dir / "test.json", "--device", "cpu", "--json"])
    assert (result["images"], result["captions"]) == (9, 45) and 0 <= result["rsum"] <= 600


def test_precomp_layout_mismatches_are_one_line_errors_naming_the_file_and_line(demo_dir, demo_cache, tmp_path):
    precomp = write_precomp(tmp_path / "precomp", demo_dir)
    manifest = load_split(str(demo_dir / "test.json"), "test")
    good = precomp_regions(precomp, "test", manifest)
    assert (len(good), good.n_regions, good.region_dim) == (9, 4, 16)
    assert precomp_regions(precomp, "val", load_split(str(demo_dir / "val.json"), "val")).source.endswith(
        "dev_ims.npy")
    caps = precomp / "test_caps.txt"
    lines = caps.read_text().splitlines()

    def error() -> str:
        with pytest.raises(ValueError) as err:
            precomp_regions(precomp, "test", manifest)
        return str(err.value)

    caps.write_text("\n".join(lines[:-1]) + "\n")
    assert "test_caps.txt: 44 captions, but" in error()
    caps.write_text("\n".join([*lines[:7], "a purple elephant juggling", *lines[8:]]) + "\n")
    message = error()
    assert "test_caps.txt: line 8 is 'a purple elephant juggling', but the manifest's caption 7" in message
    swapped = [*lines]
    swapped[0], swapped[5] = swapped[5], swapped[0]  # captions of images 0 and 1 swapped: the order is checked
    caps.write_text("\n".join(swapped) + "\n")
    assert "line 1 is" in error()
    caps.write_text("\n".join(lines) + "\n")
    np.save(precomp / "test_ims.npy", np.zeros((8, 4, 16), dtype=np.float32))
    assert "test_ims.npy: 8 image rows, but" in error()
    np.save(precomp / "test_ims.npy", np.zeros((9, 64), dtype=np.float32))
    assert "expected a float array [images, regions, dim]" in error()
    (precomp / "test_ims.npy").unlink()
    assert "no test_ims.npy or testall_ims.npy for the 'test' split" in error()
    with pytest.raises(ValueError, match="precomputed region folder not found"):
        precomp_regions(tmp_path / "nowhere", "test", manifest)
    # through the command line: one line, exit 1, nothing trained
    (precomp / "train_caps.txt").write_text("only one caption\n")
    out = tmp_path / "run"
    result = invoke(train_main, region_args(demo_dir, demo_cache, out, f"saf:precomp:{precomp}", val=False))
    assert result.exit_code == 1 and "train_caps.txt: 1 captions, but" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (out / "last.pt").exists()
