"""`cusa-train` and `cusa-eval`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
import torch

from pipeline.cli import emit, user_errors
from train.config import LOSS_CHOICES, PRESETS, build_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="Training annotations.")
@click.option("--cache", required=True, type=click.Path(file_okay=False), help="Teacher cache (cusa-cache build).")
@click.option("--student", default=None, help="frozen:IMAGE_SPEC+TEXT_SPEC (default "
              "frozen:efficientnet-lite0+minilm-l6), open_clip:ARCH[:CHECKPOINT], or a region student "
              "sgr:REGIONS / saf:REGIONS with REGIONS grid:IMAGE_SPEC or precomp:DIR.")
@click.option("--val-data", default=None, type=click.Path(dir_okay=False),
              help="Validation annotations: the best epoch is chosen on these, never on test.")
@click.option("--preset", default="paper", show_default=True, type=click.Choice(sorted(PRESETS)))
@click.option("--loss", default=None, type=click.Choice(LOSS_CHOICES),
              help="Terms: the student's own ITR loss only (contrastive: InfoNCE, or the triplet loss for sgr/saf), "
                   "+csa, +usa, or cusa (all) [default: cusa].")
@click.option("--epochs", default=None, type=click.IntRange(min=1))
@click.option("--batch-size", default=None, type=click.IntRange(min=2))
@click.option("--lr", default=None, type=float)
@click.option("--seed", default=None, type=int)
@click.option("--device", default=None, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Run folder [default: runs/cusa].")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False),
              help="YAML/JSON file of settings (overrides the preset).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Any setting, e.g. --set csa.rate=0.2 --set soft_labels.mode=sparse (repeatable).")
@click.option("--split", default=None, help="Split of --data to train on [default: train].")
@click.option("--val-split", default=None, help="Split of --val-data [default: val].")
@click.option("--workers", default=None, type=click.IntRange(min=0))
@click.option("--image-cache", default=None, type=click.Path(file_okay=False),
              help="Image soft labels from this store instead of --cache.")
@click.option("--text-cache", default=None, type=click.Path(file_okay=False),
              help="Caption soft labels from this store instead of --cache.")
@click.option("--sampler", default=None, type=click.Choice(["random", "teacher-neighbors"]),
              help="Batches of random pairs, or of teacher-neighbor groups from the cache [default: random].")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON.")
@user_errors
def train_main(data, cache, student, val_data, preset, loss, epochs, batch_size, lr, seed, device, out, resume,
               config_file, overrides, split, val_split, workers, image_cache, text_cache, sampler, as_json):
    """Train a student with contrastive + CSA + USA, soft labels read from the teacher cache."""
    from train.trainer import train

    flags = {"data": data, "cache": cache, "student": student, "val_data": val_data, "loss": loss,
             "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "device": device, "out": out,
             "split": split, "val_split": val_split, "workers": workers, "image_cache": image_cache,
             "text_cache": text_cache, "sampler": sampler}
    cfg = build_config(preset, config_file, flags, list(overrides))
    summary = train(cfg, resume=resume, show_progress=not as_json)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    best = summary.get("best_val")
    human = [f"run       {summary['out']}  ({summary['epochs']} epochs, {summary['steps']} steps, "
             f"{summary['seconds']:.1f} s on {summary['device']})",
             f"terms     {', '.join(summary['loss_terms'])}",
             f"checkpoint {summary['checkpoint']}"]
    if best:
        human.append(f"best val  epoch {summary['best_epoch'] + 1}: rsum {best['rsum']:.1f}")
    emit(summary, as_json, "\n".join(human))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run", metavar="RUN_DIR_OR_CHECKPOINT", type=click.Path(exists=False))
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="Annotations to evaluate on.")
@click.option("--split", default="test", show_default=True)
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=0))
@click.option("--image-labels", default=None, type=click.Path(dir_okay=False),
              help="CSV/TSV (image,label) or JSON list of {image, label}: image→image mAP@R and R@1.")
@click.option("--image-embedding", default="uni", show_default=True, type=click.Choice(["uni", "cross"]),
              help="Image embeddings for --image-labels.")
@click.option("--sts", default=None, type=click.Path(dir_okay=False),
              help="STS-B or SICK-R pairs (TSV/CSV with a header): Spearman of cosine vs gold score.")
@click.option("--text-embedding", default="uni", show_default=True, type=click.Choice(["uni", "cross"]),
              help="Text embeddings for --sts.")
@click.option("--eccv", "eccv_captions", default=None, type=click.Path(dir_okay=False), metavar="CAPTIONS_JSON",
              help="ECCV Caption mAP@R, R-P, R@1 on the COCO 5K test split of --data; give COCO's "
                   "captions_val2014.json (captions are named by its annotation ids).")
@click.option("--ensemble", default=None, type=click.Path(exists=False), metavar="RUN_DIR_OR_CHECKPOINT",
              help="A second run: rank by the mean of the two runs' image × caption similarity matrices "
                   "(SGRAF = an SGR run + an SAF run; any two students).")
@click.option("--json", "as_json", is_flag=True, help="Print the recalls as JSON.")
@user_errors
def eval_main(run, data, split, device, batch_size, workers, image_labels, image_embedding, sts, text_embedding,
              eccv_captions, ensemble, as_json):
    """Image-text retrieval R@1/5/10 both ways and rsum (COCO 5K and 1K when the split has 5000 images);
    optionally uni-modal image retrieval, sentence similarity and ECCV Caption."""
    from train.evaluation_run import evaluate_run

    if ensemble and (image_labels or sts or eccv_captions):
        raise click.ClickException("--ensemble evaluates image-text retrieval only; run --image-labels, --sts and "
                                   "--eccv on each run by itself")
    cross = [what for asked, what in ((eccv_captions, "--eccv ranks by cross-modal embeddings"),
                                      (image_labels and image_embedding == "cross",
                                       "--image-embedding cross asks for cross-modal image embeddings"),
                                      (sts and text_embedding == "cross",
                                       "--text-embedding cross asks for cross-modal text embeddings")) if asked]
    if cross:
        from train.evaluation_run import refuse_region_student

        refuse_region_student(run, cross[0])  # before any work: the retrieval table would be lost otherwise
    if image_labels or sts or eccv_captions:
        from train.unimodal import read_extra_inputs

        # read the input files first: a mistake in one should not cost the whole retrieval evaluation
        image_labels, sts = read_extra_inputs(image_labels, sts, eccv_captions)
    result = evaluate_run(run, data, split=split, device=device, batch_size=batch_size, workers=workers,
                          progress=not as_json, ensemble=ensemble)
    from train.evaluate import format_table

    table = {"R@K (%)": {k: result[k] for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10",
                                                "rsum")}}
    title = f"{result['checkpoint']} on {data} [{split}]: {result['images']} images, {result['captions']} captions"
    if "ensemble" in result:
        members = result["ensemble"]["members"]
        title = (f"ensemble of {members[0]['checkpoint']} and {members[1]['checkpoint']} (mean similarity) on {data} "
                 f"[{split}]: {result['images']} images, {result['captions']} captions; members' rsum "
                 f"{members[0]['rsum']:.1f} and {members[1]['rsum']:.1f}")
        table = {"ensemble R@K (%)": table["R@K (%)"]}
    human = format_table(table, title=title)
    if "coco_1k" in result:
        human += "\n" + format_table({"COCO 1K (5-fold mean)": result["coco_1k"]})
    if image_labels or sts or eccv_captions:
        from train.unimodal import run_extra_evaluations

        extra, extra_human = run_extra_evaluations(result, data, split, device, batch_size, workers, image_labels,
                                                   image_embedding, sts, text_embedding, eccv_captions,
                                                   progress=not as_json)
        result.update(extra)
        human += "\n" + extra_human
    emit(result, as_json, human)
