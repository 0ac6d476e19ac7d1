"""The end-to-end demo: built-in demo set -> teacher cache -> contrastive baseline and CUSA -> retrieval tables.

Every step is the same command a user would type (printed before it runs), so the demo doubles as a
walk-through. Re-running reuses what is already there (the cache resumes, finished runs are kept).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


def run(cmd: list[str], capture: bool = False) -> str:
    print(f"$ {shlex.join(cmd)}", file=sys.stderr, flush=True)
    result = subprocess.run(cmd, stdout=subprocess.PIPE if capture else None, text=True)
    if result.returncode != 0:
        sys.exit(f"demo: step failed (exit {result.returncode}): {shlex.join(cmd)}")
    return result.stdout if capture else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="demo-out", help="working folder (default: demo-out)")
    ap.add_argument("--images", type=int, default=800, help="demo set size (default: 800)")
    ap.add_argument("--seeds", type=int, default=3, help="training seeds per setting (default: 3)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=None,
                    help="default: the paper preset's lr for the frozen student (1e-3, its adapters train from scratch)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()

    out = Path(args.out)
    data, cache = out / "data", out / "cache"
    t0 = time.perf_counter()
    if not (data / "all.json").is_file():
        run([str(BIN / "cusa-cache"), "demo-data", str(data), "--images", str(args.images)])
    run([str(BIN / "cusa-cache"), "build", str(data / "all.json"), "--out", str(cache), "--device", args.device])
    t_cache = time.perf_counter() - t0

    results: dict[str, list[dict]] = {"contrastive": [], "cusa": []}
    for loss in results:
        for seed in range(args.seeds):
            run_dir = out / "runs" / f"{loss}-seed{seed}"
            if not (run_dir / "summary.json").is_file():
                resume = ["--resume"] if (run_dir / "last.pt").is_file() else []
                run([str(BIN / "cusa-train"), "--data", str(data / "all.json"), "--val-data", str(data / "all.json"),
                     "--cache", str(cache), "--preset", "paper", "--loss", loss, "--epochs", str(args.epochs),
                     *(["--lr", str(args.lr)] if args.lr is not None else []), "--seed", str(seed), "--device", args.device, "--out", str(run_dir),
                     *resume])
            metrics = json.loads(run([str(BIN / "cusa-eval"), str(run_dir), "--data", str(data / "all.json"),
                                      "--split", "test", "--device", args.device, "--json"], capture=True))
            results[loss].append(metrics)

    table = {name: {k: statistics.fmean(r[k] for r in runs) for k in KEYS} for name, runs in results.items()}
    table["gain"] = {k: table["cusa"][k] - table["contrastive"][k] for k in KEYS}
    summary = {
        "seeds": args.seeds,
        "test_images": results["cusa"][0]["images"],
        "test_captions": results["cusa"][0]["captions"],
        "mean": table,
        "rsum_std": {name: statistics.pstdev(r["rsum"] for r in runs) for name, runs in results.items()},
        "seconds": time.perf_counter() - t0,
        "cache_seconds": t_cache,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    from train.evaluate import format_table

    title = (f"Demo test split: {summary['test_images']} images, {summary['test_captions']} captions; frozen "
             f"efficientnet-lite0 + MiniLM student, paper preset; mean of {args.seeds} seed(s)")
    print()
    print(format_table(table, title=title))
    if args.seeds > 1:
        print("rsum std: " + ", ".join(f"{k} {v:.1f}" for k, v in summary["rsum_std"].items()))
    print(f"\ndone in {summary['seconds'] / 60:.1f} min (cache {t_cache:.0f} s); runs in {out / 'runs'}")


if __name__ == "__main__":
    main()
