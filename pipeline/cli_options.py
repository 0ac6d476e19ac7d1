"""Command-line options that say how a dataset source is read, shared by every command that reads one
(`cusa-cache build|report`, `cusa-train`, `cusa-eval`, `cusa-ablate`)."""

from __future__ import annotations

import os

import click

from pipeline.manifest import FORMATS
from pipeline.manifest_index import MANIFEST_CACHE_ENV
from pipeline.shard_cache import SHARD_CACHE_ENV, SHARD_CACHE_GIB_ENV

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


def manifest_cache_option(fn):
    """``--manifest-cache DIR``: where the manifest index of the data this command reads is kept (also from
    ``$CUSA_MANIFEST_CACHE``). It applies to everything the command starts (torchrun ranks, DataLoader workers,
    the feature builds of a frozen student), so it travels as that environment variable."""

    def remember(ctx, param, value):
        if value:
            os.environ[MANIFEST_CACHE_ENV] = str(value)
        return value

    return click.option("--manifest-cache", type=click.Path(file_okay=False), default=None, expose_value=False,
                        callback=remember, is_eager=True, envvar=MANIFEST_CACHE_ENV,
                        help="Where the manifest index of the data is kept, so that later commands open it in "
                             "seconds [default: $CUSA_CACHE_DIR/manifests, else ~/.cache/cusa/manifests].")(fn)


def shard_cache_options(fn):
    """``--shard-cache DIR`` and ``--shard-cache-gib N``: where shards read from URLs, ``pipe:`` commands or compressed
    files are kept whole, and how much that folder may hold (also ``$CUSA_SHARD_CACHE``, ``$CUSA_SHARD_CACHE_GIB``).
    Like ``--manifest-cache``, they apply to everything the command starts (DataLoader workers, torchrun ranks,
    scanning processes), so they travel as those environment variables."""

    def remember(name: str):
        def callback(ctx, param, value):
            if value is not None and value != "":
                os.environ[name] = str(value)
            return value
        return callback

    fn = click.option("--shard-cache-gib", type=click.FloatRange(min=0, min_open=True), default=None, metavar="N",
                      expose_value=False, callback=remember(SHARD_CACHE_GIB_ENV), is_eager=True,
                      envvar=SHARD_CACHE_GIB_ENV,
                      help="The most GiB the shard cache holds; the least recently used shards go first "
                           "[default: 10].")(fn)
    fn = click.option("--shard-cache", type=click.Path(file_okay=False), default=None, metavar="DIR",
                      expose_value=False, callback=remember(SHARD_CACHE_ENV), is_eager=True, envvar=SHARD_CACHE_ENV,
                      help="Folder for whole copies of shards read from URLs (s3://, gs://, https://, hf://), pipe: "
                           "commands or compressed files [default: $CUSA_CACHE_DIR/shards, else "
                           "~/.cache/cusa/shards].")(fn)
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
