"""Wall time of an ablation grid from one cache vs the same grid where every run embeds with the teachers.

Side by side in one process: (a) `cusa-ablate`'s way: one `cusa-cache build`, then settings × seeds student
trainings that read soft labels from it; (b) the reference code's way: every run first runs the teachers over
the training data (here: builds its own private cache, which costs at least the teacher forward passes the
reference pays on the fly), then trains the same way. Both grids train identical runs, so the ratio is the
price of running teachers per run.

    .venv/bin/python benchmarks/bench_ablation.py                 # 4 losses × 3 seeds on a 200-image demo set
    .venv/bin/python benchmarks/bench_ablation.py --images 800 --epochs 10 --json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--losses", default="contrastive,csa,usa,cusa")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary folder)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from _common import scratch_folder
    from pipeline.build import BuildConfig, build_store
    from pipeline.demo_data import write_demo_dataset
    from train.ablate import run_grid
    from train.config import build_config
    from train.evaluation_run import evaluate_run
    from train.trainer import train

    with scratch_folder(args.workdir, "cusa-bench-ablation-") as work:
        data = work / "data"
        if not (data / "all.json").is_file():
            write_demo_dataset(data, n_images=args.images)
        annotations = str(data / "all.json")
        flags = {"val_data": annotations, "epochs": args.epochs, "lr": args.lr, "device": "cpu"}
        losses = args.losses.split(",")

        # (a) one cache, then the grid
        t0 = time.perf_counter()
        build_store(BuildConfig(annotations=annotations, out=str(work / "cache"), device="cpu", progress=False))
        t_cache = time.perf_counter() - t0
        grid = run_grid(data=annotations, eval_data=annotations, cache=str(work / "cache"), student=None,
                        grid=[f"loss={','.join(losses)}"], seeds=args.seeds, out=str(work / "grid-cached"),
                        flags=flags, show=False)
        t_cached = time.perf_counter() - t0

        # (b) every run embeds with the teachers itself before training
        t0 = time.perf_counter()
        teacher_passes = 0
        for loss in losses:
            for seed in range(args.seeds):
                private = work / "per-run" / f"{loss}-{seed}"
                shutil.rmtree(private, ignore_errors=True)
                build_store(BuildConfig(annotations=annotations, out=str(private / "cache"), device="cpu",
                                        progress=False))
                teacher_passes += 1
                cfg = build_config("paper", None, {**flags, "data": annotations, "cache": str(private / "cache"),
                                                   "loss": loss, "seed": seed, "out": str(private / "run")}, [])
                train(cfg, show_progress=False)
                evaluate_run(private / "run", annotations, split="test", device="cpu", progress=False)
        t_per_run = time.perf_counter() - t0

    runs = len(losses) * args.seeds
    summary = {
        "machine": "2-core CPU, no GPU (timings shared with whatever else runs)",
        "images": args.images, "epochs": args.epochs, "runs": runs,
        "one_cache_s": round(t_cached, 1), "of_which_cache_build_s": round(t_cache, 1),
        "teachers_per_run_s": round(t_per_run, 1), "ratio_per_run_over_one_cache": round(t_per_run / t_cached, 2),
        "teacher_passes": {"one_cache": 1, "per_run": teacher_passes},
        "grid_counts": grid["counts"],
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{runs} runs ({len(losses)} losses × {args.seeds} seeds, {args.epochs} epochs, {args.images} images):")
        print(f"  one cache + grid       {t_cached:8.1f} s  (cache build {t_cache:.1f} s, 1 teacher pass)")
        print(f"  teachers in every run  {t_per_run:8.1f} s  ({teacher_passes} teacher passes)")
        print(f"  ratio                  {t_per_run / t_cached:8.2f}×")


if __name__ == "__main__":
    main()
