"""The streamed read path on a real store: rows gathered from decoded chunks equal the stored rows, a planned
sequence of batches in chunk-local order decodes each chunk once, the bytes held never pass the budget, a chunk
damaged after the build stops the read naming it, and the soft-label source streams the same blocks it computes
in memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from numcodecs import blosc

from teacher_cache.chunk_cache import NEVER, ChunkCache, StreamedRows
from teacher_cache.chunk_reader import ChunkReader
from teacher_cache.errors import StoreError
from teacher_cache.soft_labels import SoftLabelSource, read_ahead_bytes
from teacher_cache.store import Store
from train.chunk_order import chunk_local_batches, row_units


@pytest.fixture(scope="module")
def store(demo_cache) -> Store:
    return Store.open(demo_cache, require_complete=True)


def stored(store: Store, modality: str) -> np.ndarray:
    return np.asarray(zarr.open_group(str(store.path), mode="r")[f"{modality}/emb"][:], dtype=np.float16)


def readers(store: Store) -> dict[str, ChunkReader]:
    return {m: ChunkReader(store, m) for m in ("images", "texts")}


def demo_pairs(store: Store) -> tuple[np.ndarray, np.ndarray]:
    """Every caption of the store with its image: the training pairs of the store's dataset."""
    return store.caption_image_rows, np.arange(store.counts["texts"])


def chunk_local(store: Store, window: int, batch: int = 16, seed: int = 0) -> list[dict[str, np.ndarray]]:
    images, captions = demo_pairs(store)
    units = row_units(images, captions, store, store)
    return [{"images": images[b], "texts": captions[b]}
            for b in chunk_local_batches(units.unit_of_pair, batch, seed, 0, window, image_of_pair=images)]


# ------------------------------------------------------------------------------------------------ rows
def test_direct_chunk_files_decode_to_what_zarr_reads(store):
    for modality in ("images", "texts"):
        direct = ChunkReader(store, modality)
        assert direct._direct is not None  # a build's layout: read without zarr's codec pipeline
        through_zarr = ChunkReader(store, modality)
        through_zarr._direct = None
        for c in range(direct.n_chunks):  # the last chunk is shorter than the chunk files, which zarr pads
            a, b = direct.read(c), through_zarr.read(c)
            assert a.dtype == np.float16 and a.shape == b.shape and np.array_equal(a, b)


@pytest.mark.parametrize("planned", [False, True], ids=["unplanned", "planned"])
def test_streamed_rows_are_the_stored_rows_in_the_asked_order(store, planned):
    emb = {m: stored(store, m) for m in ("images", "texts")}
    rng = np.random.default_rng(0)
    batches = [{m: rng.integers(0, store.counts[m], 12) for m in ("images", "texts")} for _ in range(9)]
    batches.append({"images": np.array([3, 3, 0, 40, 3]), "texts": np.array([200, 1, 1, 0, 209])})  # repeats
    rows = StreamedRows(readers(store), max_bytes=60_000)
    if planned:
        rows.plan(batches)
    for batch in batches:
        for m, index in batch.items():
            got = rows.rows(m, index)
            assert got.dtype == np.float16 and np.array_equal(got, emb[m][index])
    rows.end_plan()


def test_rows_outside_the_store_are_an_index_error_naming_the_row(store):
    with pytest.raises(IndexError, match="images row 10000 out of range"):
        StreamedRows(readers(store), 1 << 20).rows("images", np.array([0, 10_000]))


# ------------------------------------------------------------------------------------------------ decodes and memory
# 210 kB: W = 1, and the chunks of two windows meet at their border (windows here are ~5 batches long), which may
# take more than slots for every chunk's whole life would: then the cache keeps those needed soonest (either way
# each chunk is decoded once). 400 kB: W = 2, in slots.
@pytest.mark.parametrize("budget, schedule", [(210_000, {"cache", "slots"}), (400_000, {"slots"})])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunk_local_plan_decodes_each_chunk_once_and_holds_far_less_than_the_store(store, budget, schedule, seed):
    images, captions = demo_pairs(store)
    window = row_units(images, captions, store, store).window_for(budget, read_ahead_bytes(store))
    assert window == (1 if budget < 300_000 else 2)
    batches = chunk_local(store, window, seed=seed)
    rows = StreamedRows(readers(store), max_bytes=budget)
    rows.plan(batches)
    assert rows.schedule in schedule
    for batch in batches:
        for m, index in batch.items():
            rows.rows(m, index)
    decoded = rows.cache.stats.decoded
    assert decoded == {"images": store.n_chunks("images"), "texts": store.n_chunks("texts")}
    everything = sum(2 * store.counts[m] * store.dims[m] for m in ("images", "texts"))
    assert 0 < rows.peak_bytes <= budget and rows.peak_bytes < everything
    rows.end_plan()
    assert rows.resident_bytes == 0  # nothing planned is needed any more


def test_random_batches_decode_chunks_again_and_again_within_the_same_budget(store):
    rng = np.random.default_rng(1)
    images, captions = demo_pairs(store)
    order = [rng.permutation(len(captions))[:16] for _ in range(13)]
    rows = StreamedRows(readers(store), max_bytes=200_000)
    rows.plan([{"images": images[b], "texts": captions[b]} for b in order])
    assert rows.schedule == "cache"  # random batches need every chunk all the time: the budget cannot hold that
    for b in order:
        rows.rows("images", images[b])
        rows.rows("texts", captions[b])
    assert rows.cache.stats.decoded["texts"] > 2 * store.n_chunks("texts")
    largest = 16 * store.dims["images"] * 2
    assert rows.peak_bytes <= 200_000 + largest  # the budget, plus at most one chunk read again while in use


def test_planned_cache_evicts_the_chunk_needed_furthest_ahead():
    # budget of two chunks; uses: a b c a b c → the optimal (Belady) schedule decodes 4 times, LRU would 6
    cache = ChunkCache(max_bytes=2 * 8)
    uses = {"a": [0, 3], "b": [1, 4], "c": [2, 5]}
    decoded = []
    for t, key in enumerate("abcabc"):
        later = [u for u in uses[key] if u > t]
        cache.fetch(key, lambda key=key: decoded.append(key) or np.zeros(4, np.float16), later[0] if later else NEVER)
    assert len(decoded) == 4
    assert cache.stats.resident_bytes == 0  # nothing is needed after the last use


# ------------------------------------------------------------------------------------------------ damage
def damage_one_value_keeping_the_file_size(store_path, modality: str, chunk: int) -> None:
    """Flip the sign of one stored value and re-encode the chunk file to exactly its old size (so that the cheap
    checks on open, which compare file sizes, pass and only the chunk's checksum can tell)."""
    path = store_path / modality / "emb" / "c" / str(chunk) / "0"
    raw = path.read_bytes()
    rows = np.frombuffer(blosc.decompress(raw), dtype="<f2").copy()
    codec = zarr.open_group(str(store_path), mode="r")[f"{modality}/emb"].metadata.codecs[1]
    from numcodecs import Blosc

    encoder = Blosc(cname=codec.cname.value, clevel=codec.clevel, shuffle=Blosc.SHUFFLE)
    for i in range(len(rows)):
        changed = rows.copy()
        changed[i] = -changed[i]
        if changed[i] == rows[i]:
            continue
        encoded = encoder.encode(changed)
        if len(encoded) == len(raw):
            path.write_bytes(encoded)
            return
    pytest.skip("no same-size damage found")


def test_a_chunk_damaged_after_the_build_stops_the_streamed_read_naming_it(cache_copy):
    damage_one_value_keeping_the_file_size(cache_copy, "texts", 3)
    store = Store.open(cache_copy, require_complete=True)  # the cheap checks on open cannot see it
    reader = ChunkReader(store, "texts")
    reader.read(2)
    with pytest.raises(StoreError, match=r"texts chunk 3 \(rows 48-63\) does not match the checksum"):
        reader.read(3)
    # through the trainer's path (decoded ahead in a thread): the error reaches the training loop
    source = SoftLabelSource(store, stream=True)
    batches = [(np.array([0, 1]), np.array([j, j + 1])) for j in range(0, 200, 8)]
    with pytest.raises(StoreError, match="texts chunk 3"):
        list(source.blocks(batches))


# ------------------------------------------------------------------------------------------------ soft labels
def test_streamed_source_gives_the_in_memory_blocks_for_a_chunk_local_epoch(store):
    batches = [(b["images"], b["texts"]) for b in chunk_local(store, window=1)]
    memory = SoftLabelSource(store)
    streamed = SoftLabelSource(store, stream=True, max_memory_bytes=210_000)
    got = list(streamed.blocks(batches))
    assert len(got) == len(batches)
    for (image_rows, caption_rows), (t_ii, t_tt) in zip(batches, got):
        ref_ii, ref_tt = memory.block(image_rows, caption_rows)
        assert torch.equal(t_ii, ref_ii) and torch.equal(t_tt, ref_tt)
    stats = streamed.chunk_stats()
    assert stats["decoded"] == {"images": store.n_chunks("images"), "texts": store.n_chunks("texts")}
    assert 0 < streamed.peak_memory_bytes() <= 210_000 < memory.memory_bytes()
    assert streamed.memory_bytes() == 0  # the epoch is over: nothing held
