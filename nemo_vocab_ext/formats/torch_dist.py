"""Read and write megatron-core's torch_dist checkpoint folders with torch alone.

A folder holds ``.metadata`` (a pickled ``torch.distributed.checkpoint`` Metadata: every key's
global shape, dtype and where each chunk lives), ``__<rank>_<i>.distcp`` data files, ``common.pt``
(megatron's non-sharded state) and ``metadata.json`` (the backend names).

Each tensor item in a ``.distcp`` file is a ``torch.save`` file of one chunk (or of more rows than
the chunk, which is then their leading rows: torch's loader narrows what it loads to the chunk, and a
resize points its kept rows at the source's chunks so, instead of copying them); byte entries
(``_extra_state`` blobs, megatron's ShardedObjects) are raw bytes. Entries are read lazily, one at a
time (tensors come back global, their chunks joined), never unpickled beyond the restricted
unpickler's allow-list. Output is streamed into one ``.distcp`` file: a tensor that comes from
another torch_dist checkpoint is copied chunk by chunk as stored, without decoding.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

from ..core.dtypes import DType
from ..entries import Deferred, Region, Stored, held, tensor_bytes, tensor_meta, write_order
from ..errors import CheckpointFormatError, OutputExistsError
from .byteio import FileRegion, InRegion, byte_prefix, link_or_copy
from .dcp_records import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    MemoryFormat,
    Metadata,
    MetadataIndex,
    StorageInfo,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
    dumps,
)
from .folder import DirOut, OutFolder
from .safe_pickle import restricted_unpickle
from .torch_pickle import MAX_DIMS, Layout, Size
from .torch_zip import StoredTensor, read_torch_file, write_torch_file

if TYPE_CHECKING:
    import torch

METADATA_FILE = ".metadata"
COMMON_FILE = "common.pt"
METADATA_JSON = "metadata.json"
DATA_FILE = "__0_0.distcp"  # one writer, one file, as megatron names rank 0's first file
DEFAULT_METADATA_JSON = json.dumps(
    {
        "sharded_backend": "torch_dist",
        "sharded_backend_version": 1,
        "common_backend": "torch",
        "common_backend_version": 1,
    }
).encode()

Entry = Union["torch.Tensor", bytes]
Resolve = Callable[[str], FileRegion]  # a data file's name in the folder -> where its bytes lie


@dataclass(frozen=True)
class TensorInfo:
    """A stored tensor's global shape and dtype, as ``.metadata`` records them."""

    shape: tuple[int, ...]
    dtype: DType


def parse_metadata(data: bytes, what: str) -> Metadata:
    """A ``.metadata`` file's records, each checked: keys are strings, every tensor record's chunks
    tile its shape exactly, and every storage record names a file and a byte range."""
    metadata = restricted_unpickle(data, what=what)
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise CheckpointFormatError(f"{what}: not a torch.distributed.checkpoint metadata file")
    if not isinstance(metadata.storage_data, dict):
        raise CheckpointFormatError(f"{what}: the storage records are missing")
    for key, md in metadata.state_dict_metadata.items():
        if not isinstance(key, str):
            raise CheckpointFormatError(f"{what}: an entry is named {key!r}, not a string")
        if isinstance(md, TensorStorageMetadata):
            _check_tensor_record(key, md, what)
        elif not isinstance(md, BytesStorageMetadata):
            raise CheckpointFormatError(f"{what}: entry {key!r} has unknown type {type(md).__name__}")
    for index, info in metadata.storage_data.items():
        ok = isinstance(index, MetadataIndex) and isinstance(info, StorageInfo) and isinstance(info.relative_path, str)
        transforms = info.transform_descriptors if ok else None
        if not ok or not _naturals(info.offset, info.length) or not isinstance(transforms, list | None):
            raise CheckpointFormatError(f"{what}: a storage record that is not a file name and a byte range")
    return metadata


def _naturals(*values: object) -> bool:
    return all(type(v) is int and v >= 0 for v in values)


def _dims(values: object) -> tuple[int, ...] | None:
    ok = isinstance(values, tuple | list) and len(values) <= MAX_DIMS and _naturals(*values)
    return tuple(values) if ok else None  # type: ignore[arg-type]


def _check_tensor_record(key: str, md: TensorStorageMetadata, what: str) -> None:
    """One tensor's record: known properties, and chunks that tile its global shape exactly."""
    p = md.properties
    ok = (
        isinstance(p, TensorProperties)
        and isinstance(p.dtype, DType)
        and isinstance(p.layout, Layout)
        and isinstance(p.memory_format, MemoryFormat)
        and isinstance(p.requires_grad, bool)
        and isinstance(p.pin_memory, bool)
    )
    if not ok:
        raise CheckpointFormatError(f"{what}: the properties of {key!r} are not a tensor's")
    shape = _dims(md.size)
    boxes = [_box(c, shape) for c in md.chunks] if isinstance(md.chunks, list) else []
    if shape is None or not boxes or None in boxes:
        raise CheckpointFormatError(
            f"{what}: the record of {key!r} has no valid shape and chunks (offsets and sizes, one per dimension)"
        )
    in_bounds = all(o[d] + s[d] <= shape[d] for o, s in boxes for d in range(len(shape)))  # type: ignore[misc]
    if not in_bounds or not _tiles(shape, boxes):  # type: ignore[arg-type]
        raise CheckpointFormatError(
            f"{what}: the stored chunks of {key!r} do not cover its shape {shape} exactly once (no gap, no overlap)"
        )


def _box(chunk: object, shape: tuple[int, ...] | None) -> Box | None:
    if not isinstance(chunk, ChunkStorageMetadata) or shape is None:
        return None
    offsets, sizes = _dims(chunk.offsets), _dims(chunk.sizes)
    ok = offsets is not None and sizes is not None and len(offsets) == len(sizes) == len(shape)
    return (offsets, sizes) if ok else None  # type: ignore[return-value]


Box = tuple[tuple[int, ...], tuple[int, ...]]  # a chunk's offsets and sizes


def _tiles(shape: tuple[int, ...], boxes: list[Box]) -> bool:
    """Whether ``boxes`` (inside ``shape``) cover every element of ``shape`` exactly once.

    Sweeps the first dimension: between consecutive chunk edges the same chunks are present, and
    their remaining dimensions must tile the rest of the shape. Sharded tensors are grids of chunks,
    so each chunk is looked at about once per dimension."""
    if not shape:
        return len(boxes) == 1  # a scalar: one chunk
    boxes = [b for b in boxes if math.prod(b[1])]  # empty chunks cover nothing
    if shape[0] == 0 or math.prod(shape) == 0:
        return not boxes
    edges = sorted({0, shape[0], *(o[0] for o, _ in boxes), *(o[0] + s[0] for o, s in boxes)})
    starts = sorted(boxes, key=lambda b: b[0][0])
    present: list[Box] = []
    i = 0
    for low in edges[:-1]:  # each band [low, next edge) holds the same chunks
        present = [b for b in present if b[0][0] + b[1][0] > low]
        while i < len(starts) and starts[i][0][0] == low:
            present.append(starts[i])
            i += 1
        if not _tiles(shape[1:], [(o[1:], s[1:]) for o, s in present]):
            return False
    return True


def read_metadata(ckpt_dir: str | Path) -> Metadata:
    """The folder's ``.metadata``, unpickled with the restricted unpickler."""
    path = Path(ckpt_dir) / METADATA_FILE
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointFormatError(f"{path}: cannot read the torch_dist metadata ({exc.strerror})") from None
    return parse_metadata(data, str(path))


def tensor_infos(metadata: Metadata) -> dict[str, TensorInfo]:
    return {
        key: TensorInfo(tuple(md.size), md.properties.dtype)
        for key, md in metadata.state_dict_metadata.items()
        if isinstance(md, TensorStorageMetadata)
    }


def read_tensor_infos(ckpt_dir: str | Path) -> dict[str, TensorInfo]:
    """Global shape and dtype of every tensor, from ``.metadata`` alone (no tensor data is read)."""
    return tensor_infos(read_metadata(ckpt_dir))


def list_keys(ckpt_dir: str | Path) -> list[str]:
    """Every stored key, tensors and byte entries, in stored order."""
    return list(read_metadata(ckpt_dir).state_dict_metadata)


@dataclass(frozen=True)
class DistChunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    item: FileRegion  # a torch.save file holding exactly this chunk


@dataclass(frozen=True, eq=False)
class DistTensor(Stored):
    """A global tensor stored as chunks; loading joins them."""

    key: str
    shape: tuple[int, ...]  # type: ignore[assignment]
    dtype: DType  # type: ignore[assignment]
    properties: TensorProperties
    chunks: tuple[DistChunk, ...]

    def chunk_tensor(self, chunk: DistChunk) -> StoredTensor:
        """The tensor stored for ``chunk``: of its shape, or with more rows (the chunk is its leading rows)."""
        value = read_torch_file(chunk.item, what=f"{chunk.item.path}: chunk {chunk.offsets} of {self.key!r}")
        if not isinstance(value, StoredTensor) or not _holds(value.shape, chunk.sizes) or value.dtype != self.dtype:
            raise CheckpointFormatError(
                f"{chunk.item.path}: chunk {chunk.offsets} of {self.key!r} does not hold a {self.dtype} tensor of "
                f"shape {chunk.sizes}"
            )
        return value

    def chunk_raw(self, chunk: DistChunk) -> list[Region] | None:
        """The chunk's bytes where they lie (C order), None if they must be decoded."""
        raw = self.chunk_tensor(chunk).raw()
        return None if raw is None else byte_prefix(raw, math.prod(chunk.sizes) * self.dtype.itemsize)

    def leading_rows(self, rows: int) -> list[DistChunk] | None:
        """Chunks that hold exactly the first ``rows`` rows (each its stored tensor's leading rows), or
        None when the chunks split more than the first dimension."""
        if not self.shape or not _row_blocks(self.chunks, self.shape):
            return None
        return [
            DistChunk(c.offsets, (min(c.sizes[0], rows - c.offsets[0]), *c.sizes[1:]), c.item)
            for c in self.chunks
            if c.offsets[0] < rows
        ]

    def load(self) -> torch.Tensor:
        import torch

        # Every chunk checked against its file first: a shape no stored bytes back is never allocated.
        chunks = [(chunk, self.chunk_tensor(chunk)) for chunk in self.chunks]
        out = torch.empty(self.shape, dtype=self.dtype.torch)
        for chunk, stored in chunks:
            target = out[tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes, strict=False))]
            raw = self.chunk_raw(chunk)
            if raw is not None and target.is_contiguous():
                raw[0].read_into(tensor_bytes(target))  # straight into place: no intermediate copy
            else:
                target.copy_(stored.load()[: chunk.sizes[0]] if chunk.sizes else stored.load())
        return out

    def raw(self) -> list[Region] | None:
        # Chunks that split only the first dimension, in order, are the tensor's bytes back to back.
        if not _row_blocks(self.chunks, self.shape):
            return None
        regions: list[Region] = []
        for chunk in sorted(self.chunks, key=lambda c: c.offsets):
            raw = self.chunk_raw(chunk)
            if raw is None:
                return None
            regions.extend(raw)
        return regions

    def identity(self) -> Hashable:
        return tuple(c.item for c in self.chunks)


def _holds(stored: tuple[int, ...], sizes: tuple[int, ...]) -> bool:
    """Whether a stored tensor of shape ``stored`` holds a chunk of ``sizes`` as its leading rows."""
    return stored == sizes or (len(stored) == len(sizes) > 0 and stored[1:] == sizes[1:] and stored[0] >= sizes[0])


def _row_blocks(chunks: Iterable[DistChunk], shape: tuple[int, ...]) -> bool:
    """Whether ``chunks`` split only the first dimension of ``shape``, back to back from row 0."""
    if not shape:
        return True  # a scalar: its one chunk
    row = 0
    for chunk in sorted(chunks, key=lambda c: c.offsets):
        if chunk.offsets[0] != row or tuple(chunk.offsets[1:]) != (0,) * (len(shape) - 1):
            return False
        if tuple(chunk.sizes[1:]) != shape[1:]:
            return False
        row += chunk.sizes[0] if chunk.sizes else 1
    return True


@dataclass(frozen=True, eq=False)
class DistBytes(InRegion):
    """A byte entry, kept exactly as stored."""

    region: FileRegion
    shape = None
    dtype = None


def dist_entries(metadata: Metadata, resolve: Resolve, where: str) -> dict[str, Stored]:
    """Every entry of a torch_dist checkpoint, lazily; ``resolve`` finds the data files."""
    files: dict[str, FileRegion] = {}

    def item(index: MetadataIndex) -> FileRegion:
        info = metadata.storage_data.get(index) if isinstance(metadata.storage_data, dict) else None
        if not isinstance(info, StorageInfo):
            raise CheckpointFormatError(f"{where}/{METADATA_FILE}: no storage record for {index.fqn!r} {index.offset}")
        if info.transform_descriptors:
            raise CheckpointFormatError(
                f"{where}: {index.fqn!r} is stored with transforms {list(info.transform_descriptors)}; not supported"
            )
        if info.relative_path not in files:
            files[info.relative_path] = resolve(info.relative_path)
        return files[info.relative_path].sub(info.offset, info.length)

    entries: dict[str, Stored] = {}
    for key, md in metadata.state_dict_metadata.items():  # records checked by parse_metadata
        if isinstance(md, TensorStorageMetadata):
            chunks = tuple(
                DistChunk(tuple(c.offsets), tuple(c.sizes), item(MetadataIndex(key, c.offsets))) for c in md.chunks
            )
            entries[key] = DistTensor(key, tuple(md.size), md.properties.dtype, md.properties, chunks)
        else:
            entries[key] = DistBytes(item(MetadataIndex(key)))
    return entries


def _file_region(ckpt_dir: Path) -> Resolve:
    def resolve(name: str) -> FileRegion:
        path = ckpt_dir / name
        if "/" in name or name.startswith(".") or not path.is_file():
            raise CheckpointFormatError(f"{ckpt_dir}: data file {name!r} is missing; the checkpoint is incomplete")
        return FileRegion(path, 0, path.stat().st_size)

    return resolve


def open_torch_dist(ckpt_dir: str | Path) -> dict[str, Stored]:
    """A torch_dist folder's entries, read only when loaded."""
    ckpt_dir = Path(ckpt_dir)
    return dist_entries(read_metadata(ckpt_dir), _file_region(ckpt_dir), str(ckpt_dir))


def read_torch_dist(ckpt_dir: str | Path, keys: Iterable[str] | None = None) -> dict[str, Entry]:
    """Global tensors (chunks joined) and raw byte entries, read now; only ``keys`` if given."""
    entries = open_torch_dist(ckpt_dir)
    wanted = list(entries) if keys is None else list(dict.fromkeys(keys))
    missing = [k for k in wanted if k not in entries]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointFormatError(f"{ckpt_dir}: no such entries in the checkpoint: {shown}")
    return {k: entries[k].load() for k in wanted}


def write_torch_dist(
    ckpt_dir: str | Path | OutFolder,
    tensors: Mapping[str, object],
    *,
    common: bytes,
    metadata_json: bytes | None = None,
    link_unchanged: bool = False,
    hard_link_unchanged: bool = False,
    data_file: str = DATA_FILE,
) -> None:
    """Write a torch_dist folder that megatron-core's ``dist_checkpointing.load`` reads, one entry at a time.

    Tensors are written whole (one chunk each) unless they come from another torch_dist checkpoint,
    whose chunks are copied as stored. ``bytes`` values are written as given: for megatron to load
    one it must be what megatron writes for a ShardedObject, ``torch.save([data])``. ``common`` is
    the exact content of ``common.pt``. A folder path must be new or empty.

    ``link_unchanged`` (folders on disk only): entries of another torch_dist checkpoint are not
    copied; the folder gets a symlink to each file that holds them (a .distcp file, or a whole
    .nemo archive) and the metadata points at their bytes where they lie. Only changed entries are
    written. The folder then reads correctly only while those files exist. A resized table
    (:class:`~..entries.Deferred` kept from a torch_dist entry) refers to its kept rows in the source's
    chunks, and only its computed rows are written. Linked chunks are not read: their bytes are the
    source's, unchanged.

    ``hard_link_unchanged`` (folders on disk only): the same for entries in another folder's ``.distcp``
    files (others are copied), but each such file gets a hard link under its own name (a copy where
    the file system cannot link, e.g. across file systems), so the folder stands alone. The linked
    files share their inode with the source's: neither may be modified in place afterwards. Changed
    entries go to ``data_file``, which must not be one of those names.
    """
    if not isinstance(ckpt_dir, OutFolder):
        path = Path(ckpt_dir)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            # Stale .distcp files from another checkpoint would sit beside ours unnoticed.
            raise OutputExistsError(f"{path}: exists and is not an empty folder; refusing to write a checkpoint there")
        path.mkdir(parents=True, exist_ok=True)
        folder: OutFolder = DirOut(path)
    else:
        folder = ckpt_dir
    # Keys keep their order in the metadata; data is written in write_order (computed entries last).
    state: dict[str, TensorStorageMetadata | BytesStorageMetadata] = dict.fromkeys(tensors)  # type: ignore[assignment]
    storage: dict[MetadataIndex, StorageInfo] = {}
    links: dict[Path, str] = {}  # a file holding unchanged bytes -> its link's name in the folder
    linking = (link_unchanged or hard_link_unchanged) and isinstance(folder, DirOut)

    with folder.file(data_file) as out:

        def place(region: FileRegion, check: Callable[[], object] = lambda: None) -> StorageInfo:
            """Copy ``region`` into the data file (``check`` it first), or (linking) point at it where it lies."""
            # Hard links only to data files: the bytes of a .nemo archive are copied out of it.
            if linking and (not hard_link_unchanged or region.path.suffix == ".distcp"):
                name = links.get(region.path) or (
                    region.path.name if hard_link_unchanged else f"linked_{len(links)}_{region.path.name}"
                )
                if name != data_file and (region.path in links or name not in links.values()):
                    links[region.path] = name
                    return StorageInfo(name, region.offset, region.length)
            check()  # not linked (a name already taken by two source files of one name): copied, so read
            start = out.tell()
            out.copy_from(region)
            return StorageInfo(data_file, start, region.length)

        def place_chunks(key: str, value: DistTensor, chunks: Iterable[DistChunk]) -> list[ChunkStorageMetadata]:
            # A linked chunk is the source's own bytes, left as they are; a copied one is checked to
            # hold its tensor first.
            for chunk in chunks:
                check = functools.partial(value.chunk_tensor, chunk)
                storage[MetadataIndex(key, Size(chunk.offsets))] = place(chunk.item, check)
            return [ChunkStorageMetadata(Size(c.offsets), Size(c.sizes)) for c in chunks]

        for key in write_order(tensors, lambda k: held(tensors, k)):
            value = held(tensors, key)
            if isinstance(value, DistTensor):
                chunks = place_chunks(key, value, value.chunks)
                state[key] = TensorStorageMetadata(value.properties, Size(value.shape), chunks)
                continue
            if (
                linking
                and isinstance(value, Deferred)
                and isinstance(value.kept_from, DistTensor)
                and (kept := value.kept_from.leading_rows(value.kept_rows)) is not None
            ):
                # A resized table: its kept rows stay in the source's chunks (linked), its computed
                # rows are one new chunk after them.
                chunks = place_chunks(key, value.kept_from, kept)
                rest = value.computed_rows()
                if rest.shape[0]:
                    offsets = Size([value.kept_rows, *[0] * (len(value.shape) - 1)])
                    start = out.tell()
                    write_torch_file(rest, out)
                    storage[MetadataIndex(key, offsets)] = StorageInfo(data_file, start, out.tell() - start)
                    chunks.append(ChunkStorageMetadata(offsets, Size(rest.shape)))
                state[key] = TensorStorageMetadata(TensorProperties(dtype=value.dtype), Size(value.shape), chunks)
                continue
            if isinstance(value, DistBytes):
                storage[MetadataIndex(key)] = place(value.region)
                state[key] = BytesStorageMetadata()
                continue
            if isinstance(value, Stored) and value.shape is None:
                start = out.tell()
                out.put(value.parts())
                storage[MetadataIndex(key)] = StorageInfo(data_file, start, out.tell() - start)
                state[key] = BytesStorageMetadata()
                continue
            meta = tensor_meta(tensors, key)
            start = out.tell()
            if meta is not None:  # in memory, or stored elsewhere (copied without decoding when it can be)
                write_torch_file(value, out)
                shape = Size(meta[0])
                offsets = Size([0] * len(shape))
                storage[MetadataIndex(key, offsets)] = StorageInfo(data_file, start, out.tell() - start)
                state[key] = TensorStorageMetadata(
                    TensorProperties(dtype=meta[1]), shape, [ChunkStorageMetadata(offsets, shape)]
                )
                continue
            loaded = tensors[key]
            if isinstance(loaded, bytes | bytearray):
                out.write(loaded)
                storage[MetadataIndex(key)] = StorageInfo(data_file, start, len(loaded))
                state[key] = BytesStorageMetadata()
            elif loaded is None:
                raise CheckpointFormatError(
                    f"'{key}' is None: only single-file layouts store empty _extra_state entries"
                )
            else:
                raise TypeError(f"{key}: expected a tensor or bytes, got {type(loaded).__name__}")
    if links:
        assert isinstance(folder, DirOut)
        for target, name in links.items():
            if hard_link_unchanged:
                link_or_copy(target, folder.path / name)
            else:
                (folder.path / name).symlink_to(target.resolve())
    import uuid  # only here: it imports platform (5 ms of every command's start-up)

    metadata = Metadata(
        state_dict_metadata=state,  # type: ignore[arg-type]
        storage_data=storage,
        storage_meta=StorageMeta(checkpoint_id=str(folder), save_id=str(uuid.uuid4())),
    )
    # megatron reads mcore_data with getattr(..., {}); empty dicts = no N-D reformulation, as
    # megatron writes for plain model tensors. A plain attribute keeps the pickle torch-only.
    metadata.mcore_data = {k: {} for k, md in state.items() if isinstance(md, TensorStorageMetadata)}  # type: ignore[attr-defined]
    folder.write_bytes(METADATA_FILE, dumps(metadata))
    folder.write_bytes(COMMON_FILE, common)
    # Last: megatron recognises a checkpoint folder by metadata.json, so a crash before this point
    # leaves a folder that is not mistaken for a complete checkpoint.
    folder.write_bytes(METADATA_JSON, DEFAULT_METADATA_JSON if metadata_json is None else metadata_json)
