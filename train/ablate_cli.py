"""`cusa-ablate`: a grid of cusa-train runs from one cache, evaluated and summarised."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli_options import (FORMAT_CHOICES, data_cache_options, shard_layout_options,
                                  store_cache_options)
from pipeline.console import emit, user_errors
from train.config import PRESETS


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data", required=True, type=click.Path(), help="Training annotations.")
@click.option("--eval-data", required=True, type=click.Path(), help="Annotations to test on.")
@click.option("--eval-split", default="test", show_default=True, help="Split of --eval-data every run is tested on.")
@click.option("--cache", required=True, type=click.Path(file_okay=False),
              help="Teacher cache shared by all runs: a folder or a URL (s3://, gs://, https://, hf://).")
@click.option("--student", default=None, help="Student spec (default frozen:efficientnet-lite0+minilm-l6).")
@click.option("--grid", "grid", multiple=True, metavar="KEY=V1,V2,...",
              help="A grid axis over any cusa-train setting, e.g. --grid loss=contrastive,csa,usa,cusa "
                   "--grid csa.rate=0.05,0.1,0.2 (repeatable; settings are the cartesian product).")
@click.option("--seeds", default=3, show_default=True, type=click.IntRange(min=1),
              help="Runs per setting, seeds 0 to N-1.")
@click.option("--out", default="ablations/run", show_default=True, type=click.Path(file_okay=False),
              help="Folder of the grid: its runs, results.json, results.md and plots.")
@click.option("--val-data", default=None, type=click.Path(), help="As cusa-train --val-data, for every run.")
@click.option("--preset", default="paper", show_default=True, type=click.Choice(sorted(PRESETS)),
              help="Named settings every run starts from.")
@click.option("--epochs", default=None, type=click.IntRange(min=1), help="As cusa-train --epochs.")
@click.option("--batch-size", default=None, type=click.IntRange(min=2), help="As cusa-train --batch-size.")
@click.option("--lr", default=None, type=float, help="As cusa-train --lr.")
@click.option("--device", default=None, type=click.Choice(["auto", "cpu", "cuda"]), help="As cusa-train --device.")
@click.option("--workers", default=None, type=click.IntRange(min=0), help="As cusa-train --workers.")
@click.option("--split", default=None, help="Split of --data to train on [default: train].")
@click.option("--val-split", default=None, help="Split of --val-data [default: val].")
@click.option("--image-cache", default=None, type=click.Path(file_okay=False), help="As cusa-train --image-cache.")
@click.option("--text-cache", default=None, type=click.Path(file_okay=False), help="As cusa-train --text-cache.")
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False),
              help="YAML/JSON file of settings shared by every run.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Settings shared by every run.")
@click.option("--sampler", default=None, type=click.Choice(["random", "teacher-neighbors"]),
              help="As cusa-train --sampler (a grid axis too: --grid sampler=random,teacher-neighbors).")
@click.option("--report-to", default=None, metavar="none|tensorboard|wandb",
              help="TensorBoard scalars of every run, each in its own run folder (tensorboard --logdir OUT/runs), "
                   "one W&B run per grid run, grouped (pip install 'cusa[wandb]'), or both: tensorboard,wandb.")
@click.option("--wandb-project", default=None, help="W&B project [default: WANDB_PROJECT, else cusa].")
@click.option("--wandb-name", default=None,
              help="W&B group of the grid's runs, each named by its run folder [default: the --out folder's name].")
@click.option("--format", "fmt", default=None, type=click.Choice(FORMAT_CHOICES),
              help="Format of --data, --val-data and --eval-data [default: auto].")
@shard_layout_options()
@data_cache_options
@store_cache_options()
@click.option("--overwrite", is_flag=True,
              help="Retrain runs in --out made with other settings (re-evaluate those evaluated on other data) "
                   "instead of refusing.")
@click.option("--json", "as_json", is_flag=True, help="Print results.json.")
@user_errors
def ablate_main(data, eval_data, eval_split, cache, student, grid, seeds, out, val_data, preset, epochs, batch_size,
                lr, device, workers, split, val_split, image_cache, text_cache, config_file, overrides, sampler,
                report_to, wandb_project, wandb_name, fmt, image_key, caption_key, id_field, store_cache,
                store_cache_gib, overwrite, as_json):
    """Train every grid setting × seed from one teacher cache (resumable) and report mean ± std and gains.

    A re-run into the same --out reuses only runs made with the same settings and evaluation data; others are
    refused naming the setting, or retrained with --overwrite."""
    from train.ablate import run_grid

    flags = {"val_data": val_data, "epochs": epochs, "batch_size": batch_size, "lr": lr, "device": device,
             "workers": workers, "split": split, "val_split": val_split, "image_cache": image_cache,
             "text_cache": text_cache, "sampler": sampler, "report_to": report_to,
             "wandb_project": wandb_project, "wandb_group": wandb_name or Path(out).resolve().name, "format": fmt,
             "image_key": image_key, "caption_key": caption_key, "id_field": id_field, "store_cache": store_cache,
             "store_cache_gib": store_cache_gib}
    payload = run_grid(data=data, eval_data=eval_data, cache=cache, student=student, grid=list(grid), seeds=seeds,
                       out=out, preset=preset, config_file=config_file, flags=flags, overrides=list(overrides),
                       eval_split=eval_split, show=not as_json, overwrite=overwrite)
    from train.ablate import results_markdown

    human = results_markdown(payload) + "\n" + "plots: " + ", ".join(payload["plots"])
    emit(payload, as_json, human)
