"""`cusa-train` and `cusa-eval`."""

from __future__ import annotations

import os

import click

from pipeline.cli_options import (FORMAT_CHOICES, data_cache_options, shard_layout_options,
                                  store_cache_options)
from pipeline.console import emit, user_errors
from train.config import LOSS_CHOICES, PRESETS, TrainConfig, build_config


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data", default=None, type=click.Path(),
              help="Training annotations, or webdataset shards ('train-{000000..000127}.tar', '::'-joined patterns, "
                   "a .tar, or a list file); required, except with --resume (the run's own).")
@click.option("--cache", default=None, type=click.Path(file_okay=False),
              help="Teacher cache: a folder (cusa-cache build) or a URL (s3://, gs://, https://, hf://; cusa-cache "
                   "push); required, except with --resume: the run's own.")
@click.option("--student", default=None, help="frozen:IMAGE_SPEC+TEXT_SPEC (default "
              "frozen:efficientnet-lite0+minilm-l6), open_clip:ARCH[:CHECKPOINT], or a region student "
              "sgr:REGIONS / saf:REGIONS with REGIONS grid:IMAGE_SPEC or precomp:DIR.")
@click.option("--val-data", default=None, type=click.Path(),
              help="Validation annotations: the best epoch is chosen on these, never on test.")
@click.option("--preset", default=None, type=click.Choice(sorted(PRESETS)),
              help="Named settings [default: paper; with --resume: the run's].")
@click.option("--loss", default=None, type=click.Choice(LOSS_CHOICES),
              help="Terms: the student's own ITR loss only (contrastive: InfoNCE, or the triplet loss for sgr/saf), "
                   "+csa, +usa, or cusa (all) [default: cusa].")
@click.option("--epochs", default=None, type=click.IntRange(min=1), help="Epochs to train [default: the preset's].")
@click.option("--batch-size", default=None, type=click.IntRange(min=2),
              help="Pairs per step and process (under torchrun each rank's) [default: the preset's].")
@click.option("--lr", default=None, type=float,
              help="Peak learning rate (cosine to min_lr) [default: the preset's for the student: paper fine-tunes "
                   "open_clip at 1e-5 and trains a frozen student's new layers at 1e-3]; --set head_lr=X gives the "
                   "new heads their own.")
@click.option("--seed", default=None, type=int, help="Seed of the initialisation and the batch order [default: 0].")
@click.option("--device", default=None, type=click.Choice(["auto", "cpu", "cuda"]),
              help="Where the student trains [default: auto, cuda when present].")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Run folder [default: runs/cusa].")
@click.option("--resume", is_flag=True,
              help="Continue the run in --out from its last checkpoint, with its own settings (config.json); "
                   "only how it runs (--device, --workers, --report-to, --on-bad-image, --save-every-steps, ...) "
                   "and --epochs (to extend) may differ.")
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False),
              help="YAML/JSON file of settings (overrides the preset).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Any setting, e.g. --set csa.rate=0.2 --set soft_labels.mode=sparse (repeatable).")
@click.option("--split", default=None, help="Split of --data to train on [default: train].")
@click.option("--val-split", default=None, help="Split of --val-data [default: val].")
@click.option("--workers", default=None, type=click.IntRange(min=0),
              help="DataLoader processes decoding images [default: 2].")
@click.option("--on-bad-image", default=None, type=click.Choice(["fail", "skip"]),
              help="An image that cannot be read while validating or computing frozen features: stop, or leave it "
                   "out [default: fail; images the cache skipped are always left out].")
@click.option("--image-cache", default=None, type=click.Path(file_okay=False),
              help="Image soft labels from this store instead of --cache.")
@click.option("--text-cache", default=None, type=click.Path(file_okay=False),
              help="Caption soft labels from this store instead of --cache.")
@click.option("--sampler", default=None, type=click.Choice(["random", "teacher-neighbors"]),
              help="Batches of random pairs, or of teacher-neighbor groups from the cache [default: random].")
@click.option("--report-to", default=None, metavar="none|tensorboard|wandb",
              help="Also write every value of metrics.jsonl as TensorBoard scalars in RUN/tensorboard "
                   "(tensorboard --logdir RUN), to a Weights & Biases run (pip install 'cusa[wandb]'; "
                   "WANDB_MODE=offline works without a network), or both: tensorboard,wandb [default: none].")
@click.option("--wandb-project", default=None, help="W&B project [default: WANDB_PROJECT, else cusa].")
@click.option("--wandb-name", default=None, help="W&B run name [default: the --out folder's name].")
@click.option("--format", "fmt", default=None, type=click.Choice(FORMAT_CHOICES),
              help="Format of --data and --val-data [default: auto].")
@shard_layout_options()
@data_cache_options
@store_cache_options()
@click.option("--save-every-steps", default=None, type=click.IntRange(min=0), metavar="N",
              help="Also write last.pt every N optimizer steps, mid-epoch; --resume continues from that step "
                   "[default: 0, epoch ends only].")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON.")
@user_errors
def train_main(data, cache, student, val_data, preset, loss, epochs, batch_size, lr, seed, device, out, resume,
               config_file, overrides, split, val_split, workers, on_bad_image, image_cache, text_cache, sampler,
               report_to, wandb_project, wandb_name, fmt, image_key, caption_key, id_field, store_cache,
               store_cache_gib, save_every_steps,
               as_json):
    """Train a student with contrastive + CSA + USA, soft labels read from the teacher cache."""
    from train.metrics_log import require_report_targets
    from train.trainer import train

    flags = {"data": data, "cache": cache, "student": student, "val_data": val_data, "loss": loss,
             "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "device": device,
             "split": split, "val_split": val_split, "workers": workers, "on_bad_image": on_bad_image,
             "image_cache": image_cache, "text_cache": text_cache, "sampler": sampler, "report_to": report_to,
             "wandb_project": wandb_project, "wandb_name": wandb_name, "format": fmt, "image_key": image_key,
             "caption_key": caption_key, "id_field": id_field, "save_every_steps": save_every_steps,
             "store_cache": store_cache, "store_cache_gib": store_cache_gib}
    if resume:
        from train.resume import resume_config

        cfg = resume_config(out or TrainConfig.out, preset, config_file, flags, list(overrides))
    else:
        for name, value in (("--data", data), ("--cache", cache)):
            if value is None:
                raise click.UsageError(f"Missing option '{name}' (only --resume takes it from the run folder).")
        cfg = build_config(preset or "paper", config_file, {**flags, "out": out}, list(overrides))
    require_report_targets(cfg.report_to)
    summary = train(cfg, resume=resume, show_progress=not as_json)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    best = summary.get("best_val")
    lrs = ", ".join(f"{name} {g['lr']:.0e}" for name, g in summary["lr_groups"].items())
    human = [f"run        {summary['out']}  ({summary['epochs']} epochs, {summary['steps']} steps, "
             f"{summary['seconds']:.1f} s on {summary['device']})",
             f"terms      {', '.join(summary['loss_terms'])}",
             f"lr         {lrs} (cosine to min_lr)",
             f"checkpoint {summary['checkpoint']}"]
    if best:
        human.append(f"best val   epoch {summary['best_epoch']}: rsum {best['rsum']:.1f}")
    if summary.get("val_skipped_images"):
        human.append(f"val        {summary['val_skipped_images']} unreadable image(s) left out")
    emit(summary, as_json, "\n".join(human))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run", metavar="RUN_DIR_OR_CHECKPOINT", type=click.Path(exists=False))
@click.option("--data", required=True, type=click.Path(),
              help="Annotations or webdataset shards to evaluate on.")
@click.option("--split", default="test", show_default=True, help="Split of --data to evaluate on.")
@click.option("--format", "fmt", default=None, type=click.Choice(FORMAT_CHOICES),
              help="Format of --data [default: the run's setting].")
@shard_layout_options(defaults_from_run=True)
@data_cache_options
@store_cache_options(defaults_from_run=True)
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
              help="Where the student runs (auto: cuda when present).")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(min=1),
              help="Images or captions per forward pass.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=0),
              help="DataLoader processes decoding images.")
@click.option("--on-bad-image", default="fail", show_default=True, type=click.Choice(["fail", "skip"]),
              help="An image that cannot be read: stop, or leave it and its captions out (counted as "
                   "skipped_images). Images the run's cache skipped at build time are always left out.")
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
@click.option("--compare", "compare", default=None, type=click.Path(), metavar="RUN_B",
              help="Evaluate a second run too: both tables and the gain RUN − RUN_B (and side-by-side examples).")
@click.option("--ensemble", default=None, type=click.Path(exists=False), metavar="RUN_B",
              help="Rank by the mean of this run's and RUN_B's image × caption similarity matrices (SGRAF = an SGR "
                   "run + an SAF run; any two students).")
@click.option("--examples", "n_examples", default=None, type=click.IntRange(min=1), metavar="N",
              help="Write retrieval examples of N test captions and N test images to --out: examples_t2i.png "
                   "(top-5 images of each run, the ground truth framed) and examples.md.")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Folder for --examples [default: RUN/examples].")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed that picks the examples.")
@click.option("--json", "as_json", is_flag=True, help="Print the recalls as JSON.")
@user_errors
def eval_main(run, data, split, fmt, image_key, caption_key, id_field, store_cache, store_cache_gib, device,
              batch_size, workers, on_bad_image, image_labels, image_embedding, sts, text_embedding, eccv_captions,
              compare, ensemble, n_examples, out_dir, seed, as_json):
    """Image-text retrieval R@1/5/10 both ways and rsum (COCO 5K and 1K when the split has 5000 images);
    optionally uni-modal image retrieval, sentence similarity and ECCV Caption."""
    from train.evaluation_run import evaluate_run

    if out_dir is not None and not n_examples:
        raise click.UsageError("--out names the folder for --examples; add --examples N")
    if ensemble and (image_labels or sts or eccv_captions or compare or n_examples):
        raise click.ClickException("--ensemble evaluates image-text retrieval of the pair only; run --image-labels, "
                                   "--sts, --eccv, --compare and --examples on each run by itself")
    if image_labels or sts or eccv_captions:
        from train.unimodal import read_extra_inputs

        # read the input files first: a mistake in one should not cost the whole retrieval evaluation
        image_labels, sts = read_extra_inputs(image_labels, sts, eccv_captions)
    cross = [what for asked, what in ((n_examples, "--examples ranks by cross-modal embeddings"),
                                      (image_labels and image_embedding == "cross",
                                       "--image-embedding cross asks for cross-modal image embeddings"),
                                      (sts and text_embedding == "cross",
                                       "--text-embedding cross asks for cross-modal text embeddings")) if asked]
    for checked in [run, compare] if cross else []:
        if checked is not None:
            from train.evaluation_run import refuse_region_student

            refuse_region_student(checked, cross[0])  # before any work: the retrieval table would be lost otherwise
    source_options = {"format": fmt, "image_key": image_key, "caption_key": caption_key, "id_field": id_field,
                      "store_cache": store_cache, "store_cache_gib": store_cache_gib}
    result = evaluate_run(run, data, split=split, device=device, batch_size=batch_size, workers=workers,
                          progress=not as_json, on_bad_image=on_bad_image, source_options=source_options,
                          ensemble=ensemble)
    from train.evaluate import format_table

    table = {"R@K (%)": {k: result[k] for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10",
                                                "rsum")}}
    title = (f"{result['checkpoint']} on {data} [{split}]: {result['images']} images, {result['captions']} captions, "
             f"skipped_images: {result['skipped_images']}")
    if "ensemble" in result:
        members = result["ensemble"]["members"]
        title = (f"ensemble of {members[0]['checkpoint']} and {members[1]['checkpoint']} (mean similarity) on {data} "
                 f"[{split}]: {result['images']} images, {result['captions']} captions, skipped_images: "
                 f"{result['skipped_images']}; members' rsum {members[0]['rsum']:.1f} and {members[1]['rsum']:.1f}")
        table = {"ensemble R@K (%)": table["R@K (%)"]}
    if result["skipped_images"]:
        title += " (unreadable: left out with their captions, not counted as misses)"
    human = format_table(table, title=title)
    for skipped in result["skipped_image_details"][:10]:
        human += f"\nskipped   {skipped['path']}: {skipped['reason']}"
    if "coco_1k" in result:
        human += "\n" + format_table({"COCO 1K (5-fold mean)": result["coco_1k"]})
    if image_labels or sts or eccv_captions:
        from train.unimodal import run_extra_evaluations

        extra, extra_human = run_extra_evaluations(result, data, split, device, batch_size, workers, image_labels,
                                                   image_embedding, sts, text_embedding, eccv_captions,
                                                   progress=not as_json)
        result.update(extra)
        human += "\n" + extra_human
    if compare is not None or n_examples:
        human += "\n" + _compare_and_examples(result, run, data, split, device, batch_size, workers, compare,
                                              n_examples, out_dir, seed, not as_json, on_bad_image, source_options)
    emit(result, as_json, human)


def _compare_and_examples(result: dict, run: str, data: str, split: str, device: str, batch_size: int, workers: int,
                          compare: str | None, n_examples: int | None, out_dir: str | None, seed: int,
                          progress: bool, on_bad_image: str = "fail", source_options: dict | None = None) -> str:
    """``--compare``: RUN_B's recalls and the gain (added to ``result``); ``--examples``: the example files. Both
    runs read ``data`` with the command's ``source_options`` (where given), as RUN itself was evaluated."""
    from train.evaluate import format_table, gain
    from train.evaluation_run import evaluate_run

    human = []
    runs = [run]
    if compare is not None:
        from train.search import run_labels

        other = evaluate_run(compare, data, split=split, device=device, batch_size=batch_size, workers=workers,
                             progress=progress, on_bad_image=on_bad_image, source_options=source_options)
        keys = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
        result["compare"] = other
        result["gain"] = gain(other, result)
        a, b = run_labels([run, compare])
        human.append(format_table({a: {k: result[k] for k in keys}, b: {k: other[k] for k in keys},
                                   f"gain ({a} − {b})": result["gain"]}))
        runs.append(compare)
    if n_examples:
        from train.factory import resolve_checkpoint
        from train.examples import write_examples

        out = out_dir or str(resolve_checkpoint(run).parent / "examples")
        result["examples"] = write_examples(runs, data, split, n_examples, out, seed=seed, device=device,
                                            batch_size=batch_size, workers=workers, progress=progress,
                                            source_options=source_options)
        human.append(f"examples  {result['examples']['png']}, {result['examples']['md']}")
    return "\n".join(human)
