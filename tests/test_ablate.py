"""cusa-ablate and the teacher-neighbor sampler, on the real demo cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from teacher_cache.store import Store
from train.ablate import expand, parse_grid
from train.ablate_cli import ablate_main
from train.data import join_pairs, load_split
from train.samplers import neighbor_batches, pair_neighbor_table


def test_grid_expands_to_the_cartesian_product_with_readable_names():
    settings = expand(parse_grid(["loss=contrastive,cusa", "csa.rate=0.05,0.1,0.2"]))
    assert len(settings) == 6
    assert settings[0].name == "loss=contrastive,csa.rate=0.05"
    assert settings[-1].overrides == {"loss": "cusa", "csa.rate": "0.2"}


@pytest.mark.parametrize("bad", ["loss", "loss=", "=a,b"])
def test_malformed_grid_axis_is_refused(bad):
    with pytest.raises(ValueError, match="KEY=V1,V2"):
        parse_grid([bad])


def test_repeated_grid_key_is_refused():
    with pytest.raises(ValueError, match="given twice"):
        parse_grid(["loss=csa", "loss=cusa"])


def test_neighbor_batches_use_every_pair_once_and_group_teacher_neighbors(demo_dir, demo_cache):
    store = Store.open(demo_cache, require_complete=True)
    pairs = join_pairs(load_split(str(demo_dir / "train.json"), "train"), [store])
    table = pair_neighbor_table(pairs, store)
    assert table.shape == (len(pairs), 8)
    batches = neighbor_batches(table, batch_size=30, seed=0, epoch=0, group=5)
    flat = np.concatenate(batches)
    assert len(flat) == len(set(flat.tolist())) == 210  # 7 full batches of 30: every pair exactly once
    # the second member of most groups is a teacher neighbor of the group's first member
    first = batches[0]
    linked = sum(first[i + 1] in table[first[i]] for i in range(0, 25, 5))
    assert linked >= 4
    again = neighbor_batches(table, batch_size=30, seed=0, epoch=0, group=5)
    assert all((a == b).all() for a, b in zip(batches, again))
    other = neighbor_batches(table, batch_size=30, seed=0, epoch=1, group=5)
    assert not all((a == b).all() for a, b in zip(batches, other))


def test_neighbor_batches_hold_more_teacher_neighbors_than_random_batches(demo_dir, demo_cache):
    store = Store.open(demo_cache, require_complete=True)
    pairs = join_pairs(load_split(str(demo_dir / "train.json"), "train"), [store])
    table = pair_neighbor_table(pairs, store)

    def neighbor_share(batches):
        hits = total = 0
        for b in batches:
            members = set(b.tolist())
            for p in b:
                hits += sum(int(q) in members for q in table[p])
                total += table.shape[1]
        return hits / total

    rng = np.random.default_rng(0)
    random_batches = np.array_split(rng.permutation(len(pairs)), 7)
    assert neighbor_share(neighbor_batches(table, 30, 0, 0, group=8)) > 2 * neighbor_share(random_batches)


def test_ablation_grid_runs_from_one_cache_resumes_and_reports(demo_dir, demo_cache, tmp_path):
    out = tmp_path / "abl"
    args = ["--data", str(demo_dir / "train.json"), "--eval-data", str(demo_dir / "test.json"),
            "--val-data", str(demo_dir / "val.json"), "--cache", str(demo_cache),
            "--grid", "loss=contrastive,cusa", "--seeds", "2", "--epochs", "1", "--batch-size", "32",
            "--lr", "1e-3", "--device", "cpu", "--workers", "0", "--out", str(out), "--json"]
    result = CliRunner().invoke(ablate_main, args)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output[result.output.index("{"):])
    assert payload["counts"]["runs"] == 4 and payload["counts"]["trained"] == 4
    assert payload["counts"]["teacher_passes"] == 0
    # the frozen backbones ran at most once per dataset (val and test features; train reuses the teacher
    # cache itself), never once per run
    assert payload["counts"]["backbone_passes"] <= 2
    names = [s["name"] for s in payload["settings"]]
    assert names == ["loss=contrastive", "loss=cusa"]
    cusa = payload["settings"][1]
    assert cusa["n"] == 2 and cusa["baseline"] == "loss=contrastive"
    assert cusa["gain"]["rsum"] == pytest.approx(cusa["mean"]["rsum"] - payload["settings"][0]["mean"]["rsum"])
    per_seed = cusa["rsum_per_seed"]
    assert cusa["mean"]["rsum"] == pytest.approx(np.mean(per_seed))
    assert cusa["std"]["rsum"] == pytest.approx(np.std(per_seed, ddof=1))
    for name in ("results.json", "results.md", "rsum_by_setting.png", "training_curves.png"):
        assert (out / name).stat().st_size > 100
    assert (out / "rsum_by_setting.png").read_bytes()[:4] == b"\x89PNG"

    rerun = CliRunner().invoke(ablate_main, args)
    assert rerun.exit_code == 0, rerun.output
    again = json.loads(rerun.output[rerun.output.index("{"):])
    assert again["counts"]["trained"] == 0 and again["counts"]["skipped_finished"] == 4
    assert again["counts"]["backbone_passes"] == 0
    assert again["settings"][1]["mean"] == cusa["mean"]


def _ablate(args: list) -> tuple[int, str]:
    result = CliRunner().invoke(ablate_main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def test_a_rerun_with_other_settings_or_eval_split_never_reports_the_first_grids_numbers(demo_dir, demo_cache,
                                                                                         tmp_path):
    out = tmp_path / "abl"
    base = ["--data", demo_dir / "train.json", "--cache", demo_cache, "--grid", "loss=cusa", "--seeds", "1",
            "--batch-size", "32", "--device", "cpu", "--workers", "0", "--out", out, "--json",
            "--set", "frozen.hidden=64", "--set", "frozen.embed_dim=64"]
    test = ["--eval-data", demo_dir / "test.json"]
    code, output = _ablate(base + test + ["--epochs", "3"])
    assert code == 0, output
    first = json.loads(output)
    assert [r["config"]["epochs"] for r in first["runs"]] == [3, 3]
    assert {(r["eval_split"], r["eval_data"]) for r in first["runs"]} == {("test", str(demo_dir / "test.json"))}
    md = (out / "results.md").read_text()
    assert "±" not in md  # one seed: no spread to show
    assert first["settings"][0]["std"]["rsum"] is None

    # another --epochs: refused in one line naming the setting, nothing retrained, results untouched
    results_before = (out / "results.json").read_bytes()
    code, output = _ablate(base + test + ["--epochs", "4"])
    assert code == 1
    assert output.strip().splitlines() == [
        f"Error: {out / 'runs' / 'loss=contrastive-seed0'}: was made with epochs = 3, this grid asks for 4; "
        "pass --overwrite to retrain it, or choose another --out"]
    assert (out / "results.json").read_bytes() == results_before

    # with --overwrite: retrained for 4 epochs, new numbers
    code, output = _ablate(base + test + ["--epochs", "4", "--overwrite"])
    assert code == 0, output
    second = json.loads(output)
    assert second["counts"]["trained"] == 2 and second["counts"]["overwritten"] == 2
    assert [r["config"]["epochs"] for r in second["runs"]] == [4, 4]
    assert [r["epoch"] for r in second["runs"]] == [4, 4]
    assert second["settings"][1]["mean"] != first["settings"][1]["mean"]

    # another eval split: refused, then with --overwrite evaluated on it (not retrained), never the test numbers
    val = ["--eval-data", demo_dir / "val.json", "--eval-split", "val", "--epochs", "4"]
    code, output = _ablate(base + val)
    assert code == 1 and 'was evaluated on the split "test", this grid asks for "val"' in output
    code, output = _ablate(base + val + ["--overwrite"])
    assert code == 0, output
    third = json.loads(output)
    assert third["counts"]["trained"] == 0 and third["counts"]["reevaluated"] == 2
    assert third["eval_split"] == "val" and all(r["split"] == "val" for r in third["runs"])
    from train.evaluation_run import evaluate_run

    direct = evaluate_run(out / "runs" / "loss=cusa-seed0", str(demo_dir / "val.json"), split="val", device="cpu",
                          workers=0, progress=False)
    assert third["settings"][1]["mean"]["rsum"] == pytest.approx(direct["rsum"])
    assert "# Ablation results (1 seed(s) per setting, val split of" in (out / "results.md").read_text()

    # the same request again reuses everything, whatever the device or worker count
    code, output = _ablate(base + val + ["--workers", "1"])
    assert code == 0, output
    assert json.loads(output)["counts"]["skipped_finished"] == 2


def test_each_runs_header_and_its_epoch_lines_share_one_stream_apart_from_the_results(demo_dir, demo_cache,
                                                                                       tmp_path):
    from helpers_train import run_script

    proc = run_script("cusa-ablate", ["--data", demo_dir / "train.json", "--eval-data", demo_dir / "test.json",
                                      "--cache", demo_cache, "--grid", "loss=contrastive", "--seeds", "1",
                                      "--epochs", "1", "--batch-size", "32", "--device", "cpu", "--workers", "0",
                                      "--out", tmp_path / "abl"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    progress = [line.split("\r")[-1] for line in proc.stderr.splitlines()]
    header = progress.index("[1/1] loss=contrastive seed 0")
    assert any(line.startswith("epoch 1/1: loss ") for line in progress[header:])
    assert "[1/1]" not in proc.stdout and "epoch 1/1" not in proc.stdout
    assert proc.stdout.startswith("# Ablation results (1 seed(s) per setting, test split of")
