"""The chunk-local epoch order: every pair once an epoch, batches that read only a window of stored chunks, the full
shuffle when the window covers everything, deterministic in (seed, epoch), DDP ranks slicing the same global
batches; and the units and window a store layout gives."""

from __future__ import annotations

import numpy as np
import pytest

from teacher_cache.store import Store
from train.chunk_order import chunk_local_batches, row_units
from train.data import epoch_batches

# 40 units of 25 pairs, with two short ones (a split's pairs need not fill a chunk)
UNITS = np.repeat(np.arange(40), 25)
UNITS = UNITS[~((UNITS == 7) & (np.arange(len(UNITS)) % 2 == 0)) & ~((UNITS == 39) & (np.arange(len(UNITS)) % 5 > 0))]


@pytest.mark.parametrize("window", [1, 3, 8])
@pytest.mark.parametrize("epoch", [0, 5])
def test_every_pair_comes_once_an_epoch_and_a_batch_reads_at_most_two_windows(window, epoch):
    batches = chunk_local_batches(UNITS, 32, seed=3, epoch=epoch, window=window)
    seen = np.concatenate(batches)
    # only a last batch of fewer than 2 pairs may be dropped
    assert len(seen) == len(np.unique(seen)) and len(UNITS) - len(seen) < 2
    assert all(len(b) == 32 for b in batches[:-1])
    # the units come in windows of `window`: positions in the sequence map to windows without overlap
    sequence_units = UNITS[seen]
    first_seen = {}
    for pos, u in enumerate(sequence_units):
        first_seen.setdefault(int(u), pos)
    order = sorted(first_seen, key=first_seen.get)
    n_units = len(order)
    sizes = [len(w) for w in np.array_split(np.arange(n_units), -(-n_units // window))]  # balanced, ≤ window
    assert max(sizes) <= window
    window_index = np.repeat(np.arange(len(sizes)), sizes)
    windows = {u: int(window_index[i]) for i, u in enumerate(order)}
    window_of_position = np.array([windows[int(u)] for u in sequence_units])
    assert np.all(np.diff(window_of_position) >= 0)  # a window's pairs all come before the next window's
    # so a batch reads the chunks of the window it is in and, across a border, the next: two windows at most
    # (more only where a window holds fewer pairs than a batch)
    smallest = np.bincount(window_of_position).min()
    lo = 0
    for b in batches:
        spanned = np.unique(window_of_position[lo:lo + len(b)])
        assert len(spanned) <= 2 + 32 // smallest and np.all(np.diff(spanned) == 1)
        assert len(np.unique(UNITS[b])) <= window * len(spanned)
        lo += len(b)


def test_a_window_covering_every_unit_is_the_full_shuffle_batch_for_batch():
    for epoch in (0, 1):
        got = chunk_local_batches(UNITS, 32, seed=9, epoch=epoch, window=40)
        want = epoch_batches(len(UNITS), 32, seed=9, epoch=epoch)
        assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))


def test_the_order_depends_only_on_seed_epoch_and_window():
    a = chunk_local_batches(UNITS, 32, seed=1, epoch=2, window=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, chunk_local_batches(UNITS, 32, seed=1, epoch=2, window=4)))
    for other in ({"seed": 2, "epoch": 2, "window": 4}, {"seed": 1, "epoch": 3, "window": 4},
                  {"seed": 1, "epoch": 2, "window": 5}):
        b = chunk_local_batches(UNITS, 32, **other)
        assert not all(np.array_equal(x, y) for x, y in zip(a, b))
    # shuffled within windows: neither the store order nor one unit after another
    flat = np.concatenate(a)
    assert not np.array_equal(flat, np.sort(flat))
    assert len(np.unique(UNITS[a[0]])) > 1


def test_ddp_ranks_take_contiguous_slices_of_the_same_global_batches():
    single = chunk_local_batches(UNITS, 64, seed=0, epoch=1, window=3)
    ranks = [chunk_local_batches(UNITS, 32, seed=0, epoch=1, window=3, rank=r, world_size=2) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for whole, part0, part1 in zip(single, *ranks):
        if len(whole) == 64:
            assert np.array_equal(np.concatenate([part0, part1]), whole)


def test_a_window_below_one_unit_is_refused():
    with pytest.raises(ValueError, match="at least one chunk"):
        chunk_local_batches(UNITS, 32, seed=0, epoch=0, window=0)


# ------------------------------------------------------------------------------------------------ units of a store
def test_units_are_the_image_chunks_when_each_image_has_several_captions(demo_cache):
    store = Store.open(demo_cache, require_complete=True)
    images, captions = store.caption_image_rows, np.arange(store.counts["texts"])
    units = row_units(images, captions, store, store)
    assert units.modality == "images" and units.n_units == store.n_chunks("images")
    assert units.chunks_read == {"images": store.n_chunks("images"), "texts": store.n_chunks("texts")}
    assert np.array_equal(units.unit_of_pair, images // store.chunk_rows)
    # a unit's bytes: its image chunk and every caption chunk its pairs read, float16
    rows = store.chunk_rows
    for u in range(units.n_units):
        mine = captions[units.unit_of_pair == u]
        image_rows = min(rows, store.counts["images"] - u * rows)
        caption_chunks = np.unique(mine // rows)
        caption_rows = sum(min(rows, store.counts["texts"] - c * rows) for c in caption_chunks)
        assert units.unit_bytes[u] == 2 * (image_rows * store.dims["images"] + caption_rows * store.dims["texts"])
    # the window: as many of the largest units as fit, with a quarter kept free, after what is reserved
    largest = int(units.unit_bytes.max())
    assert units.window_for(int(1.25 * largest)) == 1
    assert units.window_for(int(1.25 * largest) + 1000, reserved_bytes=1000) == 1
    assert units.window_for(int(1.25 * largest) - 1) == 0
    assert units.window_for(10**9) == units.n_units


def test_a_split_uses_only_its_own_chunks_renumbered_in_store_order(demo_cache):
    store = Store.open(demo_cache, require_complete=True)
    images = store.caption_image_rows
    keep = np.flatnonzero(images >= store.chunk_rows)  # pairs whose images lie past the first chunk
    units = row_units(images[keep], keep, store, store)
    assert units.n_units == store.n_chunks("images") - 1
    assert np.array_equal(units.unit_of_pair, images[keep] // store.chunk_rows - 1)


def test_captions_of_one_image_are_dealt_into_rounds_within_a_window():
    # 40 units of 5 images × 5 captions; windows of 2 units hold 10 images, batches of 8
    units = np.repeat(np.arange(40), 25)
    images = np.arange(len(units)) // 5
    batches = chunk_local_batches(units, 8, seed=0, epoch=0, window=2, image_of_pair=images)
    sequence = np.concatenate(batches)
    assert len(sequence) == len(np.unique(sequence)) == len(units)
    for lo in range(0, len(sequence), 50):  # a window: 2 units × 25 pairs, in the order the epoch takes them
        window = sequence[lo:lo + 50]
        assert len(np.unique(units[window])) == 2
        seen: dict[int, int] = {}
        rounds = []
        for pair in window:
            seen[images[pair]] = seen.get(images[pair], -1) + 1
            rounds.append(seen[images[pair]])
        assert rounds == sorted(rounds)  # every image's first caption, then every second one, ...
        assert all(rounds.count(k) == 10 for k in range(5))
    # an image's captions then rarely meet in a batch; without the rounds they often do
    plain = chunk_local_batches(units, 8, seed=0, epoch=0, window=2)

    def repeats(bs):
        return np.mean([len(b) - len(np.unique(images[b])) for b in bs])

    assert repeats(batches) < 0.5 * repeats(plain)
    # which caption of an image comes in which round is random, and differs by epoch
    again = chunk_local_batches(units, 8, seed=0, epoch=1, window=2, image_of_pair=images)
    assert not np.array_equal(np.concatenate(again), sequence)


def test_windows_are_balanced_so_none_is_left_with_a_single_unit():
    units = np.repeat(np.arange(4), 30)
    sequence = np.concatenate(chunk_local_batches(units, 10, seed=0, epoch=0, window=3))
    first_half, second_half = set(units[sequence[:60]]), set(units[sequence[60:]])
    assert len(first_half) == len(second_half) == 2 and not first_half & second_half
