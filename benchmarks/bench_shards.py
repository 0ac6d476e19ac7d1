"""Build throughput from webdataset shards against the caption-list JSON build of the same images and captions.

The same JPEGs (the demo scenes re-saved as 480x360 photographs with grain, as in bench_build.py) are laid out two
ways: files named by a caption-list JSON, and webdataset shards (KEY.jpg, KEY.txt, KEY.json; 100 samples a shard
by default) holding the same bytes. Measured side by side in one process, repetitions interleaved:

- build: ``pipeline.build.build_store`` from each source (``neighbors=0``), images rows/s by the build's own
  counter (first batch requested to last chunk written) and CPU ms per image row (main process plus DataLoader
  workers); the ratio shards/JSON is the target (>= 0.9);
- read: decoding and preprocessing every image through ``pipeline.images.open_image`` in one process, no teacher:
  the part of the build that differs between the two sources, so its ratio shows the read path alone;
- manifest: reading the source into a manifest (the shard index and caption members for shards).

    python benchmarks/bench_shards.py                                   # 256 images, workers 2, 3 repetitions
    python benchmarks/bench_shards.py --images 1024 --workers 0 --workers 2 --repeats 5 --json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, machine_line, median, rotated, scratch_folder, spread  # noqa: E402
from bench_build import StageCpu, cpu_seconds, make_jpeg_dataset  # noqa: E402

from pipeline.build import BuildConfig, build_store  # noqa: E402
from pipeline.images import open_image  # noqa: E402
from pipeline.manifest import read_manifest  # noqa: E402
from pipeline.shard_writer import write_manifest_shards  # noqa: E402
from pipeline.teachers.registry import DEFAULT_IMAGE_TEACHER, DEFAULT_TEXT_TEACHER, build_encoder  # noqa: E402

TARGET_RATIO = 0.9


def run_build(source: str, out: Path, args: argparse.Namespace, workers: int) -> dict:
    cfg = BuildConfig(annotations=source, out=str(out), image_teacher=args.image_teacher,
                      text_teacher=args.text_teacher, batch_size=args.batch_size, workers=workers, device="cpu",
                      neighbors=0, chunk_rows=args.chunk_rows, overwrite=True, progress=False)
    t0 = time.perf_counter()
    with StageCpu() as stages:
        summary = build_store(cfg)
    wall = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    n_img = summary.images["rows"]
    return {"images_rows_per_s": summary.images["rows_per_s"], "images_cpu_ms_per_row": stages.cpu["images"] /
            n_img * 1e3, "texts_rows_per_s": summary.texts["rows_per_s"], "wall_seconds": wall}


def read_all(source: str, preprocess) -> dict:
    t0, c0 = time.perf_counter(), cpu_seconds()
    manifest = read_manifest(source)
    t1 = time.perf_counter()
    for row in range(len(manifest.images)):
        preprocess(open_image(manifest, row))
    wall, cpu = time.perf_counter() - t1, cpu_seconds() - c0
    n = len(manifest.images)
    return {"read_images_per_s": n / wall, "read_cpu_ms_per_image": cpu / n * 1e3, "manifest_seconds": t1 - t0}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--captions-per-image", type=int, default=5, choices=range(1, 6), metavar="{1..5}")
    p.add_argument("--samples-per-shard", type=int, default=100)
    p.add_argument("--width", type=int, default=480)
    p.add_argument("--height", type=int, default=360)
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--grain", type=float, default=24.0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--chunk-rows", type=int, default=2048)
    p.add_argument("--workers", type=int, action="append", help="DataLoader workers of the builds (default: 2)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--image-teacher", default=DEFAULT_IMAGE_TEACHER)
    p.add_argument("--text-teacher", default=DEFAULT_TEXT_TEACHER)
    p.add_argument("--workdir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON summary at the end")
    args = p.parse_args(argv)
    workers_list = args.workers or [2]
    info = machine()
    print(machine_line(info), flush=True)
    with scratch_folder(args.workdir, "cusa-bench-shards-") as root:
        annotations, data = make_jpeg_dataset(root, args.images, args.width, args.height, args.jpeg_quality,
                                              args.grain, args.seed, args.captions_per_image)
        written = write_manifest_shards(read_manifest(annotations), root / "shards", "data", args.samples_per_shard)
        sources = {"json": str(annotations), "shards": written["pattern"]}
        a, b = (read_manifest(s) for s in sources.values())
        assert a.caption_texts() == b.caption_texts() and a.image_ids() == b.image_ids(), "sources differ"
        print(f"data: {data['images']} JPEGs {args.width}x{args.height} (mean {data['mean_file_kb']} KB), "
              f"{data['captions']} captions; {len(written['shards'])} shards of up to {args.samples_per_shard}",
              flush=True)
        preprocess = build_encoder(args.image_teacher, "image", device="cpu").preprocess

        variants = [("read", name, None) for name in sources] + \
                   [("build", name, w) for w in workers_list for name in sources]
        times: dict[tuple, dict[str, list[float]]] = {v: {} for v in variants}
        threads = torch.get_num_threads()
        for rep in range(args.repeats):
            for kind, name, workers in rotated(variants, rep):
                if kind == "read":
                    torch.set_num_threads(1)  # as in a DataLoader worker
                    r = read_all(sources[name], preprocess)
                    torch.set_num_threads(threads)
                else:
                    r = run_build(sources[name], root / f"store-{name}-{workers}", args, workers)
                for key, value in r.items():
                    times[(kind, name, workers)].setdefault(key, []).append(value)
                label = f"{kind} {name}" + (f" workers={workers}" if workers is not None else "")
                print(f"  rep {rep + 1}/{args.repeats} {label}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()),
                      flush=True)

    result = {"benchmark": "bench_shards", "machine": info, "data": data, "repeats": args.repeats,
              "samples_per_shard": args.samples_per_shard, "target_ratio": TARGET_RATIO, "read": {}, "builds": {}}
    print(f"\nmedians of {args.repeats} interleaved repetitions:")
    med = {v: {k: median(x) for k, x in t.items()} for v, t in times.items()}
    rj, rs = med[("read", "json", None)], med[("read", "shards", None)]
    result["read"] = {"json": rj, "shards": rs, "ratio": rs["read_images_per_s"] / rj["read_images_per_s"],
                      "cpu_work_ratio": rj["read_cpu_ms_per_image"] / rs["read_cpu_ms_per_image"]}
    print(f"  read + preprocess, one thread: JSON files {rj['read_images_per_s']:.1f} images/s, shards "
          f"{rs['read_images_per_s']:.1f} images/s: ratio {result['read']['ratio']:.2f} (CPU work ratio "
          f"{result['read']['cpu_work_ratio']:.2f}); manifest read {rj['manifest_seconds'] * 1e3:.0f} ms (JSON) vs "
          f"{rs['manifest_seconds'] * 1e3:.0f} ms (shards)")
    for w in workers_list:
        bj, bs = med[("build", "json", w)], med[("build", "shards", w)]
        entry = {"json": bj, "shards": bs, "ratio": bs["images_rows_per_s"] / bj["images_rows_per_s"],
                 "cpu_work_ratio": bj["images_cpu_ms_per_row"] / bs["images_cpu_ms_per_row"],
                 "json_spread": spread(times[("build", "json", w)]["images_rows_per_s"]),
                 "shards_spread": spread(times[("build", "shards", w)]["images_rows_per_s"])}
        entry["meets_target"] = entry["ratio"] >= TARGET_RATIO
        entry["meets_target_by_cpu_work"] = entry["cpu_work_ratio"] >= TARGET_RATIO
        result["builds"][f"workers={w}"] = entry
        print(f"  build workers={w}: JSON {bj['images_rows_per_s']:.1f} images/s ({entry['json_spread']}), CPU "
              f"{bj['images_cpu_ms_per_row']:.1f} ms/row; shards {bs['images_rows_per_s']:.1f} images/s "
              f"({entry['shards_spread']}), CPU {bs['images_cpu_ms_per_row']:.1f} ms/row: ratio shards/JSON "
              f"{entry['ratio']:.2f} (CPU work ratio {entry['cpu_work_ratio']:.2f}); target >= {TARGET_RATIO}: "
              f"{'met' if entry['meets_target'] else 'not met'} by wall clock, "
              f"{'met' if entry['meets_target_by_cpu_work'] else 'not met'} by CPU work")
    if args.json:
        print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
