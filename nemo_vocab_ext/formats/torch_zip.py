"""``torch.save`` files read lazily: the pickle now, each tensor's bytes only when asked.

A ``torch.save`` file is a zip whose records are stored uncompressed: ``<name>/data.pkl`` (the
object, with tensors as references to storages) and ``<name>/data/<key>`` (each storage's raw
bytes). The pickle is unpickled by the restricted unpickler of :mod:`.safe_pickle` (the names
torch's weights-only unpickler allows, plus its allow-list), with each tensor rebuilt as a
:class:`StoredTensor` that knows where its bytes lie: nothing but the pickle is read, and torch is
not imported until a tensor's values are asked for. Writing is the reverse, through
:class:`.torch_pickle.TorchPickler`.
"""

from __future__ import annotations

import io
import math
import struct
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from ..core.dtypes import UINT8, DType, dtype_of
from ..entries import Stored, entry_parts, is_tensor, same_bytes_key, write_order
from ..errors import CheckpointFormatError
from . import torch_pickle
from .byteio import FileRegion, OutFile, read_tensor
from .safe_pickle import Resolve, config_global, restricted_loads
from .torch_pickle import MAX_DIMS, TORCH_OBJECTS, TORCH_UTILS, BadRecord, StorageType

_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # a zip local file header, before its name and extra field


@dataclass(frozen=True, eq=False)
class StoredTensor(Stored):
    """A tensor of a ``torch.save`` file: a view (offset, shape, stride) of one storage record."""

    record: FileRegion
    dtype: DType  # type: ignore[assignment]
    shape: tuple[int, ...]  # type: ignore[assignment]
    stride: tuple[int, ...]
    storage_offset: int

    def _dense(self) -> FileRegion | None:
        expected, contiguous = 1, True
        for size, stride in zip(reversed(self.shape), reversed(self.stride), strict=False):
            if size != 1 and stride != expected:
                contiguous = False
            expected *= size
        if not contiguous:
            return None
        return self.record.sub(self.storage_offset * self.dtype.itemsize, self.nbytes)

    def raw(self) -> list[FileRegion] | None:
        dense = self._dense()
        return None if dense is None else [dense]

    def load(self) -> Any:
        dense = self._dense()
        if dense is not None:
            return read_tensor(dense, self.dtype, self.shape)
        numel = self.record.length // self.dtype.itemsize
        storage = read_tensor(self.record.sub(0, numel * self.dtype.itemsize), self.dtype, (numel,))
        # A strided view: keep only its own elements, not the whole storage.
        return storage.as_strided(self.shape, self.stride, self.storage_offset).clone()

    def identity(self) -> Hashable:
        return (self.record, self.dtype, self.shape, self.stride, self.storage_offset)


def _record_regions(container: FileRegion, what: str) -> tuple[str, dict[str, FileRegion]]:
    """The archive's record prefix and where each record's bytes lie."""
    regions: dict[str, FileRegion] = {}
    with container.open() as f:
        try:
            infos = zipfile.ZipFile(f).infolist()  # type: ignore[arg-type]
        # NotImplementedError: a zip version zipfile does not know
        except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError) as exc:
            raise CheckpointFormatError(f"{what}: not a torch.save file ({exc})") from None
        for info in infos:
            if info.compress_type != zipfile.ZIP_STORED:
                raise CheckpointFormatError(f"{what}: record {info.filename} is compressed; torch.save never does that")
            f.seek(info.header_offset)
            header = f.read(_LOCAL_HEADER.size)
            if len(header) != _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
                raise CheckpointFormatError(f"{what}: damaged zip header for {info.filename}")
            name_len, extra_len = _LOCAL_HEADER.unpack(header)[-2:]
            start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
            regions[info.filename] = container.sub(start, info.file_size)
    pickles = [name for name in regions if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(pickles) != 1:
        raise CheckpointFormatError(f"{what}: not a torch.save file (no data.pkl)")
    prefix = pickles[0][: -len("data.pkl")]
    byteorder = regions.get(prefix + "byteorder")
    if byteorder is not None and byteorder.read() != b"little":
        raise CheckpointFormatError(f"{what}: saved on a big-endian machine; not supported")
    return prefix, regions


@dataclass(frozen=True)
class _Storage:
    """A storage record of the file, as the pickle's persistent ids name it."""

    region: FileRegion
    dtype: DType | None  # None: untyped, counted in bytes


def _rebuild_tensor_v2(
    storage: Any, storage_offset: Any, size: Any, stride: Any, *_grad_hooks_metadata: Any
) -> StoredTensor:
    if not isinstance(storage, _Storage):
        raise BadRecord("a tensor not rebuilt from one of the file's storages")
    return _stored_tensor(storage, storage_offset, size, stride, storage.dtype or UINT8)


def _rebuild_tensor_v3(
    storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any, dtype: Any, *_: Any
) -> StoredTensor:
    """Tensors of dtypes without a typed storage (float8): an untyped storage and the dtype."""
    if not isinstance(storage, _Storage) or not isinstance(dtype, DType) or storage.dtype not in (None, dtype):
        raise BadRecord("a tensor whose element type is not its storage's")
    return _stored_tensor(storage, storage_offset, size, stride, dtype)


def _rebuild_parameter(data: Any, *_grad_hooks_state: Any) -> Any:
    if not isinstance(data, StoredTensor):
        raise BadRecord("a parameter that holds no tensor")
    return data  # an nn.Parameter: its data is what a checkpoint keeps


_INT64_MAX = 2**63 - 1  # what torch's sizes, strides and offsets fit in


def _dims(values: Any) -> tuple[int, ...] | None:
    if not isinstance(values, tuple | list) or len(values) > MAX_DIMS:
        return None
    if not all(type(v) is int and 0 <= v <= _INT64_MAX for v in values):
        return None
    return tuple(values)


def _stored_tensor(storage: _Storage, offset: Any, size: Any, stride: Any, dtype: DType) -> StoredTensor:
    """A tensor record, checked: every element it views lies in its storage, and it views no more
    elements than the storage holds (so reading it needs no more memory than the file has)."""
    shape, strides = _dims(size), _dims(stride)
    if shape is None or strides is None or len(shape) != len(strides) or type(offset) is not int or offset < 0:
        raise BadRecord(f"a tensor record with shape {size!r}, stride {stride!r}, offset {offset!r}")
    numel = math.prod(shape)
    extent = 0 if numel == 0 else 1 + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
    if max(offset + extent, numel) * dtype.itemsize > storage.region.length:
        raise BadRecord(
            f"a {dtype} tensor of shape {shape} (stride {strides}, offset {offset}) reaches past its "
            f"{storage.region.length}-byte storage"
        )
    return StoredTensor(storage.region, dtype, shape, strides, offset)


# What a torch.save pickle may name: torch's objects as stand-ins, the tensor rebuilders, config types.
TORCH_FILE_GLOBALS: dict[tuple[str, str], Any] = {
    **TORCH_OBJECTS,
    (TORCH_UTILS, "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    (TORCH_UTILS, "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    (TORCH_UTILS, "_rebuild_parameter"): _rebuild_parameter,
    (TORCH_UTILS, "_rebuild_parameter_with_state"): _rebuild_parameter,
}


def _torch_file_global(module: str, name: str) -> Any:
    return TORCH_FILE_GLOBALS.get((module, name)) or config_global(module, name)


torch_pickle.register_name(_rebuild_tensor_v2, TORCH_UTILS, "_rebuild_tensor_v2")
torch_pickle.register_name(_rebuild_tensor_v3, TORCH_UTILS, "_rebuild_tensor_v3")


def read_torch_file(container: FileRegion, *, what: str, also_allowed: Resolve | None = None) -> Any:
    """The saved object, each tensor replaced by a :class:`StoredTensor` (nothing but the pickle is read).

    ``also_allowed`` resolves names beyond the usual set, for a file known to hold more (a Megatron
    run's ``common.pt``)."""
    prefix, regions = _record_regions(container, what)

    storages: dict[str, _Storage] = {}

    def persistent_load(saved_id: Any) -> _Storage:
        if not isinstance(saved_id, tuple) or len(saved_id) != 5 or saved_id[0] != "storage":
            raise CheckpointFormatError(f"{what}: unknown persistent id in data.pkl")
        _, storage_type, key, _location, numel = saved_id
        if not isinstance(storage_type, StorageType) or not isinstance(key, str) or type(numel) is not int:
            raise CheckpointFormatError(f"{what}: malformed storage reference in data.pkl")
        itemsize = (storage_type.dtype or UINT8).itemsize  # an untyped storage counts bytes
        region = regions.get(f"{prefix}data/{key}")
        if region is None:
            raise CheckpointFormatError(f"{what}: storage record data/{key} is missing")
        if region.length != numel * itemsize:
            raise CheckpointFormatError(
                f"{what}: storage record data/{key} holds {region.length} bytes, not the {numel} elements of "
                f"{itemsize} bytes that data.pkl declares"
            )
        storage = storages.setdefault(key, _Storage(region, storage_type.dtype))
        if storage.dtype != storage_type.dtype:
            raise CheckpointFormatError(f"{what}: storage record data/{key} is named with two element types")
        return storage

    data = regions[prefix + "data.pkl"].read()

    def allowed(module: str, name: str) -> Any:
        found = _torch_file_global(module, name)
        return found if found is not None or also_allowed is None else also_allowed(module, name)

    return restricted_loads(data, allowed, what=what, persistent_load=persistent_load)


def load_all(value: Any) -> Any:
    """``value`` with every :class:`StoredTensor` read into memory (for small objects only)."""
    return map_leaves(value, lambda leaf: leaf.load() if isinstance(leaf, Stored) else leaf)


# --- writing, one tensor at a time -----------------------------------------------------------------

_ALIGN = 64  # torch aligns record data to 64 bytes (what mmap loading needs)
_ZIP64_LIMIT = 0xFFFFFFFF  # sizes and offsets from here on need zip64 records
_SENTINEL = 0xFFFFFFFF  # what a 32-bit field reads when the value is in the zip64 extra field
_DOS_DATE = 0x21  # 1980-01-01: reproducible archives


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: DType
    numel: int

    def persistent_id(self) -> tuple[Any, ...]:
        # Dtypes without a typed storage (float8) are saved untyped, counted in bytes, as torch does.
        if self.dtype.storage is None:
            return ("storage", StorageType(None), self.key, "cpu", self.numel * self.dtype.itemsize)
        return ("storage", StorageType(self.dtype), self.key, "cpu", self.numel)


class _TensorRef:
    """Pickles exactly as torch.save pickles a contiguous tensor that owns its storage."""

    def __init__(self, storage: _StorageRef, shape: tuple[int, ...]):
        self.storage = storage
        self.shape = shape

    def __reduce__(self) -> tuple[Any, ...]:
        stride, step = [], 1
        for size in reversed(self.shape):
            stride.append(step)
            step *= size
        args: tuple[Any, ...] = (self.storage, 0, self.shape, tuple(reversed(stride)), False, OrderedDict())
        if self.storage.dtype.storage is None:
            return (_rebuild_tensor_v3, (*args, self.storage.dtype))
        return (_rebuild_tensor_v2, args)


def _persistent_id(obj: Any) -> Any:
    return obj.persistent_id() if isinstance(obj, _StorageRef) else None


class _ZipOut:
    """A zip of stored (uncompressed) records written front to back, zip64 where sizes need it."""

    def __init__(self, out: OutFile, prefix: str):
        self.out = out
        self.prefix = prefix
        self.start = out.tell()
        self.central: list[bytes] = []

    def record(self, name: str, size: int, crc: int, write: Any) -> None:
        full = (self.prefix + name).encode()
        offset = self.out.tell() - self.start
        zip64 = size >= _ZIP64_LIMIT or offset >= _ZIP64_LIMIT
        extra = struct.pack("<HHQQ", 1, 16, size, size) if zip64 else b""
        header_len = _LOCAL_HEADER.size + len(full) + len(extra)
        pad = -(offset + header_len + 4) % _ALIGN
        extra += struct.pack("<HH", 0x4246, pad) + b"\0" * pad  # alignment padding, as torch writes it
        # In zip64 records every size and offset field reads 0xFFFFFFFF and the real values follow in the extra field.
        small = _SENTINEL if zip64 else size
        version = 45 if zip64 else 20
        self.out.write(
            _LOCAL_HEADER.pack(b"PK\x03\x04", version, 0, 0, 0, _DOS_DATE, crc, small, small, len(full), len(extra))
        )
        self.out.write(full + extra)
        written = self.out.tell()
        write(self.out)
        if self.out.tell() - written != size:
            raise CheckpointFormatError(f"record {name}: wrote {self.out.tell() - written} bytes, expected {size}")
        central_extra = struct.pack("<HHQQQ", 1, 24, size, size, offset) if zip64 else b""
        self.central.append(
            struct.pack(
                "<4s6H3I5H2I",
                b"PK\x01\x02",
                version,
                version,
                0,
                0,
                0,
                _DOS_DATE,
                crc,
                small,
                small,
                len(full),
                len(central_extra),
                0,
                0,
                0,
                0,
                _SENTINEL if zip64 else offset,
            )
            + full
            + central_extra
        )

    def data(self, name: str, data: bytes) -> None:
        self.record(name, len(data), zlib.crc32(data), lambda out: out.write(data))

    def close(self) -> None:
        cd_offset = self.out.tell() - self.start
        for entry in self.central:
            self.out.write(entry)
        cd_size = self.out.tell() - self.start - cd_offset
        count = len(self.central)
        zip64 = cd_offset >= _ZIP64_LIMIT or count >= 0xFFFF
        if zip64:
            eocd64_offset = self.out.tell() - self.start
            self.out.write(struct.pack("<4sQ2H2I4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, cd_size, cd_offset))
            self.out.write(struct.pack("<4sIQI", b"PK\x06\x07", 0, eocd64_offset, 1))
        self.out.write(
            struct.pack(
                "<4s4H2IH",
                b"PK\x05\x06",
                0,
                0,
                min(count, 0xFFFF),
                min(count, 0xFFFF),
                cd_size,
                _SENTINEL if zip64 else cd_offset,
                0,
            )
        )


def write_torch_file(obj: Any, out: OutFile, *, name: str = "archive") -> None:
    """What ``torch.save(obj)`` writes, with tensors written one at a time as they are read.

    Tensors may be in memory or :class:`Stored` entries of another file (copied without decoding when
    their bytes are stored as needed). Tensors that are the same stored bytes are written once.
    """
    tensors: list[tuple[_StorageRef, Any]] = []
    by_identity: dict[Hashable, _TensorRef] = {}

    def ref(value: Any) -> Any:
        if isinstance(value, Stored) and value.shape is None:
            return value.load()  # a byte blob: small, pickled in place
        if isinstance(value, Stored):
            assert value.dtype is not None and value.shape is not None
            dtype, shape = value.dtype, value.shape
        else:
            dtype, shape = dtype_of(value.dtype), tuple(value.shape)
        ident = same_bytes_key(value)
        if ident not in by_identity:
            storage = _StorageRef(str(len(tensors)), dtype, math.prod(shape))
            tensors.append((storage, value))
            by_identity[ident] = _TensorRef(storage, shape)
        return by_identity[ident]

    pickled = torch_pickle.dumps(map_leaves(obj, ref), persistent_id=_persistent_id)
    zf = _ZipOut(out, f"{name}/")
    zf.data("data.pkl", pickled)
    zf.data(".format_version", b"1")
    zf.data(".storage_alignment", str(_ALIGN).encode())
    zf.data("byteorder", b"little")
    # Storage records in any order (torch finds them by name): values still being computed last.
    for storage, value in write_order(tensors, lambda item: item[1]):
        nbytes = storage.numel * storage.dtype.itemsize
        zf.record(f"data/{storage.key}", nbytes, 0, lambda o, v=value: _write_tensor(v, o))
    zf.data("version", b"3\n")
    zf.data(".data/serialization_id", b"0" * 40)
    zf.close()


def torch_file_bytes(obj: Any) -> bytes:
    """What ``torch.save(obj)`` writes, in memory (for small objects: ``common.pt``)."""
    buffer = io.BytesIO()
    write_torch_file(obj, OutFile(buffer))
    return buffer.getvalue()


def _write_tensor(value: Any, out: OutFile) -> None:
    out.put(entry_parts(value))


def map_leaves(value: Any, fn: Any, done: dict[int, Any] | None = None) -> Any:
    """A copy of ``value``'s dicts, lists and tuples with tensor leaves (in memory or stored) mapped by ``fn``.
    A container held in several places is copied once (walking it each time could take exponential time)."""
    if isinstance(value, Stored) or is_tensor(value):
        return fn(value)
    if not isinstance(value, dict | list | tuple) or hasattr(value, "_fields"):
        return value
    done = {} if done is None else done
    if id(value) not in done:
        if isinstance(value, dict):
            copy = value.copy()
            for k in copy:
                copy[k] = map_leaves(copy[k], fn, done)
            done[id(value)] = copy
        else:
            mapped = (map_leaves(v, fn, done) for v in value)
            done[id(value)] = list(mapped) if isinstance(value, list) else tuple(mapped)
    return done[id(value)]
