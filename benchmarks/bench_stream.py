"""Teacher rows through the trainer's read path: in memory, streamed in random order, streamed in chunk-local order.

For each store size (``--rows``: caption rows; images are rows/5, each image's five captions side by side as a
manifest lays them out) a synthetic store of random unit float16 rows is written with the store API (no teacher
runs), and then each mode runs in a fresh process so that its peak memory is its own:

- ``dense``:  every row held in memory (``SoftLabelSource`` without streaming), random batches (the full
              shuffle, ``epoch_batches``): what training does when the rows fit the memory budget;
- ``random``: random batches read from the store per batch (``Store.rows``, zarr's orthogonal selection):
              the streamed path before chunk-local streaming, which decodes every chunk a batch touches;
- ``stream``: the chunk-local epoch order (``train.chunk_order``: shuffled chunk order, pairs shuffled within a
              window of W chunks, W as large as ``--max-memory-mib`` holds) read through the streamed
              ``SoftLabelSource`` and its chunk cache (``--max-memory-mib``), prefetched in a thread as the
              trainer does.

Each mode runs ``--repeats`` times per size (fresh processes, rotated order; medians reported). Each process
produces ``--blocks`` teacher blocks (``--random-blocks`` for ``random``, which takes seconds a
block) of ``--batch-size`` pairs: a block is the B×B image and the B×B caption similarity of one batch. Reported
per mode and size: ``rows_per_s`` (batch rows per second: each brings one image and one caption teacher row),
``block_ms`` (wall ms per block; ``block_cpu_ms`` CPU), ``peak_rss_mib`` (VmHWM of the process, which includes
the ~0.4-1 GB that importing torch takes: ``baseline_rss_mib``), and ``teacher_rows_mib`` (the most bytes of
teacher rows the read path held: dense, the whole float16 rows; stream, decoded chunks). The stores are deleted
afterwards unless ``--keep``.

    python benchmarks/bench_stream.py                      # 1M and 4M caption rows
    python benchmarks/bench_stream.py --rows 200000 --blocks 500 --json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (current_rss_bytes, machine, machine_line, make_store, median, peak_rss_bytes,  # noqa: E402
                     rotated, scratch_folder)

from teacher_cache.soft_labels import SoftLabelSource, dense_bytes, read_ahead_bytes  # noqa: E402
from teacher_cache.store import Store  # noqa: E402
from train.chunk_order import chunk_local_batches, row_units  # noqa: E402
from train.data import epoch_batches  # noqa: E402

MODES = ("dense", "random", "stream")
MIB = 1 << 20
TARGETS = {"stream_block_ratio_vs_dense": 1.5, "stream_memory_share_of_dense": 0.10, "stream_rows_per_s": 100_000}


def _cosine(rows: np.ndarray) -> torch.Tensor:
    emb = torch.nn.functional.normalize(torch.from_numpy(rows).float(), dim=1)
    return emb @ emb.T


def child(store_path: str, mode: str, blocks: int, batch_size: int, budget_mib: int, seed: int) -> dict:
    """One mode in this (fresh) process: set up, then ``blocks`` blocks through the read path."""
    baseline = current_rss_bytes()
    store = Store.open(store_path, require_complete=True)
    caption_rows = np.arange(store.counts["texts"], dtype=np.int64)
    image_rows = store.caption_image_rows  # each caption's image: the pairs of the dataset
    t0 = time.perf_counter()
    window = None
    if mode == "stream":
        units = row_units(image_rows, caption_rows, store, store)
        window = units.window_for(budget_mib * MIB, read_ahead_bytes(store))
        if window < 1:
            raise SystemExit(f"--max-memory-mib {budget_mib} cannot hold one window of chunks")
        order = chunk_local_batches(units.unit_of_pair, batch_size, seed, 0, window, image_of_pair=image_rows)[:blocks]
        source = SoftLabelSource(store, stream=True, max_memory_bytes=budget_mib * MIB)
    else:
        order = epoch_batches(len(caption_rows), batch_size, seed, 0)[:blocks]
        source = SoftLabelSource(store) if mode == "dense" else None
    batches = [(image_rows[b], caption_rows[b]) for b in order]
    setup_s = time.perf_counter() - t0
    after_setup = current_rss_bytes()
    checksum = 0.0
    t0, c0 = time.perf_counter(), time.process_time()
    if source is not None:
        for t_ii, t_tt in source.blocks(batches):  # the trainer's path: a prefetching thread
            checksum += float(t_ii[0, 1] + t_tt[0, 1])
        teacher_bytes = source.peak_memory_bytes()
    else:
        for i, c in batches:  # the former streamed path: every chunk a batch touches, decoded for that batch
            checksum += float(_cosine(store.rows("images", i).astype(np.float16))[0, 1]
                              + _cosine(store.rows("texts", c).astype(np.float16))[0, 1])
        teacher_bytes = 0  # nothing kept between batches (zarr's transient decode buffers show in the peak RSS)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = len(batches)
    result = {"mode": mode, "rows": int(store.counts["texts"]), "rows_per_s": n * batch_size / wall,
              "block_ms": 1e3 * wall / n, "block_cpu_ms": 1e3 * cpu / n, "peak_rss_mib": peak_rss_bytes() / MIB,
              "teacher_rows_mib": teacher_bytes / MIB, "baseline_rss_mib": baseline / MIB,
              "after_setup_rss_mib": after_setup / MIB, "setup_s": setup_s, "blocks": n, "batch_size": batch_size,
              "checksum": checksum}
    if mode == "stream":
        stats = source.chunk_stats()
        result.update(window_chunks=window, max_memory_mib=budget_mib, units=units.n_units, schedule=stats["schedules"],
                      chunks_decoded=stats["decoded"], chunks_in_store=stats["chunks"],
                      # the blocks cover part of an epoch: decodes per chunk of the windows they reached
                      decodes_per_chunk_read={m: stats["decoded"][m] / max(1, len(np.unique(
                          np.concatenate([(i if m == "images" else c) for i, c in batches]) // store.chunk_rows)))
                          for m in stats["decoded"]})
    return result


def summarise_runs(runs: list[dict]) -> dict:
    """One mode at one size over the repetitions: medians of the rates and times, the most memory any run took;
    every repetition is kept under "repeats"."""
    out = dict(runs[0])
    for key in ("rows_per_s", "block_ms", "block_cpu_ms", "setup_s"):
        out[key] = median([r[key] for r in runs])
    for key in ("peak_rss_mib", "teacher_rows_mib", "baseline_rss_mib", "after_setup_rss_mib"):
        out[key] = max(r[key] for r in runs)
    out["repeats"] = [{k: r[k] for k in ("rows_per_s", "block_ms", "block_cpu_ms", "peak_rss_mib",
                                         "teacher_rows_mib")} for r in runs]
    return out


def run_child(store: Path, mode: str, args: argparse.Namespace) -> dict:
    blocks = args.random_blocks if mode == "random" else args.blocks
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", str(store), "--_mode", mode,
           "--blocks", str(blocks), "--batch-size", str(args.batch_size), "--max-memory-mib",
           str(args.max_memory_mib), "--seed", str(args.seed)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} on {store.name} failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Timings from a shared machine: compare the ratios measured in one run.")
    p.add_argument("--rows", type=int, action="append", default=None,
                   help="caption rows of a synthetic store (repeatable; default 1000000 and 4000000)")
    p.add_argument("--text-dim", type=int, default=384)
    p.add_argument("--image-dim", type=int, default=512)
    p.add_argument("--captions-per-image", type=int, default=5)
    p.add_argument("--chunk-rows", type=int, default=2048, help="rows per stored chunk (the build's default)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--blocks", type=int, default=2000, help="blocks per process for dense and stream")
    p.add_argument("--random-blocks", type=int, default=3, help="blocks for random (seconds each at 1M rows)")
    p.add_argument("--max-memory-mib", type=int, default=64,
                   help="stream: the chunk cache's budget (soft_labels.max_memory_mib), which sets the window")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of dense,random,stream")
    p.add_argument("--repeats", type=int, default=3,
                   help="fresh processes per mode and size, in rotated order; medians are reported (3)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--workdir", default=None, help="where the stores go (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the stores (and reuse them when present)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON summary at the end")
    p.add_argument("--_child", dest="child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_mode", dest="mode", default="stream", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        r = child(args.child, args.mode, args.blocks, args.batch_size, args.max_memory_mib, args.seed)
        print(json.dumps(r))
        return r
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        p.error(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    sizes = args.rows or [1_000_000, 4_000_000]
    info = machine()
    print(machine_line(info), flush=True)
    results: list[dict] = []
    stores: dict[int, dict] = {}
    with scratch_folder(args.workdir, "cusa-bench-stream-") as workdir:
        for n in sizes:
            n_images = max(1, n // args.captions_per_image)
            path = workdir / f"store-{n}"
            t0 = time.perf_counter()
            if not (args.keep and (path / "zarr.json").is_file()):
                make_store(path, n_images, args.image_dim, n, args.text_dim, args.chunk_rows, seed=args.seed,
                           grouped_captions=True, progress=not args.json)
            store = Store.open(path, require_complete=True)
            stores[n] = {"images": n_images, "image_dim": args.image_dim, "captions": n, "text_dim": args.text_dim,
                         "chunk_rows": args.chunk_rows, "bytes_on_disk": store.size_bytes(),
                         "dense_mib": dense_bytes(store) / MIB, "made_s": time.perf_counter() - t0}
            print(f"\nstore: {n} captions x {args.text_dim} + {n_images} images x {args.image_dim}, float16, chunks of "
                  f"{args.chunk_rows} rows, {stores[n]['bytes_on_disk'] / MIB:.0f} MiB on disk "
                  f"({stores[n]['made_s']:.0f} s to write); batch {args.batch_size}", flush=True)
            runs: dict[str, list[dict]] = {m: [] for m in modes}
            for rep in range(args.repeats):
                for mode in rotated(modes, rep + sizes.index(n)):
                    r = run_child(path, mode, args)
                    runs[mode].append(r)
                    extra = f", window {r['window_chunks']} chunks, decodes per chunk {r['decodes_per_chunk_read']}" \
                        if mode == "stream" else ""
                    print(f"  {mode:6s} {r['rows_per_s']:10,.0f} rows/s  {r['block_ms']:8.2f} ms/block (CPU "
                          f"{r['block_cpu_ms']:.2f})  peak RSS {r['peak_rss_mib']:6.0f} MiB (baseline "
                          f"{r['baseline_rss_mib']:.0f})  teacher rows {r['teacher_rows_mib']:7.1f} MiB  set-up "
                          f"{r['setup_s']:.1f} s  [{r['blocks']} blocks{extra}]", flush=True)
            for mode in modes:
                results.append(summarise_runs(runs[mode]))
            if not args.keep:
                shutil.rmtree(path, ignore_errors=True)
    ratios = {}
    for n in sizes:
        by = {r["mode"]: r for r in results if r["rows"] == n}
        if "dense" in by and "stream" in by:
            ratios[str(n)] = {
                "stream_block_ratio_vs_dense": by["stream"]["block_ms"] / by["dense"]["block_ms"],
                "stream_block_cpu_ratio_vs_dense": by["stream"]["block_cpu_ms"] / by["dense"]["block_cpu_ms"],
                "stream_memory_share_of_dense": by["stream"]["teacher_rows_mib"] / by["dense"]["teacher_rows_mib"]}
        if "random" in by and "stream" in by:
            ratios.setdefault(str(n), {})["random_block_ratio_vs_stream"] = \
                by["random"]["block_ms"] / by["stream"]["block_ms"]
    print("\nmedians:", flush=True)
    for r in results:
        print(f"  {r['rows']:>9,} rows  {r['mode']:6s} {r['rows_per_s']:10,.0f} rows/s  {r['block_ms']:7.2f} ms/block "
              f"(CPU {r['block_cpu_ms']:.2f})  peak RSS {r['peak_rss_mib']:6.0f} MiB  teacher rows "
              f"{r['teacher_rows_mib']:7.1f} MiB", flush=True)
    streamed = [r for r in results if r["mode"] == "stream"]
    if len(streamed) > 1:
        ratios["stream_memory_largest_over_smallest"] = streamed[-1]["teacher_rows_mib"] / streamed[0]["teacher_rows_mib"]
    print("\nratios:", json.dumps(ratios, indent=1), flush=True)
    summary = {"benchmark": "bench_stream", "machine": info, "targets": TARGETS, "stores": stores, "ratios": ratios,
               "results": results}
    if args.json:
        print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
