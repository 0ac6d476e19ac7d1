"""The k-nearest-neighbor table of a cached modality, built with FAISS.

Embeddings in the store are L2-normalised, so inner product is cosine similarity. The index is
described by a FAISS ``index_factory`` string ("Flat", "IVF4096,Flat", "HNSW32", ...) and search-time
knobs by a FAISS parameter string ("nprobe=64,efSearch=128"); no options of our own are invented.

Exact "Flat" search costs N*N*D multiply-adds: minutes up to ~150k rows on a 2-core CPU, about
50 minutes at 600k x 384, fine to a few million rows on a GPU. For large tables on a CPU use an IVF
factory (see ``recommended_factory``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

# k-means needs at least ~39 points per centroid to be meaningful (FAISS warns below that) and gains
# nothing beyond 256 (FAISS subsamples to that itself); 100k rows keep small-nlist training cheap.
_TRAIN_POINTS_PER_CENTROID_MIN = 40
_TRAIN_POINTS_PER_CENTROID_MAX = 256
_TRAIN_ROWS_MIN = 100_000
_TRAIN_SEED = 0

_DEFAULT_EF_SEARCH = 128
_CANDIDATES_PER_RESULT = 64

# Above this many rows exact search dominates a cache build on a CPU (N^2 cost: ~3 min at 150k x 384
# on 2 cores, ~50 min at 600k); a GPU keeps it exact up to a few million.
_EXACT_SEARCH_MAX_ROWS_CPU = 150_000
_EXACT_SEARCH_MAX_ROWS_GPU = 4_000_000


@dataclass
class NeighborTable:
    """Top-k neighbors of every row, self excluded, sorted by descending similarity.

    ``ids[i, j]`` is the row index of the j-th neighbor of row i and ``sims[i, j]`` its inner product
    with row i. An approximate index may find fewer than k candidates for a row (too small nprobe):
    those slots hold id -1 and similarity -inf; ``missing`` counts them.
    """

    ids: np.ndarray  # int64 [N, k]
    sims: np.ndarray  # float32 [N, k]
    index: faiss.Index
    factory: str
    search_params: str = ""  # FAISS parameter string applied before the search, "" when none
    missing: int = 0


def recommended_factory(n_rows: int, gpu: bool = False) -> str:
    """A factory string that keeps a neighbor-table build within minutes.

    Exact search for small tables; above, an inverted file with nlist the power of two at or above
    4*sqrt(N) (FAISS's guideline is 4 to 16 sqrt(N)). On 600k x 384 clustered rows "IVF4096,Flat"
    at the default nprobe measured recall@10 ~0.98 (benchmarks/bench_neighbors.py).
    """
    if n_rows <= (_EXACT_SEARCH_MAX_ROWS_GPU if gpu else _EXACT_SEARCH_MAX_ROWS_CPU):
        return "Flat"
    nlist = 1 << int(np.ceil(np.log2(4 * np.sqrt(n_rows))))
    return f"IVF{nlist},Flat"


def default_nprobe(nlist: int, n_rows: int, k: int) -> int:
    """Lists probed per query when the caller gives none.

    Enough lists to scan about 64*(k+1) candidate rows, rounded up to a power of two, at least 8 and
    at most nlist. Measured on clustered 384-d rows: 600k rows in 4096 lists, k=32 -> 16 lists,
    recall@10 0.979 (8 lists: 0.976, 64: 0.980, at 4x the search time); 100k rows in 2048 lists
    need the larger count the rule gives, since each list holds only ~50 rows.
    """
    rows_per_list = max(1.0, n_rows / nlist)
    wanted = max(8, int(np.ceil(_CANDIDATES_PER_RESULT * (k + 1) / rows_per_list)))
    return int(min(nlist, 1 << int(np.ceil(np.log2(wanted)))))


def _as_float32(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{what}: expected a 2-d array [rows, dim], got shape {x.shape}")
    # float16 (the store's dtype) is upcast here: FAISS only takes contiguous float32.
    return np.ascontiguousarray(x, dtype=np.float32)


def _gpu_available() -> bool:
    return hasattr(faiss, "index_cpu_to_all_gpus") and faiss.get_num_gpus() > 0


def _is_gpu_index(index: faiss.Index) -> bool:
    # GPU index classes only exist in GPU builds; several GPUs come wrapped in replicas or shards.
    index = faiss.downcast_index(index)
    if "Gpu" in type(index).__name__:
        return True
    if hasattr(index, "count") and hasattr(index, "at") and index.count() > 0:
        return _is_gpu_index(index.at(0))
    return False


def _parameter_space(index: faiss.Index) -> faiss.ParameterSpace:
    if _is_gpu_index(index) and hasattr(faiss, "GpuParameterSpace"):
        return faiss.GpuParameterSpace()
    return faiss.ParameterSpace()


def _ivf_of(index: faiss.Index) -> faiss.IndexIVF | None:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _train_rows(n_rows: int, nlist: int | None) -> int:
    if nlist is None:
        return min(n_rows, _TRAIN_ROWS_MIN)
    wanted = max(_TRAIN_ROWS_MIN, _TRAIN_POINTS_PER_CENTROID_MIN * nlist)
    return min(n_rows, wanted, _TRAIN_POINTS_PER_CENTROID_MAX * nlist)


def _search_params(cpu_index: faiss.Index, n: int, k: int, nprobe: int | None, params: str | None) -> str:
    """The parameter string to apply: defaults for the index type, then the caller's overrides."""
    settings: dict[str, str] = {}
    ivf = _ivf_of(cpu_index)
    if ivf is not None:
        settings["nprobe"] = str(default_nprobe(ivf.nlist, n, k))
    if isinstance(faiss.downcast_index(cpu_index), faiss.IndexHNSW):
        # efSearch below the number of results asked for would silently truncate them.
        settings["efSearch"] = str(max(_DEFAULT_EF_SEARCH, 2 * (k + 1)))
    if nprobe is not None:
        if ivf is None:
            raise ValueError(f"nprobe={nprobe} given but index {type(cpu_index).__name__} has no inverted lists")
        settings["nprobe"] = str(int(nprobe))
    for item in (params or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"search parameter {item!r}: expected name=value, e.g. 'nprobe=32,efSearch=128'")
        settings[name.strip()] = value.strip()
    return ",".join(f"{name}={value}" for name, value in settings.items())


def _inverted_list_order(index: faiss.Index, n: int) -> np.ndarray | None:
    """Row ids grouped by inverted list, for an IVF index on CPU; None for other indexes.

    An IVF search is bound by memory traffic: every query streams the vectors of its probed lists.
    Queries taken list by list probe mostly the same lists as their predecessors, which are then
    still in cache; on 600k x 384 rows this halves the search time against row order.
    """
    ivf = _ivf_of(index)
    if ivf is None:
        return None
    invlists = ivf.invlists
    parts = []
    for list_no in range(ivf.nlist):
        size = invlists.list_size(list_no)
        if size:
            ptr = invlists.get_ids(list_no)
            parts.append(faiss.rev_swig_ptr(ptr, size).copy())
            invlists.release_ids(list_no, ptr)
    order = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    # Guard against list contents that are not exactly the rows 0..n-1 (e.g. a custom id map).
    if order.shape[0] != n or not np.array_equal(np.sort(order), np.arange(n)):
        return None
    return order.astype(np.int64, copy=False)


def _drop_self(raw_ids: np.ndarray, raw_sims: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own row from its k+1 results.

    Matched by id, not position: an exact duplicate ties with the query, so self may come second. When
    self is absent (more than k duplicates, or an approximate miss) the last result is dropped instead.
    """
    n = raw_ids.shape[0]
    is_self = raw_ids == rows[:, None]
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k)
    keep = np.ones(raw_ids.shape, dtype=bool)
    keep[np.arange(n), drop] = False
    ids = raw_ids[keep].reshape(n, k)
    sims = raw_sims[keep].reshape(n, k)
    # FAISS returns results sorted already; the stable re-sort guards wrapped/sharded indexes that
    # merge partial lists, and costs little next to the search.
    if n and np.any(sims[:, 1:] > sims[:, :-1]):
        order = np.argsort(-sims, axis=1, kind="stable")
        ids = np.take_along_axis(ids, order, axis=1)
        sims = np.take_along_axis(sims, order, axis=1)
    return ids, sims


def empty_index(factory: str, d: int, n: int) -> faiss.Index:
    """An untrained, empty inner-product CPU index of ``factory`` for ``n`` rows of dimension ``d``; a factory
    string FAISS does not know, or one with more inverted lists than rows to train them, is a one-line ValueError
    (so callers can check it before computing what the index will hold)."""
    try:
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError:
        raise ValueError(f"FAISS index factory {factory!r} is not valid (e.g. Flat, IVF1024,Flat, HNSW32)") from None
    ivf = _ivf_of(index)
    if ivf is not None and n < ivf.nlist:
        raise ValueError(
            f"factory {factory!r} has {ivf.nlist} inverted lists but only N={n} rows to train them; "
            "use fewer lists or 'Flat'"
        )
    return index


def build_index(emb: np.ndarray, factory: str = "Flat", use_gpu: bool | None = None, k: int = 32,
                nprobe: int | None = None, params: str | None = None) -> tuple[faiss.Index, faiss.Index, str]:
    """An inner-product index of ``emb`` (L2-normalised rows) made by ``factory``, trained and filled.

    Returns (the index to search, its CPU form — the same object unless it was moved to a GPU — and the FAISS
    parameter string applied to it). Search parameters default as in ``build_neighbor_table`` for ``k`` results.
    """
    x = _as_float32(emb, "embeddings")
    n, d = x.shape
    if use_gpu is None:
        use_gpu = _gpu_available()
    elif use_gpu and not _gpu_available():
        raise ValueError("use_gpu=True but this FAISS build sees no GPU; pass use_gpu=None or False")
    cpu_index = empty_index(factory, d, n)
    ivf = _ivf_of(cpu_index)
    applied = _search_params(cpu_index, n, k, nprobe, params)

    index = cpu_index
    if use_gpu:
        try:
            index = faiss.index_cpu_to_all_gpus(cpu_index)
        except RuntimeError:
            # Some index types (HNSW, most PQ variants) have no GPU implementation: stay on CPU.
            index = cpu_index

    if not index.is_trained:
        n_train = _train_rows(n, ivf.nlist if ivf is not None else None)
        rng = np.random.default_rng(_TRAIN_SEED)
        # Sorted sample rows read the array front to back.
        sample = np.sort(rng.choice(n, size=n_train, replace=False)) if n_train < n else slice(None)
        index.train(x[sample])
    index.add(x)
    if applied:
        _parameter_space(index).set_index_parameters(index, applied)
    return index, cpu_index, applied


def build_neighbor_table(
    emb: np.ndarray,
    k: int,
    factory: str = "Flat",
    use_gpu: bool | None = None,
    query_batch: int = 65536,
    progress: bool = True,
    nprobe: int | None = None,
    params: str | None = None,
) -> NeighborTable:
    """Index ``emb`` (L2-normalised rows) with ``factory`` and find every row's top-k other rows.

    ``use_gpu`` None means "when FAISS sees a GPU". ``nprobe`` and ``params`` (a FAISS parameter
    string such as "nprobe=64" or "efSearch=256") tune approximate search; IVF indexes default to
    ``default_nprobe(nlist, N, k)`` and HNSW to efSearch=128.
    """
    x = _as_float32(emb, "embeddings")
    n, d = x.shape
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if n - 1 < k:
        raise ValueError(
            f"cannot find k={k} neighbors among N={n} rows: each row has only N-1={n - 1} others; lower k"
        )
    if query_batch < 1:
        raise ValueError(f"query_batch must be at least 1, got {query_batch}")
    index, cpu_index, applied = build_index(x, factory, use_gpu, k, nprobe, params)

    order = None if index is not cpu_index else _inverted_list_order(cpu_index, n)
    ids = np.empty((n, k), dtype=np.int64)
    sims = np.empty((n, k), dtype=np.float32)
    with tqdm(total=n, desc=f"neighbors ({factory})", unit="row", disable=not progress) as bar:
        for start in range(0, n, query_batch):
            stop = min(n, start + query_batch)
            rows = np.arange(start, stop) if order is None else order[start:stop]
            queries = x[start:stop] if order is None else x[rows]
            raw_sims, raw_ids = index.search(queries, k + 1)
            ids[rows], sims[rows] = _drop_self(raw_ids, raw_sims, rows, k)
            bar.update(stop - start)

    absent = ids < 0
    missing = int(absent.sum())
    if missing:
        sims[absent] = -np.inf
    return NeighborTable(ids=ids, sims=sims, index=index, factory=factory, search_params=applied, missing=missing)


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (ids int64 [q, k], sims float32 [q, k]) of ``queries`` in ``index``, best first."""
    q = _as_float32(queries, "queries")
    if q.shape[1] != index.d:
        raise ValueError(f"queries have dimension {q.shape[1]}, the index holds dimension {index.d}")
    sims, ids = index.search(q, k)
    return ids.astype(np.int64, copy=False), sims.astype(np.float32, copy=False)


def save_index(index: faiss.Index, path: str | os.PathLike) -> None:
    """Write ``index`` to ``path`` as a CPU index; a crash mid-write leaves any previous file intact."""
    path = Path(path)
    if _is_gpu_index(index) and hasattr(faiss, "index_gpu_to_cpu"):
        index = faiss.index_gpu_to_cpu(index)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        faiss.write_index(index, str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_index(path: str | os.PathLike) -> faiss.Index:
    """Read an index written by ``save_index`` (always a CPU index)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no FAISS index file here")
    return faiss.read_index(str(path))


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """Mean fraction of each row's exact top-k ids that appear in its approximate top-k."""
    approx = np.asarray(approx_ids)[:, :k]
    exact = np.asarray(exact_ids)[:, :k]
    if approx.shape[0] != exact.shape[0]:
        raise ValueError(f"recall_at_k: {approx.shape[0]} approximate rows vs {exact.shape[0]} exact rows")
    if exact.shape[1] < k or approx.shape[1] < k:
        raise ValueError(f"recall_at_k: k={k} but the tables hold {approx.shape[1]} and {exact.shape[1]} columns")
    if exact.shape[0] == 0:
        return float("nan")
    found = 0
    # Chunked so the [rows, k, k] comparison stays small for whole-table recall.
    for start in range(0, exact.shape[0], 4096):
        a = approx[start : start + 4096]
        e = exact[start : start + 4096]
        found += int((e[:, :, None] == a[:, None, :]).any(axis=2).sum())
    return found / (exact.shape[0] * k)
