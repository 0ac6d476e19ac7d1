"""Ablation grids that reuse one teacher cache: N settings × S seeds = N·S student trainings, 0 teacher passes.

Every run is an ordinary `cusa-train` run folder under ``OUT/runs/``. A re-run reuses a finished run (it has
``eval.json``) and resumes an interrupted one only when the run was made with exactly the settings the grid now asks
for (its config.json, ignoring only where it lives and how it was computed: device, workers, eval batch size, log
interval) and, once finished, was evaluated on the same split of the same data (by manifest fingerprint). Any other
run is refused in one line naming the first differing setting, or with ``overwrite`` retrained (re-evaluated when
only the evaluation differs), so a grid never reports numbers made under other settings. Results are aggregated into
``results.json`` (with each run's config and evaluation data) / ``results.md`` with plots.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import re
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from teacher_cache.remote import redact_text, redact_url
from train.config import TrainConfig, build_config
from train.data import load_config_split
from train.evaluation_run import evaluate_run
from train.factory import CHECKPOINT_LAST
from train.metrics_log import require_report_targets
from train.resume import CONFIG_FILE, HOW_NOT_WHAT, differences, extended_epochs
from train.trainer import train

METRIC_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


@dataclass
class GridAxis:
    key: str
    values: list[str]


@dataclass
class Setting:
    name: str
    overrides: dict[str, str]
    runs: list[dict] = field(default_factory=list)


def parse_grid(items: list[str]) -> list[GridAxis]:
    """``KEY=V1,V2,...`` items into axes; a key given twice or without values is refused."""
    axes: list[GridAxis] = []
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ValueError(f"--grid {item!r}: expected KEY=V1,V2,... e.g. loss=contrastive,cusa")
        if any(a.key == key for a in axes):
            raise ValueError(f"--grid {key}: given twice")
        axes.append(GridAxis(key, [v.strip() for v in values.split(",") if v.strip()]))
    return axes


def expand(axes: list[GridAxis]) -> list[Setting]:
    """The cartesian product of the axes, as named settings (``loss=cusa,csa.rate=0.1``)."""
    if not axes:
        return [Setting("default", {})]
    settings = []
    for combo in itertools.product(*(a.values for a in axes)):
        overrides = {a.key: v for a, v in zip(axes, combo)}
        settings.append(Setting(",".join(f"{k}={v}" for k, v in overrides.items()), overrides))
    return settings


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", name.replace(",", "__"))


def baseline_of(setting: Setting, settings: list[Setting]) -> Setting | None:
    """The contrastive-only setting that differs from ``setting`` only in its loss (or the plain baseline)."""
    want = {**setting.overrides, "loss": "contrastive"}
    for other in settings:
        if other.overrides == want:
            return other
    for other in settings:
        if other.overrides.get("loss") == "contrastive" and len(other.overrides) == 1:
            return other
    return None


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation; no deviation (None) from fewer than two seeds."""
    if not values:
        return math.nan, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _stale_training(run_dir: Path, cfg: TrainConfig) -> str | None:
    """Why the run in ``run_dir`` was not trained as ``cfg`` asks (None: it was, or nothing is trained yet)."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        saved = TrainConfig.from_dict(json.loads(path.read_text()))
    except (ValueError, json.JSONDecodeError) as exc:
        return f"its {CONFIG_FILE} cannot be read ({str(exc).splitlines()[0]})"
    diff = differences(saved, cfg, ignore=HOW_NOT_WHAT)
    if diff:
        key, old, new = diff[0]
        return f"was made with {key} = {json.dumps(old)}, this grid asks for {json.dumps(new)}"
    started = extended_epochs(run_dir)
    if started is not None:
        return (f"was started for {started} epochs and extended by --resume, this grid asks for {cfg.epochs} from "
                "the start")
    return None


def _stale_evaluation(evaluated: dict, request: dict, earlier_fingerprint: Callable[[], str]) -> str | None:
    """Why an eval.json does not answer the evaluation ``request`` (None: it does). An evaluation recorded before
    fingerprint format 2 is matched by the eval data's format-1 fingerprint, ``earlier_fingerprint()``."""
    for key in ("eval_split", "eval_fingerprint"):
        if evaluated.get(key) != request[key]:
            if key == "eval_fingerprint" and evaluated.get(key) == earlier_fingerprint():
                continue
            what = "split" if key == "eval_split" else "data (manifest fingerprint)"
            return (f"was evaluated on the {what} {json.dumps(evaluated.get(key))}, this grid asks for "
                    f"{json.dumps(request[key])}")
    return None


def run_grid(*, data: str, eval_data: str, cache: str, student: str | None, grid: list[str], seeds: int,
             out: str, preset: str = "paper", config_file: str | None = None, flags: dict | None = None,
             overrides: list[str] | None = None, eval_split: str = "test", show: bool = True,
             overwrite: bool = False) -> dict[str, Any]:
    """Train and evaluate every setting × seed (reusing runs made with the same settings); write results.json/.md
    and plots. A run made otherwise is refused, or with ``overwrite`` retrained."""
    t0 = time.perf_counter()
    out_dir = Path(out)
    settings = expand(parse_grid(grid))
    if not any(s.overrides.get("loss") == "contrastive" for s in settings):
        # the gain over the contrastive baseline needs the baseline itself
        settings.insert(0, Setting("loss=contrastive", {"loss": "contrastive"}))
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    base_flags = {**flags, "data": data, "cache": cache, "student": student}
    # every run's settings are resolved (and so validated) before the first run starts: a typo does not surface
    # hours later
    runs = []
    for s, seed in itertools.product(settings, range(seeds)):
        run_dir = out_dir / "runs" / f"{_slug(s.name)}-seed{seed}"
        runs.append((s, seed, build_config(preset, config_file, {**base_flags, "seed": seed, "out": str(run_dir)},
                                           list(overrides or []) + [f"{k}={v}" for k, v in s.overrides.items()])))
    for _, _, cfg in runs:
        require_report_targets(cfg.report_to)
    first = runs[0][2]
    eval_manifest = load_config_split(first, eval_data, eval_split)
    # recorded in every run's eval.json and in results.json: a URL's secrets never are
    request = {"eval_data": redact_text(eval_data), "eval_split": eval_split,
               "eval_fingerprint": eval_manifest.fingerprint()}
    earlier_fingerprint = functools.partial(eval_manifest.fingerprint, 1)  # computed only if a run needs it
    # every run is checked before any trains: a grid that must refuse does so at once, not hours later
    plan = []
    for s, seed, cfg in runs:
        run_dir = Path(cfg.out)
        trained = (run_dir / CHECKPOINT_LAST).is_file()
        stale = _stale_training(run_dir, cfg)
        evaluated = None
        if stale is None and (run_dir / "eval.json").is_file():
            evaluated = json.loads((run_dir / "eval.json").read_text())
            stale_eval = _stale_evaluation(evaluated, request, earlier_fingerprint)
            if stale_eval is not None and not overwrite:
                raise ValueError(f"{run_dir}: {stale_eval}; pass --overwrite to evaluate it again, or choose "
                                 "another --out")
            evaluated = {**evaluated, "_stale": stale_eval is not None}
        elif stale is not None and trained and not overwrite:
            raise ValueError(f"{run_dir}: {stale}; pass --overwrite to retrain it, or choose another --out")
        plan.append((s, seed, cfg, stale, trained, evaluated))

    counts = {"runs": 0, "trained": 0, "resumed": 0, "skipped_finished": 0, "reevaluated": 0, "overwritten": 0,
              "backbone_passes": 0, "teacher_passes": 0}
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    total = len(plan)
    for i, (s, seed, cfg, stale, trained, evaluated) in enumerate(plan, start=1):
        run_dir = Path(cfg.out)
        counts["runs"] += 1
        if stale is not None:
            # made with other settings (--overwrite), or nothing trained yet (config.json only): start afresh
            counts["overwritten"] += int(trained)
            shutil.rmtree(run_dir)
            trained = False
        if evaluated is not None and not evaluated["_stale"]:
            counts["skipped_finished"] += 1
            s.runs.append({k: v for k, v in evaluated.items() if k != "_stale"})
            continue
        if evaluated is not None:
            counts["reevaluated"] += 1  # trained as asked, evaluated on other data: --overwrite evaluates again
            train_seconds = evaluated.get("train_seconds")
        else:
            if show:
                tqdm.write(f"[{i}/{total}] {s.name} seed {seed}{' (resuming)' if trained else ''}", file=sys.stderr)
            summary = train(cfg, resume=trained, show_progress=show)
            counts["trained"] += 1
            counts["resumed"] += int(trained)
            counts["backbone_passes"] += int(summary.get("backbone_passes", 0))
            counts["teacher_passes"] += int(summary.get("teacher_passes", 0))
            train_seconds = summary.get("seconds")
        metrics = evaluate_run(run_dir, eval_data, split=eval_split, device=cfg.device, progress=False)
        counts["backbone_passes"] += int(metrics.get("backbone_passes", 0))
        metrics.update({"setting": s.name, "seed": seed, "run": str(run_dir), "train_seconds": train_seconds,
                        **request, "config": cfg.to_dict()})
        (run_dir / "eval.json").write_text(json.dumps(metrics, indent=2) + "\n")
        s.runs.append(metrics)

    results = aggregate(settings)
    payload = {"settings": results, "seeds": seeds, **request, "cache": redact_url(cache), "counts": counts,
               "runs": [{k: v for k, v in r.items() if k != "skipped_image_details"} for s in settings
                        for r in s.runs],
               "seconds": time.perf_counter() - t0}
    (out_dir / "results.md").write_text(results_markdown(payload))
    payload["plots"] = write_plots(out_dir, settings, results, eval_split)
    (out_dir / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    return payload


def aggregate(settings: list[Setting]) -> list[dict]:
    rows = []
    for s in settings:
        mean, std = {}, {}
        for k in METRIC_KEYS:
            mean[k], std[k] = _mean_std([r[k] for r in s.runs])
        rows.append({"name": s.name, "overrides": s.overrides, "n": len(s.runs), "mean": mean, "std": std,
                     "rsum_per_seed": [r["rsum"] for r in s.runs]})
    by_name = {s.name: row for s, row in zip(settings, rows)}
    for s, row in zip(settings, rows):
        base = baseline_of(s, settings)
        row["baseline"] = base.name if base else None
        row["gain"] = ({k: row["mean"][k] - by_name[base.name]["mean"][k] for k in METRIC_KEYS}
                       if base is not None else None)
        row["paired_gain"] = paired_gain(s.runs, base.runs) if base is not None and base is not s else None
    return rows


def paired_gain(runs: list[dict], baseline_runs: list[dict]) -> dict | None:
    """The gain over the baseline seed by seed: a run and its baseline with the same seed share the initialisation
    and the batches, so their difference leaves out the seed-to-seed spread that the difference of means keeps.

    {"pairs", "seeds", "mean", "std", "positive", "per_seed"}: mean and std (n−1) of the per-pair gains of every
    metric, how many pairs gained (> 0), and each pair's rsum gain; None when no seed has both runs.
    """
    base_by_seed = {r["seed"]: r for r in baseline_runs if "seed" in r}
    seeds = sorted(r["seed"] for r in runs if r.get("seed") in base_by_seed)
    if not seeds:
        return None
    by_seed = {r["seed"]: r for r in runs}
    diffs = {k: [by_seed[s][k] - base_by_seed[s][k] for s in seeds] for k in METRIC_KEYS}
    mean, std = {}, {}
    for k in METRIC_KEYS:
        mean[k], std[k] = _mean_std(diffs[k])
    return {"pairs": len(seeds), "seeds": seeds, "mean": mean, "std": std,
            "positive": {k: sum(d > 0 for d in diffs[k]) for k in METRIC_KEYS},
            "per_seed": {str(s): d for s, d in zip(seeds, diffs["rsum"])}}


def _spread(mean: float, std: float | None, sign: str = "") -> str:
    """"mean ± std", or the mean alone when there is no deviation to show (one seed)."""
    return f"{mean:{sign}.1f}" + ("" if std is None else f" ± {std:.1f}")


def results_markdown(payload: dict) -> str:
    spread = " (mean ± std over seeds)" if payload["seeds"] > 1 else ""
    lines = [f"# Ablation results ({payload['seeds']} seed(s) per setting{spread}, {payload['eval_split']} split of "
             f"{payload['eval_data']})", "",
             "| setting | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | rsum | gain vs contrastive "
             "| paired rsum gain (pairs > 0) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in payload["settings"]:
        cells = [_spread(row["mean"][k], row["std"][k]) for k in METRIC_KEYS]
        gain = row["gain"]["rsum"] if row["gain"] else None
        paired = row.get("paired_gain")
        paired_cell = (f"{_spread(paired['mean']['rsum'], paired['std']['rsum'], '+')} "
                       f"({paired['positive']['rsum']}/{paired['pairs']})" if paired else "")
        lines.append(f"| {row['name']} | " + " | ".join(cells) + f" | {'' if gain is None else f'{gain:+.1f}'} "
                     f"| {paired_cell} |")
    paired = [row for row in payload["settings"] if row.get("paired_gain")]
    if paired:
        over = "mean ± std over the pairs" if payload["seeds"] > 1 else "one pair"
        lines += ["", "Paired gains: each run minus its baseline run with the same seed (same initialisation and "
                  f"batches), {over}, and how many pairs gained:", "",
                  "| setting | pairs | " + " | ".join(METRIC_KEYS) + " |", "|---|---|" + "---|" * len(METRIC_KEYS)]
        for row in paired:
            p = row["paired_gain"]
            lines.append(f"| {row['name']} | {p['pairs']} | " + " | ".join(
                f"{_spread(p['mean'][k], p['std'][k], '+')} ({p['positive'][k]}/{p['pairs']})" for k in METRIC_KEYS)
                + " |")
    c = payload["counts"]
    lines += ["", f"Runs: {c['runs']} ({c['trained']} trained now, {c['resumed']} resumed, "
              f"{c['skipped_finished']} already finished, {c.get('overwritten', 0)} retrained over other settings, "
              f"{c.get('reevaluated', 0)} evaluated again). Teacher passes: {c['teacher_passes']}. "
              f"Backbone feature passes: {c['backbone_passes']}. Wall time {payload['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def write_plots(out_dir: Path, settings: list[Setting], rows: list[dict], eval_split: str = "test") -> list[str]:
    """rsum by setting (bars from 0, so that their heights compare honestly; error bars with several seeds), and
    training curves by loss term from each run's metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(rows) + 2), 4))
    names = [r["name"] for r in rows]
    several = any(r["std"]["rsum"] is not None for r in rows)
    bars = ax.bar(range(len(rows)), [r["mean"]["rsum"] for r in rows],
                  yerr=[r["std"]["rsum"] or 0 for r in rows] if several else None, capsize=4,
                  color=["#888888" if r["overrides"].get("loss") == "contrastive" else "#3b6fb6" for r in rows])
    ax.bar_label(bars, labels=[f"{r['mean']['rsum']:.1f}" for r in rows], fontsize=8, padding=2)
    hi = max(r["mean"]["rsum"] + (r["std"]["rsum"] or 0) for r in rows)
    ax.set_ylim(0, min(600, hi * 1.12 + 1))  # from 0: bar heights are proportional to rsum
    ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"{eval_split} rsum (of 600)" + (", mean ± std over seeds" if several else ""))
    ax.set_title("Retrieval rsum by setting")
    fig.tight_layout()
    path = out_dir / "rsum_by_setting.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(str(path))

    terms = ("loss", "contrastive", "csa", "usa")
    fig, axes = plt.subplots(1, len(terms), figsize=(4 * len(terms), 3.4))
    for s in settings:
        curves: dict[str, list[list[float]]] = {t: [] for t in terms}
        for r in s.runs:
            metrics = Path(r["run"]) / "metrics.jsonl"
            if not metrics.is_file():
                continue
            epochs = [json.loads(line) for line in metrics.read_text().splitlines() if '"epoch"' in line]
            epochs = [e for e in epochs if e.get("kind") == "epoch"]
            for t in terms:
                curves[t].append([e.get(t, math.nan) for e in epochs])
        for ax, t in zip(axes, terms):
            if curves[t]:
                n = min(len(c) for c in curves[t])
                mean = [statistics.fmean(c[i] for c in curves[t]) for i in range(n)]
                ax.plot(range(1, n + 1), mean, marker="o", ms=3, label=s.name)  # metrics.jsonl numbers epochs from 1
    from matplotlib.ticker import MaxNLocator

    for ax, t in zip(axes, terms):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{t} (rate applied)" if t != "loss" else "total loss")
        ax.set_xlabel("epoch")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "training_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(str(path))
    return written
