"""``cusa-export RUN OUT``: a trained open_clip student as an open_clip folder (train/export.py), optionally with its
test recalls in the model card and pushed to the Hugging Face hub."""

from __future__ import annotations

import click

from pipeline.console import emit, user_errors
from train.export import EXPORT_FORMATS


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run", type=click.Path())
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--format", "fmt", default="open_clip", show_default=True, type=click.Choice(EXPORT_FORMATS))
@click.option("--checkpoint", default="best", show_default=True, metavar="best|last|FILE",
              help="RUN/best.pt, RUN/last.pt or a checkpoint file.")
@click.option("--safetensors-only", is_flag=True, help="Leave out open_clip_pytorch_model.bin.")
@click.option("--test-data", default=None, type=click.Path(),
              help="Evaluate the checkpoint on this data and put its recalls in the model card.")
@click.option("--test-split", default="test", show_default=True)
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
              help="Device for --test-data.")
@click.option("--overwrite", is_flag=True, help="Replace OUT when it already holds files.")
@click.option("--push-to-hub", "repo_id", default=None, metavar="REPO_ID",
              help="Then upload OUT to this Hugging Face model repo (needs HF_HUB_OFFLINE=0 and a token).")
@click.option("--private", is_flag=True, help="--push-to-hub: create the repo private.")
@click.option("--revision", default=None, help="--push-to-hub: branch to commit to [default: main].")
@click.option("--json", "as_json", is_flag=True, help="Print the export's summary as JSON.")
@user_errors
def export_main(run, out, fmt, checkpoint, safetensors_only, test_data, test_split, device, overwrite, repo_id,
                private, revision, as_json):
    """Write RUN's open_clip student into OUT as open_clip's save_for_hf lays it out, with a model card
    (README.md) and CUSA's heads in cusa_heads.safetensors."""
    from train.checkpoint import load_checkpoint
    from train.export import (ExportSource, check_exportable, check_hub_online, export_run, push_folder,
                              resolve_export_checkpoint)

    if repo_id:
        check_hub_online()  # before any work
    test, source = None, None
    if test_data:
        from train.evaluation_run import evaluate_run

        run_dir, path = resolve_export_checkpoint(run, checkpoint)
        source = ExportSource(run_dir, path, load_checkpoint(path))  # read once: checked here, exported below
        check_exportable(source)  # refuse before evaluating
        result = evaluate_run(path, test_data, split=test_split, device=device, progress=not as_json)
        test = {**{k: v for k, v in result.items() if not isinstance(v, (list, dict))}, "data": test_data}
    summary = export_run(run, out, checkpoint=checkpoint, fmt=fmt, safetensors_only=safetensors_only,
                         overwrite=overwrite, test=test, source=source)
    if repo_id:
        summary["hub"] = push_folder(out, repo_id, private=private, revision=revision)
    lines = [f"exported  {summary['checkpoint']} (epoch {summary['epoch']}) → {summary['out']}",
             f"files     {', '.join(summary['files'])}",
             f"load      {summary['load']}"]
    if summary["cross_head"] != "none":
        lines.append("note      stock open_clip loading yields the towers without CUSA's cross heads; "
                     "load_model(OUT) applies them")
    if "hub" in summary:
        lines.append(f"pushed    {summary['hub']['url']}")
    emit(summary, as_json, "\n".join(lines))
