"""`cusa-cache`: build, inspect, query and verify teacher caches, push them to a URL and pull them back; write the
built-in demo set."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click
import numpy as np

from pipeline.cli_options import (FORMAT_CHOICES, csv_column_options, data_cache_options,
                                  shard_layout_options)
from pipeline.console import emit, human_bytes, user_errors
from pipeline.errors import CusaError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Teacher caches for CUSA: every image and caption embedded once by its uni-modal teacher."""


@main.command()
@click.argument("annotations", type=click.Path())
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Store folder to create or resume.")
@click.option("--format", "fmt", default="auto", show_default=True, type=click.Choice(FORMAT_CHOICES),
              help="auto detects webdataset shards from a .tar, a brace pattern, '::'-joined patterns or a list file.")
@click.option("--image-root", type=click.Path(file_okay=False), help="Folder image paths are relative to "
              "[default: the annotation file's folder].")
@click.option("--split", default="all", show_default=True, help="all, train, val, test (or any split label).")
@click.option("--text-teacher", default=None, help="Encoder spec [default: minilm-l6].")
@click.option("--image-teacher", default=None, help="Encoder spec [default: efficientnet-lite0].")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1),
              help="Images or captions per teacher forward pass.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=0),
              help="Image decoding processes (overlapped with the teacher's forward pass).")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
              help="Where the teachers run (auto: cuda when present).")
@click.option("--neighbors", "k", default=32, show_default=True, type=click.IntRange(min=0),
              help="Teacher neighbors kept per row (self excluded); 0 skips the table.")
@click.option("--index", "factory", default="Flat", show_default=True,
              help="FAISS index_factory string, e.g. Flat, IVF1024,Flat, HNSW32.")
@click.option("--on-bad-image", default="fail", show_default=True, type=click.Choice(["fail", "skip"]),
              help="An unreadable image or shard sample: stop naming it, or leave it out and list it in the store.")
@click.option("--overwrite", is_flag=True, help="Replace a store built from another manifest or teacher.")
@click.option("--chunk-rows", default=2048, show_default=True, type=click.IntRange(min=1),
              help="Rows per stored chunk (the unit of resumption).")
@csv_column_options
@shard_layout_options()
@data_cache_options
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@user_errors
def build(annotations, out, fmt, image_root, split, text_teacher, image_teacher, batch_size, workers, device, k,
          factory, on_bad_image, overwrite, chunk_rows, image_column, caption_column, id_column, image_key,
          caption_key, id_field, as_json):
    """Embed every image and caption of ANNOTATIONS (an annotation file, or webdataset shards:
    'data/train-{000000..000127}.tar', '::'-joined patterns, a .tar or a list file) with the teachers into the
    store --out."""
    from pipeline.build import BuildConfig, build_store
    from pipeline.teachers.registry import DEFAULT_IMAGE_TEACHER, DEFAULT_TEXT_TEACHER

    cfg = BuildConfig(
        annotations=annotations, out=out, format=fmt, image_root=image_root, split=split,
        text_teacher=text_teacher or DEFAULT_TEXT_TEACHER, image_teacher=image_teacher or DEFAULT_IMAGE_TEACHER,
        batch_size=batch_size, workers=workers, device=device, neighbors=k, index=factory,
        on_bad_image=on_bad_image, overwrite=overwrite, chunk_rows=chunk_rows, progress=not as_json,
        csv_image_column=image_column, csv_caption_column=caption_column, csv_id_column=id_column,
        image_key=image_key, caption_key=caption_key or "txt", id_field=id_field,
    )
    summary = build_store(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    d = summary.to_dict()
    emit(d, as_json, "\n".join(_build_lines(d)))


def _build_lines(d: dict) -> list[str]:
    """The human summary of a build (or an import): store, rows per modality, neighbors, caption notes, skips."""
    lines = [f"store     {d['store']}  ({'complete' if d['complete'] else 'INCOMPLETE'}, "
             f"{human_bytes(d['size_bytes'])} on disk, {d['seconds']:.1f} s)"]
    for modality in ("images", "texts"):
        st = d[modality]
        done = f"; {st['skipped_chunks']} chunks were already done" if st.get("skipped_chunks") else ""
        lines.append(f"{modality:<9} {d['counts'][modality]} × {d['dims'][modality]}: {st.get('rows', 0)} embedded "
                     f"now in {st.get('seconds', 0):.1f} s ({st.get('rows_per_s', 0):.1f} rows/s){done}")
    for modality, info in d["neighbors"].items():
        lines.append(f"neighbors {modality}: K={info.get('k')} with {info.get('factory')}")
    notes = d.get("caption_notes") or {}
    if notes.get("truncated"):
        lines.append(f"captions  {notes['truncated']} longer than the text teacher's {notes['max_tokens']} tokens "
                     f"(it reads only their start; rows {notes['truncated_rows'][:5]}...)")
    if notes.get("cleaned"):
        lines.append(f"captions  {notes['cleaned']} had control characters or invalid code points replaced "
                     f"(rows {notes['cleaned_rows'][:5]}...)")
    if d["skipped_images"]:
        lines.append(f"skipped   {len(d['skipped_images'])} bad images (listed in the store's attributes):")
        lines.extend(f"          {s['reason']}" for s in d["skipped_images"][:20])  # names the file and its row
    if d.get("skipped_samples"):
        lines.append(f"skipped   {len(d['skipped_samples'])} bad shard samples, left out of the rows (listed in the "
                     "store's attributes):")
        lines.extend(f"          {s['shard']}: {s['key']!r}: {s['reason']}" for s in d["skipped_samples"][:20])
    return lines


@main.command()
@click.argument("store_path", metavar="STORE", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the store's description as JSON.")
@user_errors
def info(store_path, as_json):
    """Counts, dims, teachers, fingerprint, completeness and size of a store (a folder or a URL)."""
    from teacher_cache.remote_store import open_store
    from teacher_cache.store import MODALITIES

    store = open_store(store_path)
    prog = store.progress()
    attrs = store.attrs
    d = {
        "store": store.location,
        "complete": store.complete,
        "format_version": attrs["format_version"],
        "counts": store.counts,
        "dims": store.dims,
        "teachers": store.teachers,
        "fingerprint": store.fingerprint,
        "fingerprint_format": store.fingerprint_format,
        "split_fingerprints": store.split_fingerprints,
        "splits": {s: int(n) for s, n in zip(*np.unique(store.image_splits, return_counts=True))},
        "chunk_rows": store.chunk_rows,
        "chunks_done": {m: len(prog.done[m]) for m in MODALITIES},
        "chunks_total": {m: store.n_chunks(m) for m in MODALITIES},
        "neighbors": attrs.get("neighbors") or {m: store.neighbors_marker(m) for m in MODALITIES},
        "skipped_images": store.skipped_images,
        "skipped_samples": store.skipped_samples,
        "size_bytes": store.size_bytes(),
        "created": attrs.get("created"),
        "completed": attrs.get("completed"),
        "source": attrs.get("source"),
    }
    lines = [f"store          {d['store']}",
             f"status         {'complete' if d['complete'] else 'INCOMPLETE (re-run the build command to resume)'}",
             f"images         {d['counts']['images']} × {d['dims']['images']}  "
             f"(chunks {d['chunks_done']['images']}/{d['chunks_total']['images']})",
             f"captions       {d['counts']['texts']} × {d['dims']['texts']}  "
             f"(chunks {d['chunks_done']['texts']}/{d['chunks_total']['texts']})",
             "splits         " + ", ".join(f"{k or '-'}: {v}" for k, v in d["splits"].items()),
             f"image teacher  {d['teachers']['image'].get('spec')}  ({d['teachers']['image'].get('weights')})",
             f"text teacher   {d['teachers']['text'].get('spec')}  ({d['teachers']['text'].get('weights')})",
             f"fingerprint    {d['fingerprint']}" + ("" if d["fingerprint_format"] >= 2 else
                                                       "  (earlier format: `cusa-cache upgrade` rewrites it)")]
    for m, n in (d["neighbors"] or {}).items():
        if n:
            lines.append(f"neighbors      {m}: K={n.get('k')} {n.get('factory')}")
    lines.append(f"size           {human_bytes(d['size_bytes'])}")
    if d["skipped_images"]:
        lines.append(f"skipped        {len(d['skipped_images'])} bad images")
    if d["skipped_samples"]:
        lines.append(f"skipped        {len(d['skipped_samples'])} bad shard samples (no rows)")
    emit(d, as_json, "\n".join(lines))


@main.command()
@click.argument("store_path", metavar="STORE", type=click.Path(file_okay=False))
@click.option("--image", "image", default=None, help="Image row number or image id.")
@click.option("--caption", "caption", default=None, type=int, help="Caption row number.")
@click.option("--query", "query", default=None, help="Free text, embedded with the store's text teacher.")
@click.option("-k", "k", default=10, show_default=True, type=click.IntRange(min=1), help="Neighbors to show.")
@click.option("--json", "as_json", is_flag=True, help="Print the neighbors as JSON.")
@user_errors
def neighbors(store_path, image, caption, query, k, as_json):
    """Nearest images or captions of one row (or a text query) by the teacher."""
    from teacher_cache.neighbors import load_index, search
    from teacher_cache.remote_store import open_store

    chosen = [x is not None for x in (image, caption, query)]
    if sum(chosen) != 1:
        raise click.UsageError("give exactly one of --image, --caption, --query")
    store = open_store(store_path, require_complete=True)
    store_path = store.location  # a URL without its secrets
    if image is not None:
        modality = "images"
        row = _image_row(store, image)
        skipped = {int(s["row"]): s for s in store.skipped_images}
        if row in skipped:
            raise CusaError(f"{store_path}: image row {row} ({skipped[row]['path']}) was skipped by the build, "
                            f"it has no embedding: {skipped[row]['reason']}")
        ids, sims = _row_neighbors(store, modality, row, k)
        query_d = {"image_row": row, "image_id": store.image_ids[row], "path": store.image_paths[row]}
    elif caption is not None:
        modality = "texts"
        if not 0 <= caption < store.counts["texts"]:
            raise CusaError(f"{store_path}: caption row {caption} is out of range [0, {store.counts['texts']})")
        row = caption
        ids, sims = _row_neighbors(store, modality, row, k)
        query_d = {"caption_row": row, "caption": store.captions[row]}
    else:
        from pipeline.teachers.registry import build_encoder

        modality = "texts"
        encoder = build_encoder(store.teachers["text"]["spec"], "text")
        q = encoder.encode([query]).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        if store.index_path("texts").is_file():
            found, scores = search(load_index(store.index_path("texts")), q, k)
            ids, sims = found[0], scores[0]
        else:
            scores = store.load("texts") @ q[0]
            ids = np.argsort(-scores)[:k]
            sims = scores[ids]
        query_d = {"query": query}
    results = []
    for rank, (nid, sim) in enumerate(zip(ids.tolist(), sims.tolist()), start=1):
        if nid < 0:
            continue
        if modality == "images":
            first = np.flatnonzero(store.caption_image_rows == nid)
            results.append({"rank": rank, "image_row": nid, "image_id": store.image_ids[nid],
                            "path": store.image_paths[nid], "similarity": round(float(sim), 4),
                            "caption": store.captions[first[0]] if len(first) else ""})
        else:
            img = int(store.caption_image_rows[nid])
            results.append({"rank": rank, "caption_row": nid, "caption": store.captions[nid],
                            "image_row": img, "image_id": store.image_ids[img],
                            "similarity": round(float(sim), 4)})
    head = " ".join(f"{k_}={v}" for k_, v in query_d.items())
    lines = [f"nearest {modality} to {head}"]
    for r in results:
        if modality == "images":
            lines.append(f"{r['rank']:>3}. {r['similarity']:.3f}  row {r['image_row']}  {r['path']}  — {r['caption']}")
        else:
            lines.append(f"{r['rank']:>3}. {r['similarity']:.3f}  row {r['caption_row']}  {r['caption']}  "
                         f"(image {r['image_id']})")
    emit({"modality": modality, **query_d, "neighbors": results}, as_json, "\n".join(lines))


def _image_row(store, image: str) -> int:
    ids = store.image_ids
    matches = np.flatnonzero(ids == image)
    if len(matches):
        return int(matches[0])
    try:
        row = int(image)
    except ValueError:
        raise CusaError(f"{store.path}: no image with id {image!r}") from None
    if not 0 <= row < store.counts["images"]:
        raise CusaError(f"{store.path}: image row {row} is out of range [0, {store.counts['images']})")
    return row


def _row_neighbors(store, modality: str, row: int, k: int):
    if store.has_neighbors(modality):
        ids, sims = store.neighbors(modality)
        if k <= ids.shape[1]:
            return ids[row, :k], sims[row, :k]
    # more than the table keeps (or no table): exact search over the stored rows, skipped (all-zero) rows left out
    emb = store.load(modality)
    scores = emb @ emb[row]
    scores[row] = -np.inf
    scores[~np.any(emb != 0, axis=1)] = -np.inf
    order = np.argsort(-scores, kind="stable")[:k]
    order = order[np.isfinite(scores[order])]
    return order, scores[order]


@main.command()
@click.argument("store_path", metavar="STORE", type=click.Path(file_okay=False))
@click.option("--data", "annotations", required=True, type=click.Path(),
              help="The annotations (or shards) the store was built from.")
@click.option("--format", "fmt", default="auto", show_default=True, type=click.Choice(FORMAT_CHOICES),
              help="Format of --data (auto detects it).")
@csv_column_options
@shard_layout_options()
@data_cache_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@user_errors
def upgrade(store_path, annotations, fmt, image_column, caption_column, id_column, image_key, caption_key, id_field,
            as_json):
    """Bring a store built by an earlier cusa up to the current fingerprint format, without running a teacher (the
    rows are the same; only how the dataset is fingerprinted changed), and keep the data's manifest index in it."""
    from pipeline.manifest import read_manifest
    from pipeline.shards import ShardLayout
    from pipeline.store_upgrade import upgrade_store

    source = read_manifest(annotations, format=fmt, image_column=image_column, caption_column=caption_column,
                           id_column=id_column, shard_layout=ShardLayout(image_key, caption_key or "txt", id_field),
                           progress=True)
    result = upgrade_store(store_path, source)
    human = (f"{store_path}: fingerprints rewritten in format {result['fingerprint_format']} (built from "
             f"{annotations}, split {result['split']})" if result["upgraded"] else
             f"{store_path}: already in fingerprint format {result['fingerprint_format']}; nothing to do")
    emit(result, as_json, human)


@main.command()
@click.argument("store_path", metavar="STORE", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the verification report as JSON.")
@user_errors
def verify(store_path, as_json):
    """Re-check chunk checksums, completeness, row norms and NaN/Inf of a store (a folder or a URL: every chunk is
    downloaded); exit 1 if anything is wrong."""
    from teacher_cache.remote_store import open_store
    from teacher_cache.verify import verify_store

    report = verify_store(open_store(store_path))
    d = report.to_dict()
    if as_json:
        click.echo(json.dumps(d, indent=2))
    else:
        checked = ", ".join(f"{m} {n} chunks" for m, n in d["chunks_checked"].items())
        click.echo(f"{d['store']}: {'OK' if report.ok else 'PROBLEMS FOUND'} (checked {checked})")
        for p in d["problems"]:
            click.echo(f"  - {p}")
    if not report.ok:
        sys.exit(1)


@main.command()
@click.argument("store_path", metavar="STORE", type=click.Path(file_okay=False, exists=True))
@click.argument("url", metavar="URL")
@click.option("--overwrite", is_flag=True, help="Replace another store at URL (never files that are not a store).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@user_errors
def push(store_path, url, overwrite, as_json):
    """Upload the complete store STORE to URL (s3://, gs://, hf:// or a folder), each chunk verified first; its
    completion mark goes up last, so an interrupted push leaves a store every reader refuses as incomplete.
    Credentials come from the environment (AWS_*, ~/.aws, Google credentials, HF_TOKEN), never from a flag."""
    from pipeline.faults import FaultInjector
    from teacher_cache.remote_store import push_store

    faults = FaultInjector.from_env()
    summary = push_store(store_path, url, overwrite=overwrite, progress=not as_json,
                         after_file=lambda rel: faults.at("push_file", rel)).to_dict()
    emit(summary, as_json, f"pushed    {summary['store']} to {summary['url']}: {summary['files']} files, "
                           f"{human_bytes(summary['bytes'])} in {summary['seconds']:.1f} s "
                           f"({summary['mib_per_s']:.1f} MiB/s)")


@main.command()
@click.argument("url", metavar="URL")
@click.argument("out", metavar="DIR", type=click.Path(file_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace a store already in DIR (never files that are not a store).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@user_errors
def pull(url, out, overwrite, as_json):
    """Copy the complete store at URL into the folder DIR: every file checked against the size its build recorded,
    every chunk against its checksum, the completion mark written last."""
    from teacher_cache.remote_store import pull_store

    summary = pull_store(url, out, overwrite=overwrite, progress=not as_json).to_dict()
    emit(summary, as_json, f"pulled    {summary['url']} into {summary['store']}: {summary['files']} files, "
                           f"{human_bytes(summary['bytes'])} in {summary['seconds']:.1f} s "
                           f"({summary['mib_per_s']:.1f} MiB/s)")


@main.command()
@click.argument("store_path", metavar="STORE", type=click.Path(file_okay=False))
@click.option("--data", "annotations", required=True, type=click.Path(),
              help="The annotations (or shards) the store was built from (or one of their splits, with --split).")
@click.option("--out", "out", default=None, type=click.Path(file_okay=False),
              help="Report folder [default: STORE-report next to the store, STORE-report-SPLIT for one split].")
@click.option("--format", "fmt", default="auto", show_default=True, type=click.Choice(FORMAT_CHOICES),
              help="Format of --data (auto detects it).")
@click.option("--image-root", type=click.Path(file_okay=False), help="Folder image paths are relative to.")
@click.option("--split", default="all", show_default=True, help="Report on this split of --data only.")
@click.option("--examples", default=4, show_default=True, type=click.IntRange(min=0),
              help="Example queries shown per modality.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random-pair baselines.")
@shard_layout_options()
@data_cache_options
@click.option("--json", "as_json", is_flag=True, help="Print report.json.")
@user_errors
def report(store_path, annotations, out, fmt, image_root, split, examples, seed, image_key, caption_key, id_field,
           as_json):
    """Is the teacher worth using? Its neighbors checked against the captions, with plots and examples."""
    from pipeline.report import build_report, format_summary
    from pipeline.shards import ShardLayout

    result = build_report(store_path, annotations, out, fmt=fmt, image_root=image_root, split=split,
                          examples=examples, seed=seed,
                          shard_layout=ShardLayout(image_key, caption_key or "txt", id_field))
    emit(result, as_json, format_summary(result))


@main.command("demo-data")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--images", "n_images", default=800, show_default=True, type=click.IntRange(min=10),
              help="Images in the set, 5 captions each.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the scenes and their captions.")
@click.option("--splits", default="0.5,0.15,0.35", show_default=True, help="train,val,test fractions.")
@click.option("--shards", is_flag=True, help="Also write the set as webdataset shards: OUT/shards/SPLIT-NNNNNN.tar "
              "(KEY.png, KEY.txt with the 5 captions, KEY.json with image_id).")
@click.option("--clip-benchmark", is_flag=True, help="Also write the test split in CLIP_benchmark's webdataset "
              "retrieval layout: OUT/clip_benchmark/{dataset_type.txt,test/nshards.txt,test/N.tar}.")
@click.option("--samples-per-shard", default=100, show_default=True, type=click.IntRange(min=1),
              help="Samples a shard holds with --shards.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@user_errors
def demo_data(out, n_images, seed, splits, shards, clip_benchmark, samples_per_shard, as_json):
    """Write the built-in demo set: rendered shape scenes with 5 captions each, train/val/test caption JSON
    (and with --shards the same set as webdataset shards, with --clip-benchmark its test split for CLIP_benchmark)."""
    from pipeline.demo_data import write_demo_dataset

    try:
        fractions = tuple(float(x) for x in splits.split(","))
    except ValueError:
        raise click.BadParameter(f"expected three numbers like 0.5,0.15,0.35, got {splits!r}",
                                 param_hint="--splits") from None
    summary = write_demo_dataset(Path(out), n_images=n_images, seed=seed, split_fractions=fractions, shards=shards,
                                 samples_per_shard=samples_per_shard, clip_benchmark=clip_benchmark)
    counts = summary["counts"]
    lines = [f"demo set  {summary['root']}  ({counts['images']} images, {counts['captions']} captions; "
             + ", ".join(f"{split} {n}" for split, n in counts.items() if split not in ("images", "captions")) + ")",
             f"images    {summary['images_dir']}"]
    lines += [f"{split:<9} {path}" for split, path in summary["files"].items()]
    lines += [f"{split:<9} {pattern}  (shards)" for split, pattern in summary.get("shards", {}).items()]
    if "clip_benchmark" in summary:
        lines.append(f"test      {summary['clip_benchmark']['root']}  (CLIP_benchmark: --dataset wds/demo "
                     f"--dataset_root {summary['clip_benchmark']['root']})")
    emit(summary, as_json, "\n".join(lines))


@main.command("import-clip-retrieval")
@click.argument("folder", metavar="DIR", type=click.Path(file_okay=False))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Store folder to create or resume.")
@click.option("--annotations", default=None, type=click.Path(dir_okay=False),
              help="Caption-list annotation file to write from the metadata [default: OUT.annotations.json].")
@click.option("--id-column", default=None, help="Metadata column naming each sample's image [default: image_path].")
@click.option("--split-column", default=None, help="Metadata column holding each sample's split label.")
@click.option("--split", "split_label", default="", help="Split label of every sample when there is no split column.")
@click.option("--model", default=None, help="The CLIP model that computed the embeddings (recorded with the teachers).")
@click.option("--neighbors", "k", default=32, show_default=True, type=click.IntRange(min=0),
              help="Teacher neighbors kept per row (self excluded); 0 skips the table.")
@click.option("--index", "factory", default="Flat", show_default=True,
              help="FAISS index_factory string, e.g. Flat, IVF1024,Flat, HNSW32.")
@click.option("--chunk-rows", default=2048, show_default=True, type=click.IntRange(min=1),
              help="Rows per stored chunk (the unit of resumption and of streamed reads).")
@click.option("--overwrite", is_flag=True, help="Replace a store built from other data or embeddings.")
@data_cache_options
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@user_errors
def import_clip_retrieval_cmd(folder, out, annotations, id_column, split_column, split_label, model, k, factory,
                              chunk_rows, overwrite, as_json):
    """Make a store from clip-retrieval inference output (img_emb/, text_emb/, metadata/ in DIR) without running a
    teacher: writes the annotation file from the metadata, then the store and its neighbor tables."""
    from pipeline.clip_retrieval import ClipRetrievalImport, import_clip_retrieval

    summary, written = import_clip_retrieval(ClipRetrievalImport(
        folder=folder, out=out, annotations=annotations, id_column=id_column, split_column=split_column,
        split=split_label, model=model, neighbors=k, index=factory, chunk_rows=chunk_rows, overwrite=overwrite,
        progress=not as_json))
    if int(os.environ.get("RANK", "0")) != 0:
        return
    d = {**summary.to_dict(), "annotations": str(written)}
    lines = _build_lines(d) + [f"data      {written} (train with --data {written} --cache {d['store']})"]
    emit(d, as_json, "\n".join(lines))


@main.command("import-features")
@click.argument("source", metavar="FILE", type=click.Path(dir_okay=False))
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False),
              help="The .npz to write: arrays features [N, D] float32 and ids [N].")
@click.option("--ids", "ids_path", default=None, type=click.Path(dir_okay=False),
              help="Image ids of a plain [N, D] .npy FILE, one per line or a JSON list [default: FILE.ids.txt].")
@click.option("--trust-pickle", is_flag=True,
              help="Unpickle FILE with numpy itself (it may run code the file names): only for a file whose "
                   "author you trust and that holds more than numpy data.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@user_errors
def import_features(source, out, ids_path, trust_pickle, overwrite, as_json):
    """Convert precomputed image features (the CUSA authors' pickled {image_id: vector} .npy, or an [N, D] .npy with
    its ids) once into an .npz that `precomputed:` reads without pickle. A pickle is read by an unpickler that
    rebuilds numpy data only, so the file cannot run code."""
    from pipeline.feature_files import import_features as convert

    summary = convert(Path(source), Path(out), ids_path=Path(ids_path) if ids_path else None,
                      trust_pickle=trust_pickle, overwrite=overwrite, progress=not as_json)
    human = (f"wrote {summary['out']}: {summary['rows']} images × {summary['dim']} dims (float32) from "
             f"{summary['source']} ({summary['source_format']}) in {summary['seconds']:.1f} s\n"
             f"use it as --image-teacher {summary['spec']}")
    emit(summary, as_json, human)


if __name__ == "__main__":
    main()
