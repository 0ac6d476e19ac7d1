"""The columnar manifest: records on demand from columns, subsets that keep what a row says about itself, strings
kept exactly (lone surrogates included), the earlier fingerprint format computed exactly as before, and split
fingerprints that reuse the blocks they keep whole."""

from __future__ import annotations

import numpy as np
from test_manifest import karpathy_coco, write_json
from test_shards import sample, write_shard

from pipeline.columns import StringColumn
from pipeline.manifest import CaptionRecord, ImageRecord, Manifest, ShardMember, read_manifest


def test_a_string_column_keeps_every_value_exactly_and_gathers_rows(tmp_path):
    values = ["", "plain", "ünïcödé ✓", "lone \ud800 surrogate", "x" * 1000]
    column = StringColumn.from_strings(values)
    assert list(column) == values and column.tolist() == values and column[-1] == values[-1]
    assert column.take(np.array([3, 0, 3])).tolist() == [values[3], values[0], values[3]]
    assert column[1:3] == values[1:3] and column == values and column != values[::-1]
    offsets, data = column.buffers()
    assert offsets.tolist()[-1] == len(data) == sum(len(v.encode("utf-8", "surrogatepass")) for v in values)


def test_records_come_from_the_columns_and_a_manifest_made_of_records_is_the_same(tmp_path):
    m = read_manifest(write_json(tmp_path / "dataset_coco.json", karpathy_coco()))
    again = Manifest(list(m.images), list(m.captions), m.source, m.image_root, m.format)
    assert again.images == m.images and again.captions == m.captions
    assert again.fingerprint() == m.fingerprint() and again.fingerprint(1) == m.fingerprint(1)
    assert m.images[2] == ImageRecord("33", "val2014/c.jpg", "train") and m.captions[6] == CaptionRecord("a kite", 3)


def test_the_earlier_fingerprint_format_is_computed_as_before(tmp_path):
    # the values the single-hash (format 1) manifest fingerprint had for this file: stores built then still match
    m = read_manifest(write_json(tmp_path / "dataset_coco.json", karpathy_coco()))
    assert m.fingerprint(1) == "c4295d5d43677f85942e85254d5bd44a159f3b8a24b7ff0487ff5efa60b3600d"
    assert m.select_split("train").fingerprint(1) == "4a067663ed6b243b393ac1efbe3c256d16c6dbdac96182029444f6ff7cd8ab81"
    assert m.fingerprint() != m.fingerprint(1)


def test_a_subset_keeps_each_rows_member_and_why_a_sample_has_no_image(tmp_path):
    write_shard(tmp_path / "a" / "part-000000.tar",
                [sample("k0"), sample("k1", image=False), sample("k2"), sample("k3", image=False)])
    m = read_manifest(tmp_path / "a" / "part-000000.tar", manifest_cache=tmp_path / "cache")
    assert [bool(r.member.missing) for r in m.images] == [False, True, False, True]
    sub, caption_rows = m.subset(np.array([1, 2]))
    assert [r.image_id for r in sub.images] == ["k1", "k2"]
    assert sub.images[0].member.missing.startswith("no image member") and sub.images[1].member.missing == ""
    assert sub.images[1].member == m.images[2].member
    assert caption_rows.tolist() == [2, 3, 4, 5] and sub.caption_image_rows().tolist() == [0, 0, 1, 1]


def test_a_split_of_shards_keeps_the_digests_of_its_whole_shards_and_equals_reading_it_alone(demo_shards):
    both = read_manifest(f"{demo_shards['train']}::{demo_shards['val']}")
    both.fingerprint()
    val = both.select_split("val")
    alone = read_manifest(demo_shards["val"])
    kept = [b.digest for b in val.blocks if b.image_stop > b.image_start]
    assert kept == [b.digest for b in alone.blocks] and all(kept)
    assert val.fingerprint() == alone.fingerprint() == both.known_fingerprints.get("val", val.fingerprint())
    member = val.images[0].member
    assert isinstance(member, ShardMember) and member.shard.endswith("val-000000.tar")
