"""One training step of a region-based student (SGR, SAF) at batch 128 with 49 regions, and the share of the CUSA
terms in it.

Two kinds of step, measured side by side in one process with interleaved repetitions, on the same student,
optimizer and inputs (random grid regions [B, 49, 1280], COCO-like captions tokenised once):

- triplet: the student's own ITR loss only (hardest-negative triplet, VSE++), the uni-modal heads frozen as the
  trainer freezes them without USA;
- cusa:    triplet + CSA (on the B×B pair scores) + USA (on the uni-modal embeddings), teacher blocks from the
  cache (``SoftLabelSource``, dense, rows in memory, inside the timed step), the sgraf-paper rates.

The step is the trainer's: forward (every image scored against every caption of the batch), loss, zero_grad,
backward, AdamW step, gradient clipping, temperature clamp, losses read back. The share of the CUSA terms is
(cusa − triplet) / cusa of the median CPU times (wall times swing on a shared machine; see docs/benchmarks.md).
The pieces are also timed alone: the pair-scoring forward, and the CSA + USA loss terms with their backward to the
scores and embeddings (what CUSA adds, without the student).

    python benchmarks/bench_region_step.py                                   # SGR and SAF at the paper's sizes
    python benchmarks/bench_region_step.py --embed-dim 256 --sim-dim 64 --word-dim 128 --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (captions, machine, machine_line, make_store, median, peak_rss_bytes, rotated,  # noqa: E402
                     scratch_folder, spread)

from teacher_cache.soft_labels import SoftLabelSource  # noqa: E402
from train.config import PRESETS, STUDENT_DEFAULTS_KEY, build_config, resolved_losses  # noqa: E402
from train.losses import CusaLoss  # noqa: E402
from train.region_students import RegionStudent  # noqa: E402
from train.vocab import Vocabulary, tokenize  # noqa: E402

KINDS = ("triplet", "cusa")


class RegionStepBench:
    """One region student, one optimizer, one batch; a step with and without the CUSA terms."""

    def __init__(self, kind: str, args: argparse.Namespace, soft: SoftLabelSource):
        torch.manual_seed(args.seed)
        texts = captions(args.batch_size, seed=args.seed)
        vocab = Vocabulary.build(texts, min_count=1)
        # a COCO-sized embedding table (about 10K words), so the optimizer updates what a real run updates
        vocab = Vocabulary([*vocab.words, *(f"word{i}" for i in range(max(args.vocab - len(vocab), 0)))])
        self.student = RegionStudent(kind, args.region_dim, len(vocab), word_dim=args.word_dim,
                                     embed_dim=args.embed_dim, sim_dim=args.sim_dim, uni_dim=args.embed_dim)
        self.student.train()
        self.regions = torch.randn(args.batch_size, args.regions, args.region_dim).abs_()
        self.tokens = vocab.batch(texts)
        self.soft, self.batch = soft, args.batch_size
        self.rng = np.random.default_rng(args.seed)
        self.n_images, self.n_captions = args.cache_images, args.cache_captions
        rates = PRESETS["sgraf-paper"][STUDENT_DEFAULTS_KEY][kind]
        cfg = build_config("sgraf-paper", flags={"student": f"{kind}:grid:efficientnet-lite0"})
        self.loss = {"cusa": CusaLoss(resolved_losses(cfg)),
                     "triplet": CusaLoss(resolved_losses(cfg).updated({"csa.enabled": False, "usa.enabled": False}))}
        self.rates = (rates["csa"]["rate"], rates["usa"]["rate"])
        decay = [p for p in self.student.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.student.parameters() if p.ndim < 2]
        temps = [p for m in self.loss.values() for p in m.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 1e-4},
                                            {"params": no_decay + temps, "weight_decay": 0.0}], lr=2e-4)

    def _blocks(self):
        caption_rows = self.rng.choice(self.n_captions, size=self.batch, replace=False)
        return self.soft.block(caption_rows % self.n_images, caption_rows)

    def step(self, kind: str) -> tuple[float, float]:
        """(wall seconds, CPU seconds) of one training step of ``kind``."""
        cusa = kind == "cusa"
        for head in (self.student.uni_head_v, self.student.uni_head_t):
            head.requires_grad_(cusa)  # the trainer freezes the uni heads when USA is off
        t0, c0 = time.perf_counter(), time.process_time()
        t_ii, t_tt = self._blocks() if cusa else (None, None)
        out = self.student(self.regions, self.tokens)
        terms = self.loss[kind].forward_similarity(out["sims"], out["image_uni"], out["text_uni"], None, t_ii, t_tt)
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 2.0)
        self.optimizer.step()
        self.loss[kind].clamp_()
        sum(float(v.detach()) for v in terms.values())
        return time.perf_counter() - t0, time.process_time() - c0

    def pieces(self, repeats: int) -> dict[str, dict[str, float]]:
        """The pair-scoring forward alone, and the CSA + USA terms alone (forward and backward from detached
        scores and embeddings, teacher block included)."""
        with torch.no_grad():
            out = self.student(self.regions, self.tokens)
        loss = CusaLoss(self.loss["cusa"].config.updated({"contrastive.enabled": False}))

        def soft_terms():
            sims, img, txt = (out[k].detach().requires_grad_() for k in ("sims", "image_uni", "text_uni"))
            loss.forward_similarity(sims, img, txt, None, *self._blocks())["loss"].backward()

        def forward():
            with torch.no_grad():
                self.student(self.regions, self.tokens)

        parts = {"pair_scoring_forward": forward, "csa_usa_terms": soft_terms}
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in parts}
        for rep in range(repeats):
            for name in rotated(list(parts), rep):
                t0, c0 = time.perf_counter(), time.process_time()
                parts[name]()
                times[name].append((time.perf_counter() - t0, time.process_time() - c0))
        return {k: {"wall_s": median([w for w, _ in v]), "cpu_s": median([c for _, c in v])} for k, v in times.items()}


def measure(kind: str, args: argparse.Namespace, soft: SoftLabelSource) -> dict:
    bench = RegionStepBench(kind, args, soft)
    params = sum(p.numel() for p in bench.student.parameters())
    for name in KINDS:
        for _ in range(args.warmup):
            bench.step(name)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in KINDS}
    for rep in range(args.repeats):
        for name in rotated(list(KINDS), rep):
            times[name].append(bench.step(name))
            if not args.quiet:
                wall, cpu = times[name][-1]
                print(f"  {kind} rep {rep + 1}/{args.repeats} {name:8s} wall {wall:.2f}s cpu {cpu:.2f}s", flush=True)
    pieces = bench.pieces(args.repeats)
    result: dict = {"student": kind, "parameters": params, "rates": {"csa": bench.rates[0], "usa": bench.rates[1]},
                    "pieces": pieces}
    for name, values in times.items():
        walls, cpus = [w for w, _ in values], [c for _, c in values]
        result[name] = {"wall_s": median(walls), "cpu_s": median(cpus), "wall_range": spread(walls),
                        "cpu_range": spread(cpus)}
    for clock in ("cpu_s", "wall_s"):
        base, full = result["triplet"][clock], result["cusa"][clock]
        result[f"cusa_share_{clock[:-2]}"] = (full - base) / full
        result[f"cusa_ratio_{clock[:-2]}"] = full / base
    result["cusa_share_pieces_cpu"] = pieces["csa_usa_terms"]["cpu_s"] / result["cusa"]["cpu_s"]
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--students", nargs="+", default=["sgr", "saf"], choices=["sgr", "saf"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--regions", type=int, default=49, help="regions per image (7×7 grid of EfficientNet-Lite0)")
    parser.add_argument("--region-dim", type=int, default=1280)
    parser.add_argument("--embed-dim", type=int, default=1024, help="joint size (the paper's 1024)")
    parser.add_argument("--sim-dim", type=int, default=256)
    parser.add_argument("--word-dim", type=int, default=300)
    parser.add_argument("--vocab", type=int, default=10000)
    parser.add_argument("--cache-images", type=int, default=5000, help="rows of the synthetic teacher store")
    parser.add_argument("--cache-captions", type=int, default=25000)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--workdir", default=None, help="where the synthetic store goes (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--json", action="store_true", help="also print one JSON summary at the end")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    print(machine_line(info), flush=True)
    lengths = [len(tokenize(t)) for t in captions(args.batch_size, seed=args.seed)]
    print(f"batch {args.batch_size}: {args.regions} regions × {args.region_dim}, captions of {min(lengths)}–"
          f"{max(lengths)} words; sizes word {args.word_dim}, joint {args.embed_dim}, sim {args.sim_dim}", flush=True)
    result: dict = {"machine": info, "batch_size": args.batch_size, "regions": args.regions,
                    "region_dim": args.region_dim, "sizes": {"word_dim": args.word_dim, "embed_dim": args.embed_dim,
                                                             "sim_dim": args.sim_dim, "vocab": args.vocab},
                    "students": {}}
    with scratch_folder(args.workdir, "cusa-bench-region-") as workdir:
        store = make_store(workdir / "store", args.cache_images, 1280, args.cache_captions, 384, 4096, args.seed)
        soft = SoftLabelSource(store, store, mode="dense", device="cpu")
        for kind in args.students:
            r = measure(kind, args, soft)
            result["students"][kind] = r
            print(f"{kind.upper()} ({r['parameters'] / 1e6:.1f}M parameters): step triplet cpu {r['triplet']['cpu_s']:.2f}s "
                  f"(wall {r['triplet']['wall_s']:.2f}s), cusa cpu {r['cusa']['cpu_s']:.2f}s "
                  f"(wall {r['cusa']['wall_s']:.2f}s); CUSA share {100 * r['cusa_share_cpu']:.1f}% of the step "
                  f"by CPU time ({r['cusa_ratio_cpu']:.3f}×), {100 * r['cusa_share_pieces_cpu']:.1f}% from the "
                  f"terms timed alone; pair-scoring forward alone cpu "
                  f"{r['pieces']['pair_scoring_forward']['cpu_s']:.2f}s", flush=True)
    result["peak_rss_bytes"] = peak_rss_bytes()
    print(f"peak resident memory {result['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    if args.json:
        print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
