"""Stage-1 build throughput against the bare teacher forward pass on the same rows.

For each modality, two numbers measured side by side in one process, repetitions interleaved:

- bare: the teacher's ``encode`` alone on batches already in memory (images decoded and preprocessed
  beforehand, captions as a list of strings) — the ceiling a build could reach;
- build: ``pipeline.build.build_store`` on the same rows (images decoded and preprocessed in DataLoader
  workers, forward pass, normalisation, float16 row chunks written to Zarr with their checksums), with
  ``neighbors=0`` so that only the embedding part is measured. Its per-modality rows/s are the build's
  own counters (from the first batch requested to the last chunk written: worker start-up included,
  model loading and store creation excluded); the whole call's wall time is reported too.

The ratio build/bare says how much of the teacher's speed the build keeps. The images are the synthetic
demo scenes re-saved as 480x360 JPEGs with photographic-looking grain (about 80 KB each, like a COCO
photo at that size), so decoding costs what it would on real data.

    python benchmarks/bench_build.py                                  # 128 images, workers 0/1/2, 3 repetitions
    python benchmarks/bench_build.py --images 1024 --workers 2 --repeats 5 --json
    python benchmarks/bench_build.py --image-teacher timm:resnet50:/path/resnet50.pth --workers 1 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, machine_line, median, rotated, spread  # noqa: E402

from pipeline.build import BuildConfig, build_store  # noqa: E402
from pipeline.demo_data import write_demo_dataset  # noqa: E402
from pipeline.encoders import DEFAULT_IMAGE_TEACHER, DEFAULT_TEXT_TEACHER, build_encoder  # noqa: E402
from pipeline.images import load_image  # noqa: E402
from pipeline.manifest import read_manifest  # noqa: E402

TARGET_IMAGE_RATIO = 0.85


def make_jpeg_dataset(root: Path, n_images: int, width: int, height: int, quality: int, grain: float,
                      seed: int) -> tuple[Path, dict]:
    """Demo scenes as ``width``x``height`` JPEGs plus a caption-list JSON naming them; returns (json, stats).

    The flat-coloured demo scenes would compress to a few KB and decode in a fraction of a real photo's
    time; gaussian grain (luminance ``grain``, chroma a third of it) brings size and decoding cost to
    those of a photograph.
    """
    demo = root / "demo"
    write_demo_dataset(demo, n_images=n_images, seed=seed, image_size=max(width, height))
    entries = json.loads((demo / "all.json").read_text())
    (root / "jpeg").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = []
    for entry in entries:
        img = Image.open(demo / entry["image"]).convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
        pixels = np.asarray(img, dtype=np.float32)
        noise = rng.normal(0.0, grain, (height, width, 1)) + rng.normal(0.0, grain / 3, (height, width, 3))
        relative = f"jpeg/{entry['image_id']}.jpg"
        Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8)).save(root / relative, "JPEG",
                                                                               quality=quality)
        sizes.append((root / relative).stat().st_size)
        entry["image"] = relative
    shutil.rmtree(demo)
    annotations = root / "captions.json"
    annotations.write_text(json.dumps(entries))
    return annotations, {"images": len(entries), "captions": sum(len(e["caption"]) for e in entries),
                         "width": width, "height": height, "jpeg_quality": quality,
                         "mean_file_kb": round(float(np.mean(sizes)) / 1024, 1)}


def bare_image_forward(encoder, batches: list[torch.Tensor]) -> float:
    t0 = time.perf_counter()
    for batch in batches:
        encoder.encode(batch)
    return time.perf_counter() - t0


def bare_text_forward(encoder, batches: list[list[str]]) -> float:
    t0 = time.perf_counter()
    for batch in batches:
        encoder.encode(batch)
    return time.perf_counter() - t0


def run_build(annotations: Path, root: Path, out: Path, args: argparse.Namespace, workers: int) -> dict:
    cfg = BuildConfig(annotations=str(annotations), out=str(out), format="caption-json", image_root=str(root),
                      image_teacher=args.image_teacher, text_teacher=args.text_teacher,
                      batch_size=args.batch_size, workers=workers, device="cpu", neighbors=0,
                      chunk_rows=args.chunk_rows, overwrite=True, progress=False)
    t0 = time.perf_counter()
    summary = build_store(cfg)
    wall = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return {"images_rows_per_s": summary.images["rows_per_s"], "texts_rows_per_s": summary.texts["rows_per_s"],
            "images_seconds": summary.images["seconds"], "texts_seconds": summary.texts["seconds"],
            "wall_seconds": wall}


def _label(workers: int | None, threads: int) -> str:
    return f"threads={threads}" if workers is None else f"workers={workers} threads={threads}"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Timings from a shared machine: compare the ratios, which are measured side "
                                       "by side with interleaved repetitions.")
    p.add_argument("--images", type=int, default=128, help="number of images (5 captions each); default 128")
    p.add_argument("--width", type=int, default=480)
    p.add_argument("--height", type=int, default=360)
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--grain", type=float, default=24.0, help="std of the photographic grain added to the scenes")
    p.add_argument("--batch-size", type=int, default=64, help="build and bare batch size (the build's default)")
    p.add_argument("--workers", type=int, action="append",
                   help="DataLoader workers of the build; repeat to compare (default: 0, 1 and 2)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repetitions; medians are reported")
    p.add_argument("--image-teacher", default=DEFAULT_IMAGE_TEACHER)
    p.add_argument("--text-teacher", default=DEFAULT_TEXT_TEACHER)
    p.add_argument("--chunk-rows", type=int, default=2048)
    p.add_argument("--threads", type=int, action="append",
                   help="torch intra-op threads of the main process (forward pass); repeat to compare "
                        "(default: torch's own choice, one per core)")
    p.add_argument("--workdir", default=None, help="where the images and stores go (default: a temporary folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON summary at the end")
    args = p.parse_args(argv)
    workers_list = args.workers or [0, 1, 2]
    threads_list = args.threads or [torch.get_num_threads()]
    info = machine()
    print(machine_line(info), flush=True)

    tmp = None
    if args.workdir:
        root = Path(args.workdir)
        root.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="cusa-bench-build-")
        root = Path(tmp.name)
    try:
        t0 = time.perf_counter()
        annotations, data = make_jpeg_dataset(root, args.images, args.width, args.height, args.jpeg_quality,
                                              args.grain, args.seed)
        print(f"data: {data['images']} JPEGs {args.width}x{args.height} (mean {data['mean_file_kb']} KB), "
              f"{data['captions']} captions, written in {time.perf_counter() - t0:.1f}s", flush=True)

        image_encoder = build_encoder(args.image_teacher, "image", device="cpu")
        text_encoder = build_encoder(args.text_teacher, "text", device="cpu")
        manifest = read_manifest(str(annotations), format="caption-json", image_root=str(root))
        # The bare forward's input: every image decoded and preprocessed once, up front (not timed, but
        # measured, since it is the work the build's workers have to hide behind the forward pass).
        torch.set_num_threads(1)  # as in a DataLoader worker, which runs single-threaded
        t0 = time.perf_counter()
        pixels = [image_encoder.preprocess(load_image(manifest.image_path(i), row=i))
                  for i in range(len(manifest.images))]
        decode_s = time.perf_counter() - t0
        image_batches = [torch.stack(pixels[lo:lo + args.batch_size])
                         for lo in range(0, len(pixels), args.batch_size)]
        texts = [c.text for c in manifest.captions]
        text_batches = [texts[lo:lo + args.batch_size] for lo in range(0, len(texts), args.batch_size)]
        n_img, n_txt = len(pixels), len(texts)
        print(f"decode + preprocess, one thread (as in a DataLoader worker): {n_img / decode_s:.1f} images/s "
              f"({decode_s / n_img * 1e3:.1f} ms/image)", flush=True)
        for threads in threads_list:  # warm-up: first-call allocations, kernel selection per thread count
            torch.set_num_threads(threads)
            image_encoder.encode(image_batches[0])
            text_encoder.encode(text_batches[0])

        variants = [(None, t) for t in threads_list] + [(w, t) for t in threads_list for w in workers_list]
        times: dict[tuple, dict[str, list[float]]] = {v: {} for v in variants}
        for rep in range(args.repeats):
            for workers, threads in rotated(variants, rep):
                torch.set_num_threads(threads)
                if workers is None:
                    r = {"images_rows_per_s": n_img / bare_image_forward(image_encoder, image_batches),
                         "texts_rows_per_s": n_txt / bare_text_forward(text_encoder, text_batches)}
                else:
                    r = run_build(annotations, root, root / f"store-w{workers}-t{threads}", args, workers)
                for key, value in r.items():
                    times[(workers, threads)].setdefault(key, []).append(value)
                shown = ", ".join(f"{k} {v:.1f}" for k, v in r.items())
                print(f"  rep {rep + 1}/{args.repeats} {_label(workers, threads)}: {shown}", flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()

    result = {
        "benchmark": "bench_build", "machine": info, "data": data, "batch_size": args.batch_size,
        "image_teacher": args.image_teacher, "text_teacher": args.text_teacher, "repeats": args.repeats,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset: OpenMP default, threads spin)"),
        "decode_preprocess_images_per_s_one_process": n_img / decode_s,
        "bare": {}, "builds": {}, "target_image_ratio": TARGET_IMAGE_RATIO,
    }
    print(f"\nmedians of {args.repeats} interleaved repetitions ({info['cores']}-core CPU"
          f"{', ' + info['gpu'] if info['gpu'] else ', no GPU'}, shared load):")
    bare = {}
    for t in threads_list:
        b = times[(None, t)]
        bare[t] = (median(b["images_rows_per_s"]), median(b["texts_rows_per_s"]))
        result["bare"][f"threads={t}"] = {"images_rows_per_s": bare[t][0], "texts_rows_per_s": bare[t][1],
                                          "images_spread": spread(b["images_rows_per_s"]),
                                          "texts_spread": spread(b["texts_rows_per_s"])}
        print(f"  bare forward {_label(None, t):22s} images {bare[t][0]:7.1f} rows/s   "
              f"captions {bare[t][1]:7.1f} rows/s")
    best_bare = max(v[0] for v in bare.values())
    best = None
    for t in threads_list:
        for w in workers_list:
            b = times[(w, t)]
            img, txt = median(b["images_rows_per_s"]), median(b["texts_rows_per_s"])
            key = _label(w, t)
            entry = {"workers": w, "threads": t, "images_rows_per_s": img, "texts_rows_per_s": txt,
                     "images_ratio": img / bare[t][0], "texts_ratio": txt / bare[t][1],
                     "images_ratio_vs_fastest_bare": img / best_bare,
                     "wall_seconds": median(b["wall_seconds"]), "images_spread": spread(b["images_rows_per_s"]),
                     "meets_target": img / bare[t][0] >= TARGET_IMAGE_RATIO}
            result["builds"][key] = entry
            if best is None or entry["images_rows_per_s"] > result["builds"][best]["images_rows_per_s"]:
                best = key
            print(f"  build {key:22s} images {img:7.1f} rows/s ({entry['images_ratio']:.2f}x bare at {t} threads, "
                  f"{entry['images_ratio_vs_fastest_bare']:.2f}x fastest bare)   captions {txt:7.1f} rows/s "
                  f"({entry['texts_ratio']:.2f}x)   whole call {entry['wall_seconds']:.1f}s")
    result["fastest_build"] = best
    hit = [k for k, v in result["builds"].items() if v["meets_target"]]
    print(f"  image target build/bare >= {TARGET_IMAGE_RATIO}: "
          + (f"met with {', '.join(hit)}" if hit else "not met")
          + f"; fastest build: {best} ({result['builds'][best]['images_ratio']:.2f}x bare)")
    if args.json:
        print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
