"""Opening a large dataset: the manifest read cold and from its index, its fingerprint, resident memory per sample,
and the time from ``cusa-train`` starting to its first optimizer step.

Synthetic DataComp-like data (one caption a sample, a tiny JPEG, 10K samples a shard by default) is written twice:
as webdataset shards and as a CSV of the same samples (image paths that are not read). For each source and size,
each number comes from its own fresh process:

- ``cold_s``: ``read_manifest`` with an empty manifest cache (``--workers`` processes scan the shards; 1 = one core);
- ``warm_s``: the same in a second process, which finds the index (the files were last changed well before);
- ``fingerprint_s``: ``Manifest.fingerprint()`` after the warm read;
- ``peak_rss_mib``: the warm process's peak resident memory before the all-columns pass below
  (``all_columns_peak_rss_mib`` after it);
- ``bytes_per_sample``: its resident growth from just before the read to after the read, the fingerprint and a pass
  over what a training command reads of every row (caption image rows, split labels), divided by the samples;
  ``all_columns_bytes_per_sample`` is the same after touching every column (ids, paths, captions): the upper bound;
- ``first_step_s``: ``cusa-train`` (frozen student whose backbones are the store's teachers, so no backbone runs)
  from its start to its first step record in metrics.jsonl, with a store over the samples built without a teacher
  pass (random ``precomputed:`` embeddings); measured with the manifest index warm.

    python benchmarks/bench_manifest.py                          # 1M and 4M samples (about 10 GB of shards at 4M)
    python benchmarks/bench_manifest.py --samples 200000 --skip-train --json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

BIN = Path(sys.executable).parent
BARS = {"warm_s": 10.0, "bytes_per_sample": 200.0, "first_step_s": 60.0, "cold_samples_per_s_per_core": 50_000}


# ---------------------------------------------------------------------------------------------- data
def _header(name: bytes, size: int) -> bytes:
    """A ustar header (what tar writes for a regular file), checksum included."""
    h = bytearray(512)
    h[0:len(name)] = name
    h[100:108] = b"0000644\x00"
    h[108:116] = b"0000000\x00"
    h[116:124] = b"0000000\x00"
    h[124:136] = b"%011o\x00" % size
    h[136:148] = b"14000000000\x00"
    h[148:156] = b" " * 8
    h[156:157] = b"0"
    h[257:265] = b"ustar\x0000"
    h[148:156] = b"%06o\x00 " % sum(h)
    return bytes(h)


def _pad(n: int) -> bytes:
    return b"\x00" * ((-n) % 512)


def _tiny_jpeg() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 40, 40)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def _write_shard(job: tuple[str, int, int]) -> None:
    path, start, count = job
    jpeg = _tiny_jpeg()
    parts = []
    for i in range(start, start + count):
        key = b"%09d" % i
        text = b"a photo of item %d on a wooden table" % i
        parts += [_header(key + b".jpg", len(jpeg)), jpeg, _pad(len(jpeg)), _header(key + b".txt", len(text)), text,
                  _pad(len(text))]
    parts.append(b"\x00" * 1024)
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(b"".join(parts))
    os.replace(tmp, path)


def write_shards(folder: Path, n: int, per_shard: int, workers: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(str(folder / f"{k:06d}.tar"), start, min(per_shard, n - start))
            for k, start in enumerate(range(0, n, per_shard))]
    todo = [j for j in jobs if not os.path.exists(j[0])]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(_write_shard, todo, chunksize=4))
    return f"{folder}/{{000000..{len(jobs) - 1:06d}}}.tar"


def write_csv(path: Path, n: int) -> str:
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write("image,caption\n")
            step = 100_000
            for lo in range(0, n, step):
                fh.write("".join(f"images/{i:09d}.jpg,a photo of item {i} on a wooden table\n"
                                 for i in range(lo, min(lo + step, n))))
        os.replace(tmp, path)
    return str(path)


def backdate(paths: list[Path]) -> None:
    """Files last changed an hour ago, as a dataset on disk is: the index then trusts them."""
    old = time.time() - 3600
    for p in paths:
        os.utime(p, (old, old))


# ---------------------------------------------------------------------------------------------- one process
def _rss(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def measure_in_this_process(source: str, cache: str, workers: int) -> dict:
    from pipeline.manifest import read_manifest

    base = _rss("VmRSS:")
    t0 = time.perf_counter()
    m = read_manifest(source, manifest_cache=cache, workers=workers)
    read_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    fp = m.fingerprint()
    fingerprint_s = time.perf_counter() - t0
    # what joining training pairs reads of every row
    touched = int(m.caption_image_rows().sum()) + int(m.images.split_codes.sum())
    rows_rss, rows_peak = _rss("VmRSS:"), _rss("VmHWM:")
    # every column, to bound what a process reading everything holds
    strings = [m.captions.texts, m.images.ids()]
    strings.append(m.images.paths_written if m.images.shards is None else m.images.shards.keys)
    for column in strings:
        offsets, data = column.buffers()
        touched += int(offsets[-1]) + int(data.sum())
    if m.images.shards is not None:
        touched += int(m.images.shards.offset.sum() + m.images.shards.size.sum() + m.images.shards.ext.sum())
    all_rss = _rss("VmRSS:")
    return {"samples": len(m.captions), "images": len(m.images), "read_s": read_s, "fingerprint_s": fingerprint_s,
            "fingerprint": fp, "rss_growth": rows_rss - base, "all_columns_rss_growth": all_rss - base,
            "peak_rss": rows_peak, "all_columns_peak_rss": _rss("VmHWM:"), "caption_bytes": int(m.captions.texts.byte_lengths().sum()),
            "checksum": touched}


def measure(source: str, cache: Path, workers: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--measure", source, "--cache", str(cache), "--workers",
                          str(workers)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"measuring {source} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- first step
def build_store_without_teacher(source: str, n: int, work: Path, dim: int) -> tuple[Path, str, str]:
    """Random unit embeddings for every image (by id) and caption (in caption order) as precomputed teachers, and a
    store built from them (no teacher runs)."""
    rng = np.random.default_rng(0)
    img, txt = work / "img.npy", work / "txt.npy"
    store = work / "store"
    if not (store / "zarr.json").exists():
        for path in (img, txt):
            rows = rng.standard_normal((n, dim), dtype=np.float32)
            np.save(path, (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float16))
        with open(work / "img.ids.txt", "w", encoding="utf-8") as fh:
            fh.write("".join(f"{i:09d}\n" for i in range(n)))
        subprocess.run([str(BIN / "cusa-cache"), "build", source, "--out", str(store), "--image-teacher",
                        f"precomputed:{img}", "--text-teacher", f"precomputed:{txt}", "--neighbors", "0",
                        "--batch-size", "65536", "--chunk-rows", "65536", "--json"], check=True,
                       stdout=subprocess.DEVNULL)
    return store, f"precomputed:{img}", f"precomputed:{txt}"


def first_step_seconds(source: str, store: Path, student: str, run: Path, cache: Path) -> float:
    shutil.rmtree(run, ignore_errors=True)
    env = {**os.environ, "CUSA_CACHE_DIR": str(cache)}
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(BIN / "cusa-train"), "--data", source, "--cache", str(store), "--student", student,
                             "--epochs", "1", "--batch-size", "256", "--out", str(run), "--device", "cpu"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    metrics = run / "metrics.jsonl"
    try:
        while proc.poll() is None:
            if metrics.exists() and '"kind": "step"' in metrics.read_text(encoding="utf-8"):
                return time.perf_counter() - t0
            time.sleep(0.05)
        raise SystemExit(f"cusa-train ended before its first step:\n{proc.stderr.read().decode()[-3000:]}")
    finally:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, action="append", help="sizes to measure (default 1M and 4M)")
    ap.add_argument("--samples-per-shard", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=1, help="processes scanning shards on a cold read (default 1)")
    ap.add_argument("--sources", default="shards,csv", help="comma-separated: shards, csv")
    ap.add_argument("--dim", type=int, default=16, help="dimension of the random teacher embeddings")
    ap.add_argument("--skip-train", action="store_true", help="leave out first_step_s (and the stores it needs)")
    ap.add_argument("--workdir", default=None, help="keep the data here (reused by a later run)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:  # a measuring process imports no more than a command opening the data would (no torch)
        print(json.dumps(measure_in_this_process(args.measure, args.cache, args.workers)))
        return
    from _common import machine, machine_line, scratch_folder

    sizes = args.samples or [1_000_000, 4_000_000]
    info = machine()
    results = []
    with scratch_folder(args.workdir, "bench-manifest-") as root:
        for n in sizes:
            for kind in args.sources.split(","):
                work = root / f"{kind}-{n}"
                work.mkdir(parents=True, exist_ok=True)
                if kind == "shards":
                    source = write_shards(work / "shards", n, args.samples_per_shard, max(1, os.cpu_count() or 1))
                    backdate(sorted((work / "shards").glob("*.tar")))
                else:
                    source = write_csv(work / "samples.csv", n)
                    backdate([work / "samples.csv"])
                cache = work / "manifest-cache"
                shutil.rmtree(cache, ignore_errors=True)
                cold = measure(source, cache, args.workers)
                warm = measure(source, cache, args.workers)
                assert warm["fingerprint"] == cold["fingerprint"], "the index changed the fingerprint"
                row = {"source": kind, "samples": n, "cold_s": round(cold["read_s"], 2),
                       "cold_samples_per_s": round(n / cold["read_s"]), "cold_workers": args.workers,
                       "warm_s": round(warm["read_s"], 3), "fingerprint_s": round(warm["fingerprint_s"], 4),
                       "cold_fingerprint_s": round(cold["fingerprint_s"], 4),
                       "peak_rss_mib": round(warm["peak_rss"] / 2**20, 1),
                       "all_columns_peak_rss_mib": round(warm["all_columns_peak_rss"] / 2**20, 1),
                       "bytes_per_sample": round(warm["rss_growth"] / n, 1),
                       "all_columns_bytes_per_sample": round(warm["all_columns_rss_growth"] / n, 1),
                       "caption_bytes_per_sample": round(warm["caption_bytes"] / n, 1), "first_step_s": None}
                if not args.skip_train:
                    store, image_spec, text_spec = build_store_without_teacher(source, n, work, args.dim)
                    row["first_step_s"] = round(first_step_seconds(
                        source, store, f"frozen:{image_spec}+{text_spec}", work / "run", cache), 1)
                results.append(row)
                if not args.json:
                    print(json.dumps(row), flush=True)
    if args.json:
        print(json.dumps({"machine": info, "results": results}))
        return
    print(machine_line(info))
    print(f"{'source':7} {'samples':>9} {'cold_s':>8} {'samples/s':>10} {'warm_s':>7} {'fp_s':>7} {'peak MiB':>9} "
          f"{'B/sample':>9} {'all cols':>9} {'1st step':>9}")
    for r in results:
        step = "-" if r["first_step_s"] is None else f"{r['first_step_s']:.1f}"
        print(f"{r['source']:7} {r['samples']:>9} {r['cold_s']:>8.1f} {r['cold_samples_per_s']:>10} "
              f"{r['warm_s']:>7.2f} {r['fingerprint_s']:>7.3f} {r['peak_rss_mib']:>9.1f} {r['bytes_per_sample']:>9.1f} "
              f"{r['all_columns_bytes_per_sample']:>9.1f} {step:>9}")
    print(f"bars: warm_s <= {BARS['warm_s']}, bytes_per_sample <= {BARS['bytes_per_sample']}, first_step_s <= "
          f"{BARS['first_step_s']}, shards cold >= {BARS['cold_samples_per_s_per_core']} samples/s per core")


if __name__ == "__main__":
    main()
