"""Precomputed image feature files: read as plain arrays, never by running code from them.

Accepted files (the ``precomputed:`` encoder and ``cusa-cache import-features`` read them):

- ``FEATURES.npy`` [N, D] with its image ids in ``FEATURES.ids.txt`` / ``FEATURES.ids.json`` (or an ids file named
  in the spec): read memory-mapped, without pickle.
- ``FEATURES.npz`` holding ``features`` [N, D] (any float or integer dtype) and ``ids`` [N] (strings or integers):
  read without pickle. ``cusa-cache import-features`` writes this form.
- The format the CUSA authors ship: a ``{image_id: vector}`` dict saved with ``np.save``, i.e. a pickle. Unpickling
  a file can execute whatever it names, so it is read only when asked:

  * ``PICKLE_NUMPY_ONLY`` (``import-features``): a restricted unpickler that rebuilds numpy arrays, dtypes and
    scalars, dicts, lists, strings and numbers, and refuses any other Python object, so the file cannot run code;
  * ``PICKLE_TRUST`` (``precomputed:FILE?trust_pickle=1``, ``import-features --trust-pickle``): numpy's own
    ``np.load(..., allow_pickle=True)``, for a file whose author you trust;
  * ``PICKLE_REFUSE`` (the default of ``precomputed:``): refused in one line that says how to convert or opt in.
"""

from __future__ import annotations

import json
import os
import pickle
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.errors import CusaError, one_line as _one_line
from pipeline.teachers.hashing import file_sha256

PICKLE_REFUSE = "refuse"
PICKLE_NUMPY_ONLY = "numpy-only"
PICKLE_TRUST = "trust"

NPZ_FEATURES = "features"
NPZ_IDS = "ids"

_PICKLE_PROTOCOL_2_PLUS = b"\x80"


class FeatureFileError(CusaError):
    """A precomputed feature file is missing, malformed, or refused (one line naming the file)."""


@dataclass
class FeatureTable:
    """Row ``i`` of ``features`` belongs to image ``ids[i]``; ``files`` are what was read (their hashes name the
    teacher); ``kind`` is "npy", "npz" or "pickled-dict"."""

    features: np.ndarray
    ids: list[str]
    files: list[Path]
    kind: str


# ---------------------------------------------------------------------------------------------- reading
def read_feature_file(path: Path, ids_path: Path | None = None, *, pickled: str = PICKLE_REFUSE,
                      refusal_hint: str = "", progress: bool = False) -> FeatureTable:
    """Read a feature file (module docstring). ``pickled`` says what to do with a pickled dict;
    ``refusal_hint`` ends the message that refuses one (how to convert it or opt in)."""
    path = Path(path)
    if not path.is_file():
        raise FeatureFileError(f"{path}: precomputed features file not found")
    if zipfile.is_zipfile(path):
        return _read_npz(path, ids_path)
    header = _npy_header(path)
    if header is not None and not header[1].hasobject:
        return _read_npy_array(path, ids_path)
    if header is None and not _looks_pickled(path):
        raise FeatureFileError(f"{path}: not a .npy or .npz file")
    if pickled == PICKLE_REFUSE:
        hint = f"; {refusal_hint}" if refusal_hint else ""
        raise FeatureFileError(f"{path}: holds pickled Python objects (a {{image_id: vector}} dict saved with "
                               f"np.save?), and unpickling it could run code{hint}")
    if ids_path is not None:
        raise FeatureFileError(f"{path}: a pickled {{image_id: vector}} dict names its own ids; drop the ids file "
                               f"{ids_path}")
    table = _unpickle_table(path, header is not None, pickled)
    return _table_from_dict(path, table, progress)


def read_plain_matrix(path: Path, what: str = "features") -> np.ndarray:
    """A ``.npy`` file holding a plain numeric [N, D] array, memory-mapped (large files stay on disk); a file of
    pickled objects is refused, never unpickled. Image features, caption embeddings and clip-retrieval's
    embedding files are all read through here."""
    path = Path(path)
    header = _npy_header(path) if path.is_file() else None
    if header is None:
        raise FeatureFileError(f"{path}: not a .npy file of {what}" if path.is_file() else f"{path}: {what} file "
                               "not found")
    if header[1].hasobject:
        raise FeatureFileError(f"{path}: holds pickled Python objects, not a plain numeric array of {what}; save "
                               "them with np.save(path, array) from a float array")
    try:
        features = np.load(str(path), mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise FeatureFileError(f"{path}: cannot read {what} ({_one_line(exc)})") from exc
    _check_matrix(path, features)
    return features


def _read_npy_array(path: Path, ids_path: Path | None) -> FeatureTable:
    features = read_plain_matrix(path)
    ids_path = ids_path or sibling_file(path)
    if ids_path is None or not Path(ids_path).is_file():
        raise FeatureFileError(
            f"{path}: a [N, D] array needs its image ids, one per line, in {path.with_suffix('.ids.txt')} or "
            f"precomputed:FEATURES.npy:IDS.txt (or save both in one .npz: features [N, D], ids [N])"
        )
    ids = read_ids_file(Path(ids_path))
    if len(ids) != features.shape[0]:
        raise FeatureFileError(f"{ids_path}: {len(ids)} ids for {features.shape[0]} feature rows in {path}")
    return FeatureTable(features, ids, [path, Path(ids_path)], "npy")


def _read_npz(path: Path, ids_path: Path | None) -> FeatureTable:
    try:
        with np.load(str(path), allow_pickle=False) as archive:
            names = list(archive.files)
            if NPZ_FEATURES not in names:
                raise FeatureFileError(f"{path}: an .npz of precomputed features needs the arrays "
                                       f"'{NPZ_FEATURES}' [N, D] and '{NPZ_IDS}' [N]; it holds {names or 'nothing'}")
            features = archive[NPZ_FEATURES]
            stored_ids = archive[NPZ_IDS] if NPZ_IDS in names else None
    except FeatureFileError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        # an object array inside answers "Object arrays cannot be loaded when allow_pickle=False"
        raise FeatureFileError(f"{path}: cannot read features without pickle ({_one_line(exc)}); an .npz of "
                               f"features holds plain arrays '{NPZ_FEATURES}' [N, D] and '{NPZ_IDS}' [N]") from exc
    _check_matrix(path, features)
    files = [path]
    if stored_ids is not None:
        if ids_path is not None:
            raise FeatureFileError(f"{path}: holds its own '{NPZ_IDS}' array; drop the ids file {ids_path}")
        ids = _ids_from_array(path, stored_ids)
    else:
        ids_path = ids_path or sibling_file(path)
        if ids_path is None or not Path(ids_path).is_file():
            raise FeatureFileError(f"{path}: no '{NPZ_IDS}' array and no ids file ({path.with_suffix('.ids.txt')}); "
                                   f"save the image ids in the .npz as '{NPZ_IDS}' [N]")
        ids = read_ids_file(Path(ids_path))
        files.append(Path(ids_path))
    if len(ids) != features.shape[0]:
        raise FeatureFileError(f"{path}: {len(ids)} ids for {features.shape[0]} feature rows")
    return FeatureTable(features, ids, files, "npz")


def _check_matrix(path: Path, features: np.ndarray) -> None:
    if features.ndim != 2:
        raise FeatureFileError(f"{path}: expected a [N, D] array, got shape {features.shape}")
    if features.dtype.kind not in "fiu":
        raise FeatureFileError(f"{path}: features must be numbers, got dtype {features.dtype}")


def _ids_from_array(path: Path, ids: np.ndarray) -> list[str]:
    if ids.ndim != 1 or ids.dtype.kind not in "USiu":
        raise FeatureFileError(f"{path}: '{NPZ_IDS}' must be a 1-D array of strings or integers, got "
                               f"shape {ids.shape} dtype {ids.dtype}")
    if ids.dtype.kind == "S":
        return [v.decode("utf-8", errors="replace") for v in ids.tolist()]
    return [str(v) for v in ids.tolist()]


def sibling_file(path: Path, suffixes: tuple[str, ...] = (".ids.txt", ".ids.json")) -> Path | None:
    """The first file beside ``path`` named with one of ``suffixes`` in place of its own (``X.ids.txt`` for
    ``X.npy``) or after it (``X.npy.ids.txt``): the ids of image features, the keys of caption embeddings."""
    for suffix in suffixes:
        for candidate in (path.with_suffix(suffix), Path(str(path) + suffix)):
            if candidate.is_file():
                return candidate
    return None


def read_ids_file(path: Path) -> list[str]:
    """Image ids, one per line (.txt) or a JSON list (.json)."""
    try:
        if path.suffix == ".json":
            ids = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(ids, list):
                raise FeatureFileError(f"{path}: expected a JSON list of image ids")
            return [str(i) for i in ids]
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError) as exc:
        raise FeatureFileError(f"{path}: cannot read ids ({_one_line(exc)})") from exc
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.strip() for line in lines]


def _npy_header(path: Path) -> tuple[tuple, np.dtype] | None:
    """(shape, dtype) of a .npy file from its header (a literal, parsed without evaluating code); None if the file
    is not a .npy file."""
    with open(path, "rb") as f:
        if f.read(len(np.lib.format.MAGIC_PREFIX)) != np.lib.format.MAGIC_PREFIX:
            return None
        f.seek(0)
        try:
            version = np.lib.format.read_magic(f)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, dtype = reader(f)
        except (ValueError, OSError, SyntaxError) as exc:
            raise FeatureFileError(f"{path}: damaged .npy header ({_one_line(exc)})") from exc
    return shape, dtype


def _looks_pickled(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(1) == _PICKLE_PROTOCOL_2_PLUS


# ---------------------------------------------------------------------------------------------- pickled dicts
class _NumpyDataUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, dtypes and scalars (and the dicts, lists, strings and numbers pickle builds itself);
    any other Python object is refused before it is looked up, so nothing named by the file can run."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _numpy_data_globals().get(f"{module}.{name}")
        if allowed is None:
            raise pickle.UnpicklingError(f"{module}.{name}")
        return allowed

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("a persistent id")


def _numpy_data_globals() -> dict[str, Any]:
    import collections
    import codecs

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray
    allowed: dict[str, Any] = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype,
                               "collections.OrderedDict": collections.OrderedDict,
                               "_codecs.encode": codecs.encode}  # bytes as pickle protocol 2 writes them
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):  # written by numpy 2 / numpy 1
        allowed[f"{module}._reconstruct"] = multiarray._reconstruct
        allowed[f"{module}.scalar"] = multiarray.scalar
    return allowed


def _unpickle_table(path: Path, is_npy: bool, pickled: str) -> Any:
    try:
        if pickled == PICKLE_TRUST:
            loaded = np.load(str(path), allow_pickle=True)
        else:
            with open(path, "rb") as f:
                if is_npy:
                    version = np.lib.format.read_magic(f)
                    (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                     np.lib.format.read_array_header_2_0)(f)
                loaded = _NumpyDataUnpickler(f).load()
    except pickle.UnpicklingError as exc:
        if pickled == PICKLE_TRUST:
            raise FeatureFileError(f"{path}: cannot unpickle ({_one_line(exc)})") from exc
        raise FeatureFileError(
            f"{path}: refused: unpickling it needs the Python object {exc}, which is not numpy data and could run "
            "code; if you trust its author, pass --trust-pickle"
        ) from None
    except Exception as exc:  # truncated pickle, a class missing here, ...
        raise FeatureFileError(f"{path}: cannot read the pickled features ({_one_line(exc)})") from exc
    if isinstance(loaded, np.ndarray) and loaded.dtype == object and loaded.shape == ():
        loaded = loaded.item()
    return loaded


def _table_from_dict(path: Path, table: Any, progress: bool) -> FeatureTable:
    if not isinstance(table, dict) or not table:
        raise FeatureFileError(f"{path}: expected a pickled {{image_id: vector}} dict or a [N, D] array, got "
                               f"{type(table).__name__}{' (empty)' if isinstance(table, dict) else ''}")
    from tqdm.auto import tqdm

    ids, vectors = [], []
    for key, value in tqdm(table.items(), total=len(table), desc=f"reading {path.name}", disable=not progress,
                           dynamic_ncols=True, leave=False):
        ids.append(_id_string(key))
        try:
            vector = np.asarray(value, dtype=np.float32).reshape(-1)
        except (TypeError, ValueError) as exc:
            raise FeatureFileError(f"{path}: the value of image id {ids[-1]!r} is not a vector of numbers "
                                   f"({_one_line(exc)})") from exc
        if vectors and vector.shape != vectors[0].shape:
            raise FeatureFileError(f"{path}: image id {ids[-1]!r} has {vector.size} values, image id {ids[0]!r} has "
                                   f"{vectors[0].size}; feature vectors must all have one length")
        vectors.append(vector)
    return FeatureTable(np.stack(vectors), ids, [path], "pickled-dict")


def _id_string(key: Any) -> str:
    if isinstance(key, bytes):
        return key.decode("utf-8", errors="replace")
    if isinstance(key, np.generic):
        key = key.item()
    return str(key)


# ---------------------------------------------------------------------------------------------- writing
def write_feature_npz(path: Path, features: np.ndarray, ids: Sequence[str]) -> None:
    """Write ``features`` (as float32) and ``ids`` (as unicode strings) to an .npz, atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **{NPZ_FEATURES: np.asarray(features, dtype=np.float32),
                           NPZ_IDS: np.asarray([str(i) for i in ids], dtype=str)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def import_features(source: Path, out: Path, *, ids_path: Path | None = None, trust_pickle: bool = False,
                    overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Convert a feature file (above all the authors' pickled dict) into the plain .npz ``precomputed:`` reads
    without pickle. Returns a summary: rows, dim, the source's format and the spec to use."""
    source, out = Path(source), Path(out)
    if out.suffix != ".npz":
        raise FeatureFileError(f"{out}: --out must name an .npz file")
    if out.exists() and out.resolve() == source.resolve():
        raise FeatureFileError(f"{out}: --out is the source file itself; choose another name")
    if out.exists() and not overwrite:
        raise FeatureFileError(f"{out}: already exists; pass --overwrite to replace it")
    t0 = time.perf_counter()
    table = read_feature_file(source, ids_path, pickled=PICKLE_TRUST if trust_pickle else PICKLE_NUMPY_ONLY,
                              progress=progress)
    if len(set(table.ids)) != len(table.ids):
        seen: set[str] = set()
        twice = next(i for i in table.ids if i in seen or seen.add(i))
        raise FeatureFileError(f"{source}: image id {twice!r} appears twice")
    features = np.asarray(table.features, dtype=np.float32)
    if not np.isfinite(features).all():
        bad = int(np.flatnonzero(~np.isfinite(features).all(axis=1))[0])
        raise FeatureFileError(f"{source}: the features of image id {table.ids[bad]!r} are not finite")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_feature_npz(out, features, table.ids)
    return {"source": str(source), "source_format": table.kind, "out": str(out), "rows": int(features.shape[0]),
            "dim": int(features.shape[1]), "source_sha256": file_sha256(source), "out_sha256": file_sha256(out),
            "spec": f"precomputed:{out}", "seconds": time.perf_counter() - t0}

