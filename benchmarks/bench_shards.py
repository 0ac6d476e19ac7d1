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

With ``--remote s3`` / ``--remote http`` the same shards are also served over loopback, by moto's S3 API (reached
through s3fs) or by the test HTTP server (tests/servers.py), each in a process of its own, and built from there
through a shard cache bounded to ``--shard-cache-fraction`` of the shards' bytes (so the build fetches shards again
after indexing them, ahead of its workers). Every shard build of such a run (local and remote) starts with an empty
manifest index and shard cache; the ratio remote/local of images rows/s is the target (>= 0.9), and the shard cache's
peak size (sampled every 10 ms, transfers in progress included) must stay within its bound.

    python benchmarks/bench_shards.py                                   # 256 images, workers 2, 3 repetitions
    python benchmarks/bench_shards.py --images 1024 --workers 0 --workers 2 --repeats 5 --json
    python benchmarks/bench_shards.py --remote s3 --remote http --json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
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
REMOTE_KINDS = ("s3", "http")
# a server of the tests (tests/servers.py) in a process of its own: it must not share the build's interpreter
_SERVE = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from servers import FileServer, S3Server
kind, folder = sys.argv[1], Path(sys.argv[2])
if kind == "s3":
    server = S3Server().start()
    server.upload(sorted(folder.glob("*.tar")), "shards")
    print(json.dumps({"url": server.url("shards"), "env": server.environment()}), flush=True)
else:
    server = FileServer(folder).start()
    print(json.dumps({"url": server.url(), "env": {}}), flush=True)
sys.stdin.read()
server.stop()
"""


def start_server(kind: str, folder: Path) -> tuple[subprocess.Popen, str, dict]:
    """(the server process, the URL of ``folder``'s shards there, what the environment needs to reach it)."""
    tests = Path(__file__).resolve().parents[1] / "tests"
    proc = subprocess.Popen([sys.executable, "-c", _SERVE, kind, str(folder), str(tests)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    ready = json.loads(proc.stdout.readline())
    return proc, ready["url"], ready["env"]


class PeakFolderSize:
    """The largest total size of the files under a folder (every file: transfers in progress too), sampled."""

    def __init__(self, folder: Path, every: float = 0.01):
        self.folder, self.every, self.peak = folder, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for dirpath, _, names in os.walk(self.folder):
                for name in names:
                    try:
                        total += os.path.getsize(os.path.join(dirpath, name))
                    except OSError:
                        pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.every)

    def __enter__(self) -> "PeakFolderSize":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_build(source: str, out: Path, args: argparse.Namespace, workers: int, manifest_cache: Path | None = None
              ) -> dict:
    cfg = BuildConfig(annotations=source, out=str(out), image_teacher=args.image_teacher,
                      text_teacher=args.text_teacher, batch_size=args.batch_size, workers=workers, device="cpu",
                      neighbors=0, chunk_rows=args.chunk_rows, overwrite=True, progress=False,
                      manifest_cache=str(manifest_cache) if manifest_cache else None)
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
    p.add_argument("--remote", action="append", choices=REMOTE_KINDS,
                   help="also build from the shards served over loopback by this server (repeatable)")
    p.add_argument("--shard-cache-fraction", type=float, default=0.25,
                   help="--remote: the shard cache's bound as a fraction of the shards' bytes (at least two shards)")
    p.add_argument("--json", action="store_true", help="print one JSON summary at the end")
    args = p.parse_args(argv)
    remote_kinds = list(dict.fromkeys(args.remote or []))
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
        shard_bytes = [Path(x).stat().st_size for x in written["shards"]]
        bound = max(int(args.shard_cache_fraction * sum(shard_bytes)), 2 * max(shard_bytes))
        servers = []
        for kind in remote_kinds:
            proc, url, env = start_server(kind, root / "shards")
            servers.append(proc)
            os.environ.update(env)
            sources[kind] = f"{url}/{Path(written['pattern']).name}"
        if remote_kinds:
            print(f"remote: {', '.join(sources[k] for k in remote_kinds)}; shard cache bound {bound} bytes "
                  f"({bound / sum(shard_bytes):.2f} of {sum(shard_bytes)} bytes of shards)", flush=True)

        variants = [("read", name, None) for name in ("json", "shards")] + \
                   [("build", name, w) for w in workers_list for name in sources]
        times: dict[tuple, dict[str, list[float]]] = {v: {} for v in variants}
        threads = torch.get_num_threads()
        for rep in range(args.repeats):
            for kind, name, workers in rotated(variants, rep):
                if kind == "read":
                    torch.set_num_threads(1)  # as in a DataLoader worker
                    r = read_all(sources[name], preprocess)
                    torch.set_num_threads(threads)
                elif remote_kinds and name != "json":
                    # every shard build from nothing: an empty manifest index and shard cache
                    cache = root / f"shard-cache-{name}-{workers}-{rep}"
                    os.environ.update(CUSA_SHARD_CACHE=str(cache), CUSA_SHARD_CACHE_GIB=repr(bound / 2**30))
                    cache.mkdir()
                    with PeakFolderSize(cache) as peak:
                        r = run_build(sources[name], root / f"store-{name}-{workers}", args, workers,
                                      manifest_cache=root / f"manifests-{name}-{workers}-{rep}")
                    r["peak_shard_cache_bytes"] = peak.peak
                    shutil.rmtree(cache)
                else:
                    r = run_build(sources[name], root / f"store-{name}-{workers}", args, workers)
                for key, value in r.items():
                    times[(kind, name, workers)].setdefault(key, []).append(value)
                label = f"{kind} {name}" + (f" workers={workers}" if workers is not None else "")
                print(f"  rep {rep + 1}/{args.repeats} {label}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()),
                      flush=True)
        for proc in servers:  # a server stops when its stdin closes
            proc.stdin.close()
            proc.wait(timeout=30)

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
    if remote_kinds:
        result["remote"] = {"shard_cache_bound_bytes": bound, "shards_bytes": sum(shard_bytes)}
        for w in workers_list:
            local = med[("build", "shards", w)]
            for kind in remote_kinds:
                remote = med[("build", kind, w)]
                peak = max(times[("build", kind, w)]["peak_shard_cache_bytes"])
                entry = {"local": local, "remote": remote,
                         "ratio": remote["images_rows_per_s"] / local["images_rows_per_s"],
                         "wall_ratio": local["wall_seconds"] / remote["wall_seconds"],
                         "remote_spread": spread(times[("build", kind, w)]["images_rows_per_s"]),
                         "local_spread": spread(times[("build", "shards", w)]["images_rows_per_s"]),
                         "peak_shard_cache_bytes": peak, "cache_within_bound": peak <= bound}
                entry["meets_target"] = entry["ratio"] >= TARGET_RATIO
                result["remote"][f"{kind} workers={w}"] = entry
                print(f"  remote {kind} workers={w}: local shards {local['images_rows_per_s']:.1f} images/s "
                      f"({entry['local_spread']}), {kind} {remote['images_rows_per_s']:.1f} images/s "
                      f"({entry['remote_spread']}): ratio {entry['ratio']:.2f} (whole build, index included: "
                      f"{entry['wall_ratio']:.2f}); target >= {TARGET_RATIO}: "
                      f"{'met' if entry['meets_target'] else 'not met'}; shard cache peak {peak} of {bound} bytes "
                      f"({'within' if entry['cache_within_bound'] else 'OVER'} its bound)")
    if args.json:
        print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
