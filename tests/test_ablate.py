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
