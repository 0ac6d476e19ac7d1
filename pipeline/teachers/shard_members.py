"""Teacher embeddings that travel inside the shards: ``member:npz:FIELD[:mean]`` (DataCompDR's layout).

Each sample of a webdataset shard may carry an ``npz`` member with its teachers' embeddings already computed:
DataCompDR writes ``image_emb`` [augmentations × D] and ``text_emb`` [1 + synthetic captions × D], float32. Such a
teacher reads them instead of running a model:

- image (``member:npz:image_emb``): row 0, the embedding of the unaugmented image, or with ``:mean`` the mean of
  every augmentation's row;
- text (``member:npz:text_emb``): the k-th caption of a sample (in the order the manifest holds them, which is the
  caption member's line order) takes row k of the array.

It embeds only the rows of the manifest it is given (``bind_manifest``, which the build calls): a sample without the
member or the field is an unreadable image (``--on-bad-image skip`` leaves it out) or, for captions, a one-line
error naming the shard and the sample. Members are found by reading each shard's tar headers once
(pipeline/tar_index.py), then read by offset like images. The identity's ``weights`` hashes the manifest's
fingerprint and the shards' sizes and times: a store built from other shards is refused.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from pipeline.errors import EncoderError, ImageError
from pipeline.file_stat import FileStat
from pipeline.shard_cache import needs_cache, shard_cache
from pipeline.shard_scan import group_samples
from pipeline.shards import read_member
from pipeline.tar_index import scan_tar
from pipeline.teachers.base import EncoderBase, SpecRequest

MEMBER_PREFIX = "member:"
_REDUCTIONS = ("first", "mean")
_CACHED_SHARDS = 4  # member maps kept: rows are read shard after shard


@dataclass(frozen=True)
class MemberSpec:
    """``member:EXT:FIELD[:mean]`` parsed: the member's extension, the array in it, and how image rows reduce it."""

    ext: str
    field: str
    reduce: str = "first"

    @classmethod
    def parse(cls, spec: str, body: str) -> "MemberSpec":
        parts = [p.strip() for p in body.split(":")]
        if len(parts) not in (2, 3) or not all(parts):
            raise EncoderError(f"encoder spec {spec!r}: expected member:npz:FIELD or member:npz:FIELD:mean")
        if parts[0].lower() != "npz":
            raise EncoderError(f"encoder spec {spec!r}: only npz members are read (member:npz:FIELD)")
        reduce = parts[2].lower() if len(parts) == 3 else "first"
        if reduce not in _REDUCTIONS:
            raise EncoderError(f"encoder spec {spec!r}: {parts[2]!r} is not a reduction; use :mean (or nothing: "
                               "the first row)")
        return cls("npz", parts[1], reduce)


class ShardMemberEncoder(EncoderBase):
    """Embeddings read from a member of each shard sample (see the module docstring)."""

    needs_pixels = False
    by_row = True

    def __init__(self, spec: str, modality: str, member: MemberSpec):
        super().__init__(spec, modality, self._source_digest, {"member": member.ext, "field": member.field,
                                                               "reduce": member.reduce if modality == "image" else
                                                               "caption row"})
        self.member = member
        self.dim = 0
        self._manifest = None
        self._first_caption: np.ndarray | None = None
        self._last: tuple[int, np.ndarray] | None = None
        self._maps: OrderedDict[str, dict[str, tuple[int, int]]] = OrderedDict()

    # ------------------------------------------------------------------ binding
    def bind_manifest(self, manifest) -> None:
        """The rows to embed (the build's manifest); the embedding width is read from the first sample."""
        images = manifest.images
        if images.shards is None:
            raise EncoderError(f"{self.spec}: reads the members of webdataset shard samples; {manifest.source} is "
                               "not a shard source")
        if self.modality == "text" and images.ids_written is not None:
            raise EncoderError(f"{self.spec}: caption rows are read per sample, which --id-field merges across "
                               "samples; build without --id-field")
        self._manifest = manifest
        self._last = None
        if self.modality == "text":
            rows = manifest.caption_image_rows()
            self._first_caption = np.searchsorted(rows, np.arange(len(images)), side="left")
        self.dim = 0
        probe = self.encode_rows(np.zeros(1, dtype=np.int64))
        self.dim = int(probe.shape[1])

    def _source_digest(self) -> str:
        if self._manifest is None:
            raise EncoderError(f"{self.spec}: no manifest bound (member teachers embed a build's own rows)")
        digest = hashlib.sha256(self._manifest.fingerprint().encode())
        columns = self._manifest.images.shards
        for shard in columns.shards:
            st = columns.stats.get(shard) or FileStat.of(shard)  # a shard at a URL: its indexed version
            digest.update(f"\n{st.name} {st.size} {st.mtime_ns} {st.version}".rstrip().encode())
        return digest.hexdigest()

    # ------------------------------------------------------------------ reading
    def encode(self, batch) -> np.ndarray:
        raise EncoderError(f"{self.spec}: embeds only the rows of the shards it was built from, not new "
                           f"{'texts' if self.modality == 'text' else 'images'}")

    def encode_rows(self, rows: np.ndarray) -> np.ndarray:
        """float32 [len(rows), dim]: image rows, or caption rows, of the bound manifest."""
        if self._manifest is None:
            raise EncoderError(f"{self.spec}: no manifest bound (member teachers embed a build's own rows)")
        out = [self._row(int(r)) for r in rows]
        if not out:
            return np.zeros((0, self.dim), dtype=np.float32)
        widths = {v.shape[0] for v in out}
        if len(widths) != 1 or (self.dim and widths != {self.dim}):
            raise EncoderError(f"{self.spec}: the {self.member.field} rows of the samples differ in width "
                               f"({sorted(widths | ({self.dim} if self.dim else set()))})")
        return np.stack(out).astype(np.float32, copy=False)

    def _row(self, row: int) -> np.ndarray:
        if self.modality == "image":
            array = self._array(row, ImageError)
            return array[0] if self.member.reduce == "first" else array.mean(axis=0)
        image_row = int(self._manifest.captions.image_rows[row])
        k = row - int(self._first_caption[image_row])
        array = self._array(image_row, EncoderError)
        if k >= len(array):
            where = self._where(image_row)
            raise EncoderError(f"{where}: caption {k + 1} of the sample has no row in {self.member.field} "
                               f"({len(array)} rows)")
        return array[k]

    def _where(self, image_row: int, member=None) -> str:
        member = member or self._manifest.images.member(image_row)
        return f"{member.shard}: sample {member.key!r} (image row {image_row})"

    def _array(self, image_row: int, error: type[Exception]) -> np.ndarray:
        """The sample's array; the last one read is kept, since a sample's caption rows come one after another."""
        if self._last is not None and self._last[0] == image_row:
            return self._last[1]
        member = self._manifest.images.member(image_row)
        where = self._where(image_row, member)
        found = self._members(member.shard, member.stat).get(member.key)
        if found is None:
            raise error(f"{where}: no {self.member.ext} member ({self.spec})")
        data = read_member(member.shard, *found, member.stat)
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
                if self.member.field not in arrays.files:
                    raise error(f"{where}: the {self.member.ext} member has no array {self.member.field!r} "
                                f"(it has {', '.join(arrays.files) or 'none'})")
                array = np.asarray(arrays[self.member.field], dtype=np.float32)
        except (ValueError, OSError, zipfile.BadZipFile) as exc:
            raise error(f"{where}: the {self.member.ext} member is not a readable .npz ({exc})") from None
        if array.ndim == 1:
            array = array[None, :]
        if array.ndim != 2 or not len(array):
            raise error(f"{where}: {self.member.field} has shape {array.shape}, expected [rows, dim]")
        self._last = (image_row, array)
        return array

    def _members(self, shard: str, stat: FileStat | None) -> dict[str, tuple[int, int]]:
        """key -> (offset, size) of each sample's member, from the shard's tar headers (read once, kept a while); a
        shard at a URL, from a ``pipe:`` command or compressed is scanned in its local copy in the shard cache."""
        if shard in self._maps:
            self._maps.move_to_end(shard)
            return self._maps[shard]
        if needs_cache(shard):
            with shard_cache().local_copy(shard, stat) as local:
                listing = scan_tar(str(local))
        else:
            listing = scan_tar(shard)
        found: dict[str, tuple[int, int]] = {}
        for key, positions, _, _ in group_samples(listing.names):
            position = positions.get(self.member.ext)
            if position is not None and key not in found:
                found[key] = (int(listing.offsets[position]), int(listing.sizes[position]))
        self._maps[shard] = found
        while len(self._maps) > _CACHED_SHARDS:
            self._maps.popitem(last=False)
        return found


def build_member_encoder(request: SpecRequest) -> ShardMemberEncoder:
    return ShardMemberEncoder(request.spec, request.modality, MemberSpec.parse(request.spec, request.body))
