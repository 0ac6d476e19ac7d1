"""`cusa-search`: top-K images for text queries (or captions for a query image) in a collection, by a trained run."""

from __future__ import annotations

import os
import shutil

import click

from pipeline.cli_options import data_cache_options
from pipeline.console import emit, user_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run", metavar="RUN", type=click.Path())
@click.option("--collection", required=True, metavar="ANNOTATIONS_OR_SHARDS_OR_IMAGE_DIR",
              help="An annotation file or webdataset shards (their images and captions), or a folder of images "
                   "(searched recursively).")
@click.option("--query", "queries", multiple=True, metavar="TEXT", help="A text query (repeatable).")
@click.option("--query-file", default=None, type=click.Path(dir_okay=False),
              help="UTF-8 text file, one query a line (blank lines skipped).")
@click.option("--image", "images", multiple=True, type=click.Path(dir_okay=False), metavar="PATH",
              help="A query image (repeatable): returns captions of an annotation collection, images of a folder.")
@click.option("-k", "k", default=10, show_default=True, type=click.IntRange(min=1), help="Results per query.")
@click.option("--compare", "compare", default=None, type=click.Path(), metavar="RUN_B",
              help="A second run: both runs' results side by side.")
@click.option("--split", default="all", show_default=True, help="Split of an annotation collection (all: every image).")
@click.option("--format", "fmt", default="auto", show_default=True,
              type=click.Choice(["auto", "karpathy", "caption-json", "csv"]),
              help="Format of an annotation collection (auto also detects webdataset shards).")
@click.option("--image-root", default=None, type=click.Path(file_okay=False),
              help="Folder the collection's image paths are relative to [default: the annotation file's folder].")
@click.option("--index", "factory", default="Flat", show_default=True,
              help="FAISS index_factory string for the collection, e.g. Flat, IVF1024,Flat, HNSW32.")
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False),
              help="Where collection embeddings are cached [default: search-cache/ in the run folder].")
@data_cache_options
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
              help="Where the student runs (auto: cuda when present).")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(min=1),
              help="Images or queries per forward pass.")
@click.option("--workers", default=0, show_default=True, type=click.IntRange(min=0),
              help="Image decoding processes while embedding the collection.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@user_errors
def search_main(run, collection, queries, query_file, images, k, compare, split, fmt, image_root, factory, cache_dir,
                device, batch_size, workers, as_json):
    """Search COLLECTION with the student of RUN (a run folder or checkpoint). The collection's embeddings are
    computed once and cached next to the run; later searches reuse them."""
    from train.model import load_model
    from train.search import collection_index, read_collection, read_query_file, search_image, search_texts

    kinds = [bool(queries), query_file is not None, bool(images)]
    if sum(kinds) != 1:
        raise click.UsageError("give one kind of query: --query TEXT, --query-file FILE or --image PATH")
    if compare is not None and os.path.abspath(compare) == os.path.abspath(run):
        raise click.UsageError("--compare names the same run as RUN")
    lines: list[int | None]
    if query_file is not None:
        numbered = read_query_file(query_file)
        lines, texts = [n for n, _ in numbered], [q for _, q in numbered]
    else:
        texts = list(queries)
        lines = [None] * (len(texts) or len(images))
    for p in images:
        if not os.path.isfile(p):
            raise click.ClickException(f"{p}: query image not found")

    col = read_collection(collection, split=split, fmt=fmt, image_root=image_root)
    runs = [run] + ([compare] if compare is not None else [])
    per_run, cached, cache_folders = {}, {}, {}
    for name in runs:
        model = load_model(name, device=device, batch_size=batch_size, workers=workers)
        ci = collection_index(model, col, factory=factory, progress=not as_json, cache_root=cache_dir)
        described = ci.collection.describe()  # a folder's unreadable files are left out and listed
        cache_folders[name] = str(ci.folder)
        cached[name] = ci.cached
        per_run[name] = (search_texts(ci, model, texts, k, progress=not as_json) if texts
                         else search_image(ci, model, list(images), k))
    searched = "images" if texts or col.kind == "image-folder" else "captions"
    entries = []
    for i, query in enumerate(texts or list(images)):
        entry: dict = {"query": query}
        if lines[i] is not None:
            entry["line"] = lines[i]
        if compare is None:
            entry["results"] = per_run[run][i]
        else:
            entry["runs"] = {name: per_run[name][i] for name in runs}
        entries.append(entry)
    payload = {"collection_cached": all(cached.values()), "collection_cached_by_run": cached,
               "collection": described, "cache": cache_folders, "query_kind": "text" if texts else "image",
               "searched": searched, "k": k, "queries": entries}
    emit(payload, as_json, human_results(payload, runs))


def human_results(payload: dict, runs: list[str]) -> str:
    """A readable table per query; two runs side by side under ``--compare``."""
    from train.search import run_labels

    col = payload["collection"]
    width = max(80, min(shutil.get_terminal_size((120, 20)).columns, 200))
    lines = [f"collection {col['source']}: {col['images']} images, {col['captions']} captions "
             f"({'embeddings reused' if payload['collection_cached'] else 'embedded now and cached'}); "
             f"top {payload['k']} {payload['searched']}"]
    if col["skipped"]:
        first = col["skipped"][0]
        lines.append(f"skipped {len(col['skipped'])} unreadable image(s), e.g. {first['reason']}")
    captions = payload["searched"] == "captions"
    for entry in payload["queries"]:
        lines += ["", f"query: {entry['query']}"]
        if "results" in entry:
            lines.append(" rank  score  " + ("image: caption" if captions else "image_id  path"))
            for r in entry["results"]:
                what = f"{r['image_id']}: {r['caption']}" if captions else f"{r['image_id']}  {r['path']}"
                lines.append(f"{r['rank']:>5}  {r['score']:.3f}  {what}")
            continue
        columns = entry["runs"]
        cell = (width - 8) // len(columns) - 3
        header = ("    # | " + " | ".join(_fit(name, cell) for name in run_labels(list(columns)))).rstrip()
        lines += [header, "-" * len(header)]
        for i in range(max(len(r) for r in columns.values())):
            cells = []
            for results in columns.values():
                r = results[i] if i < len(results) else None
                what = "" if r is None else f"{r['score']:.3f} {r['image_id']}" + (f": {r['caption']}" if captions
                                                                                   else "")
                cells.append(_fit(what, cell))
            lines.append((f"{i + 1:>5} | " + " | ".join(cells)).rstrip())
    return "\n".join(lines)


def _fit(text: str, width: int) -> str:
    return (text[:width - 1] + "…") if len(text) > width else text.ljust(width)
