"""Command-line options that say how a dataset source is read, shared by every command that reads one
(`cusa-cache build|report|upgrade|import-clip-retrieval`, `cusa-train`, `cusa-eval`, `cusa-ablate`, `cusa-search`)."""

from __future__ import annotations

import os

import click

from pipeline.source_names import FORMATS, MANIFEST_CACHE_ENV, SHARD_CACHE_ENV, SHARD_CACHE_GIB_ENV

FORMAT_CHOICES = ("auto", *FORMATS)


def shard_layout_options(defaults_from_run: bool = False):
    """``--image-key``, ``--caption-key`` and ``--id-field``: which members of a webdataset sample hold its image, its
    captions and its image id. With ``defaults_from_run`` (cusa-eval) an option left out takes the run's value."""
    run_note = " [default: the run's setting]" if defaults_from_run else ""

    def decorate(fn):
        fn = click.option("--id-field", default=None,
                          help="Webdataset shards: field of the sample's json member holding the image id; samples "
                               "with the same id are one image [default: the sample key]." + run_note)(fn)
        fn = click.option("--caption-key", default=None,
                          help="Webdataset shards: member with the captions, one per non-empty line, or json:FIELD "
                               "for a list of strings in the json member [default: txt]." + run_note)(fn)
        fn = click.option("--image-key", default=None,
                          help="Webdataset shards: image member extension(s), ';'-separated, the first present wins "
                               "[default: jpg;jpeg;png;webp]." + run_note)(fn)
        return fn

    return decorate


def _environment_option(flag: str, env: str, **kwargs):
    """An option whose value is set as the environment variable ``env`` (and read from it when left out) as soon as
    it is parsed, instead of being passed to the command: everything the command starts (torchrun ranks, DataLoader
    workers, scanning processes, the feature builds of a frozen student) then sees it."""

    def remember(ctx, param, value):
        if value is not None and value != "":
            os.environ[env] = str(value)
        return value

    return click.option(flag, default=None, expose_value=False, callback=remember, is_eager=True, envvar=env,
                        **kwargs)


def data_cache_options(fn):
    """``--manifest-cache DIR``: where the manifest index of the data this command reads is kept; ``--shard-cache
    DIR`` and ``--shard-cache-gib N``: where shards read from URLs, ``pipe:`` commands or compressed files are kept
    whole, and how much that folder may hold. Each travels as its environment variable (``$CUSA_MANIFEST_CACHE``,
    ``$CUSA_SHARD_CACHE``, ``$CUSA_SHARD_CACHE_GIB``), which also gives its default."""
    fn = _environment_option("--shard-cache-gib", SHARD_CACHE_GIB_ENV, metavar="N",
                             type=click.FloatRange(min=0, min_open=True),
                             help="The most GiB the shard cache holds; the least recently used shards go first "
                                  "[default: 10].")(fn)
    fn = _environment_option("--shard-cache", SHARD_CACHE_ENV, metavar="DIR", type=click.Path(file_okay=False),
                             help="Folder for whole copies of shards read from URLs (s3://, gs://, https://, hf://), "
                                  "pipe: commands or compressed files [default: $CUSA_CACHE_DIR/shards, else "
                                  "~/.cache/cusa/shards].")(fn)
    fn = _environment_option("--manifest-cache", MANIFEST_CACHE_ENV, type=click.Path(file_okay=False),
                             help="Where the manifest index of the data is kept, so that later commands open it in "
                                  "seconds [default: $CUSA_CACHE_DIR/manifests, else ~/.cache/cusa/manifests].")(fn)
    return fn


def store_cache_options(defaults_from_run: bool = False):
    """``--store-cache`` and ``--store-cache-gib``: where the files of stores read from URLs (``--cache s3://...``)
    are kept, and how much that folder may hold. With ``defaults_from_run`` (cusa-eval) they default to the run's."""
    run_note = " [default: the run's setting]" if defaults_from_run else ""

    def decorate(fn):
        fn = click.option("--store-cache-gib", default=None, type=click.FloatRange(min=0, min_open=True),
                          metavar="N", help="The most GiB the store cache folder holds; the least recently used "
                                            "files go first [default: 10]." + run_note)(fn)
        fn = click.option("--store-cache", default=None, type=click.Path(file_okay=False), metavar="DIR",
                          help="Folder for the files of stores read from URLs [default: $CUSA_CACHE_DIR/stores, "
                               "else ~/.cache/cusa/stores]." + run_note)(fn)
        return fn

    return decorate


def csv_column_options(fn):
    """``--image-column``, ``--caption-column`` and ``--id-column``: which columns of a CSV/TSV annotation file hold
    the image path, the caption and (optionally) the image id."""
    fn = click.option("--id-column", default=None, help="CSV/TSV: image id column [default: the image path].")(fn)
    fn = click.option("--caption-column", default="caption", show_default=True, help="CSV/TSV: caption column.")(fn)
    fn = click.option("--image-column", default="image", show_default=True, help="CSV/TSV: image path column.")(fn)
    return fn
