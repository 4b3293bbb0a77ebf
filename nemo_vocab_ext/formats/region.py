"""Entries that stay on disk until asked for, and the byte moves that serve them.

Every reader describes each stored entry by where its bytes lie (a :class:`FileRegion`) instead of
loading it. A writer then either loads one entry at a time, or, when the bytes it needs are exactly
the stored ones, copies them file to file without decoding (``copy_file_range``: in the kernel, as
``cp`` does). Either way at most one entry is in memory.
"""

from __future__ import annotations

import abc
import functools
import math
import os
import sys
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from ..core.dtypes import DType, dtype_of
from ..errors import CheckpointFormatError

if TYPE_CHECKING:
    import numpy as np
    import torch

T = TypeVar("T")

_CHUNK = 64 << 20  # bounded user-space buffer where the kernel cannot copy for us


@dataclass(frozen=True)
class FileRegion:
    """``length`` bytes of ``path`` starting at ``offset``."""

    path: Path
    offset: int
    length: int

    def sub(self, offset: int, length: int) -> FileRegion:
        if offset < 0 or length < 0 or offset + length > self.length:
            raise CheckpointFormatError(
                f"{self.path}: a record at [{offset}, {offset + length}) lies outside its {self.length}-byte "
                "container; the file is truncated or damaged"
            )
        return FileRegion(self.path, self.offset + offset, length)

    def read(self) -> bytes:
        out = bytearray(self.length)
        self.read_into(memoryview(out))
        return bytes(out)

    def read_into(self, buffer: memoryview) -> None:
        """Fill ``buffer`` (exactly ``length`` bytes) from the file."""
        if len(buffer) != self.length:
            raise ValueError(f"buffer of {len(buffer)} bytes for a {self.length}-byte region")
        with open(self.path, "rb", buffering=0) as f:
            done = 0
            while done < self.length:
                n = os.preadv(f.fileno(), [buffer[done : done + _CHUNK]], self.offset + done)
                if n == 0:
                    raise CheckpointFormatError(
                        f"{self.path}: ends at byte {self.offset + done}, inside data that should run to "
                        f"{self.offset + self.length}; the file is truncated"
                    )
                done += n

    def open(self) -> RegionReader:
        return RegionReader(self)


Part = FileRegion | memoryview  # what OutFile.put appends: a file's bytes where they lie, or bytes in memory


class RegionReader:
    """A read-only, seekable file over one region (what ``zipfile`` needs to read a nested archive)."""

    def __init__(self, region: FileRegion):
        self.region = region
        self._f: BinaryIO = open(region.path, "rb")  # noqa: SIM115 - closed by close()
        self._pos = 0

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self.region.length}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, n: int = -1) -> bytes:
        end = self.region.length if n is None or n < 0 else min(self.region.length, self._pos + n)
        if end <= self._pos:
            return b""
        self._f.seek(self.region.offset + self._pos)
        data = self._f.read(end - self._pos)
        self._pos += len(data)
        return data

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> RegionReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_tensor(value: object) -> bool:
    """Whether ``value`` is a torch tensor, without importing torch (no tensor exists before it is;
    another thread may be importing it, so its module may not define ``Tensor`` yet)."""
    tensor_type = getattr(sys.modules.get("torch"), "Tensor", None)
    return tensor_type is not None and isinstance(value, tensor_type)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A contiguous tensor's bytes, without a copy."""
    import torch

    flat = t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)
    return array_bytes(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def array_bytes(values: np.ndarray) -> memoryview:
    """An array's bytes in C order (without a copy when it is C-contiguous)."""
    import numpy as np

    return memoryview(np.ascontiguousarray(values).reshape(-1).view(np.uint8))  # type: ignore[arg-type]


def read_tensor(region: FileRegion, dtype: DType, shape: tuple[int, ...]) -> torch.Tensor:
    """A new tensor filled straight from the file (no intermediate buffer); the first use of torch."""
    import torch

    t = torch.empty(shape, dtype=dtype.torch)
    region.read_into(tensor_bytes(t))
    return t


def torch_as_array(t: torch.Tensor) -> np.ndarray:
    """A tensor's elements as a numpy array of :attr:`DType.numpy` (bfloat16: its bits); a view when it can be."""
    import numpy as np

    cpu = t.detach().cpu()
    return np.frombuffer(tensor_bytes(cpu), dtype=dtype_of(cpu.dtype).numpy).reshape(tuple(cpu.shape))


def array_as_torch(values: np.ndarray, dtype: DType) -> torch.Tensor:
    """The tensor of ``dtype`` whose elements are ``values`` (as :func:`torch_as_array` gives them), sharing memory."""
    import numpy as np
    import torch

    flat = np.ascontiguousarray(values).reshape(-1)
    if not flat.flags.writeable:  # torch warns on read-only memory; a computed table is small next to the model
        flat = flat.copy()
    return torch.from_numpy(flat.view(np.uint8)).view(dtype.torch).reshape(values.shape)


def read_array(value: Stored | torch.Tensor, out: np.ndarray | None = None) -> np.ndarray:
    """A tensor entry's elements as a numpy array (see :func:`torch_as_array`), in ``out`` when given (a
    C-contiguous array of the entry's shape and element type); an entry whose bytes lie in the file as
    stored is read straight into it, without torch."""
    import numpy as np

    if not (isinstance(value, Stored) and (raw := value.raw()) is not None):
        values = torch_as_array(value.load() if isinstance(value, Stored) else value)  # type: ignore[arg-type]
        if out is None:
            return values
        _check_fits(out, values.shape, values.dtype)
        out[...] = values
        return out
    assert value.shape is not None and value.dtype is not None
    if out is None:
        out = np.empty(value.shape, dtype=value.dtype.numpy)
    _check_fits(out, value.shape, np.dtype(value.dtype.numpy))
    view = array_bytes(out)
    done = 0
    for region in raw:
        region.read_into(view[done : done + region.length])
        done += region.length
    return out


def _check_fits(out: np.ndarray, shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
    if out.shape != tuple(shape) or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"cannot read {dtype} values of shape {tuple(shape)} into a {out.dtype} {out.shape} array")


class OutFile:
    """A file being written that can also take bytes straight from another file."""

    def __init__(self, f: BinaryIO, base: int = 0):
        self._f = f
        self._base = base  # where this output starts in the file (a tar member's data)
        self._reserving = True

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if len(data) >= _RESERVE_MIN:
            self._reserve(self._f.tell(), len(data))
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()

    def tell(self) -> int:
        return self._f.tell() - self._base

    def put(self, parts: Iterable[Part]) -> int:
        """Append each part: a file's region (copied in the kernel when it can be) or bytes in memory.
        Returns the bytes appended."""
        appended = 0
        for part in parts:
            if isinstance(part, FileRegion):
                self.copy_from(part)
            else:
                self.write(part)
            appended += part_length(part)
        return appended

    def copy_from(self, region: FileRegion) -> None:
        """Append ``region``'s bytes: in the kernel when it can, else through a bounded buffer."""
        self._f.flush()
        start = self._f.tell()
        self._reserve(start, region.length)
        with open(region.path, "rb", buffering=0) as src:
            done = 0
            try:
                while done < region.length:
                    n = os.copy_file_range(
                        src.fileno(), self._f.fileno(), region.length - done, region.offset + done, start + done
                    )
                    if n == 0:
                        break
                    done += n
            except OSError:  # another file system, or no kernel support: fall back to reading
                pass
            self._f.seek(start + done)
            if done < region.length:
                rest = region.sub(done, region.length - done) if done else region
                buf = bytearray(min(_CHUNK, rest.length))
                for offset in range(0, rest.length, _CHUNK):
                    n = min(_CHUNK, rest.length - offset)
                    part = memoryview(buf)[:n]
                    rest.sub(offset, n).read_into(part)
                    self._f.write(part)

    def _reserve(self, offset: int, length: int) -> None:
        """Allocate ``length`` bytes of the file at ``offset`` before they are written: ext4 then does
        not allocate block by block as the pages come (a 2.6 GB copy took 15 to 20% less time). A file
        system or file that cannot is written as before."""
        if not self._reserving or length < _RESERVE_MIN:
            return
        fallocate = _fallocate()
        try:
            self._reserving = fallocate is not None and fallocate(self._f.fileno(), 0, offset, length) == 0
        except OSError:  # no file descriptor (an in-memory buffer)
            self._reserving = False


_RESERVE_MIN = 1 << 20


@functools.cache
def _fallocate() -> Callable[[int, int, int, int], int] | None:
    """libc's fallocate(2), where there is one. Not ``os.posix_fallocate``: where the file system
    cannot allocate, glibc's version writes to every block instead."""
    try:
        import ctypes

        fallocate = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    fallocate.restype = ctypes.c_int
    return fallocate  # type: ignore[no-any-return]


class Stored(abc.ABC):
    """One checkpoint entry still on disk: a tensor (``shape``/``dtype`` set) or a byte blob."""

    shape: tuple[int, ...] | None  # None: an opaque byte entry
    dtype: DType | None

    @abc.abstractmethod
    def load(self) -> torch.Tensor | bytes:
        """Read the entry into memory."""

    def data(self) -> memoryview:
        """The entry's bytes (a tensor's in C order), in memory: what a writer writes when it cannot copy them."""
        loaded = self.load()
        return memoryview(loaded) if isinstance(loaded, bytes) else tensor_bytes(loaded)

    def raw(self) -> list[FileRegion] | None:
        """Regions that, concatenated, are the entry's bytes (a tensor's in C order); None if it must be decoded."""
        return None

    def parts(self) -> Iterable[Part]:
        """What a writer appends, in order, to write the entry's bytes (:meth:`OutFile.put`): its
        regions where it lies as stored, else its bytes in memory."""
        raw = self.raw()
        return raw if raw is not None else [self.data()]

    @property
    def nbytes(self) -> int:
        assert self.shape is not None and self.dtype is not None
        return math.prod(self.shape) * self.dtype.itemsize

    def identity(self) -> Hashable:
        """Equal for two entries that are the same stored bytes (tied weights saved once)."""
        return id(self)


class InRegion(Stored):
    """An entry whose bytes are exactly one region (a safetensors tensor, a raw byte entry)."""

    region: FileRegion

    def load(self) -> torch.Tensor | bytes:
        if self.shape is None or self.dtype is None:
            return self.region.read()
        return read_tensor(self.region, self.dtype, self.shape)

    def raw(self) -> list[FileRegion]:
        return [self.region]

    @property
    def nbytes(self) -> int:
        return self.region.length

    def identity(self) -> Hashable:
        return self.region


class Deferred(Stored):
    """A tensor computed elsewhere (another process or thread) while the checkpoint is written: its
    shape and dtype are known now, its bytes as parts: ``ready``, regions of other files known now
    (rows kept as they are stored), then what ``result`` returns once computed: bytes, regions, or
    numpy arrays in C order (as :func:`torch_as_array` gives them), or the computation's error.
    Writers write every other entry first (:func:`write_order`), so the computation overlaps their
    copying, then copy the ready parts before they wait."""

    shape: tuple[int, ...]
    dtype: DType

    def __init__(
        self,
        shape: tuple[int, ...],
        dtype: DType,
        result: Callable[[], Sequence[FileRegion | memoryview | np.ndarray]],
        ready: Sequence[FileRegion] = (),
    ):
        self.shape = shape
        self.dtype = dtype
        self._result = result
        self._ready = list(ready)

    def parts(self) -> Iterator[Part]:
        yield from self._ready
        computed: list[Part] = []
        for part in self._result():
            if isinstance(part, FileRegion | memoryview):
                computed.append(part)
            elif part.dtype == self.dtype.numpy:
                computed.append(array_bytes(part))
            else:
                raise CheckpointFormatError(f"computed {part.dtype} values for a {self.dtype} tensor")
        if (got := sum(map(part_length, [*self._ready, *computed]))) != self.nbytes:
            raise CheckpointFormatError(f"computed {got} bytes for a {self.dtype} tensor of shape {self.shape}")
        yield from computed

    def data(self) -> memoryview:
        out = bytearray(self.nbytes)
        view, done = memoryview(out), 0
        for part in self.parts():
            n = part_length(part)
            if isinstance(part, FileRegion):
                part.read_into(view[done : done + n])
            else:
                view[done : done + n] = part
            done += n
        return view

    def load(self) -> torch.Tensor:
        import numpy as np

        return array_as_torch(np.frombuffer(self.data(), dtype=self.dtype.numpy).reshape(self.shape), self.dtype)


def entry_parts(value: Stored | torch.Tensor | bytes) -> Iterable[Part]:
    """What a writer appends for an entry as held: a stored one's :meth:`Stored.parts`, else its bytes."""
    if isinstance(value, Stored):
        return value.parts()
    if isinstance(value, bytes | bytearray):
        return [memoryview(value)]
    return [tensor_bytes(value.detach().cpu())]


def part_length(part: Part) -> int:
    return part.length if isinstance(part, FileRegion) else part.nbytes


def byte_prefix(regions: Iterable[FileRegion], length: int) -> list[FileRegion]:
    """The regions holding the first ``length`` bytes of ``regions`` joined end to end."""
    out = []
    for region in regions:
        if length <= 0:
            break
        out.append(region.sub(0, min(length, region.length)))
        length -= region.length
    if length > 0:
        raise ValueError(f"{length} bytes short of the requested prefix")
    return out


def mapped_array(value: Stored) -> np.ndarray | None:
    """A read-only array over a tensor entry's bytes where they lie in the file (one region), mapped
    into memory: pages are the page cache's own and only those used are touched. None when the entry
    is not stored so, or cannot be mapped (:func:`read_array` reads it)."""
    import mmap

    import numpy as np

    raw = value.raw()
    if raw is None or len(raw) != 1 or value.shape is None or value.dtype is None or not raw[0].length:
        return None
    region = raw[0]
    start = region.offset - region.offset % mmap.ALLOCATIONGRANULARITY
    try:
        with open(region.path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), region.offset + region.length - start, access=mmap.ACCESS_READ, offset=start)
    except (OSError, ValueError):  # shorter than its index says, or a file system without mmap
        return None
    values = np.frombuffer(mapped, dtype=value.dtype.numpy, count=math.prod(value.shape), offset=region.offset - start)
    return values.reshape(value.shape)


def write_order(items: Iterable[T], value_of: Callable[[T], object]) -> Iterator[T]:
    """``items`` in the order every writer writes their data: as given, those whose value is
    :class:`Deferred` last, so that their computation overlaps the copy of the rest."""
    return iter(sorted(items, key=lambda item: isinstance(value_of(item), Deferred)))


class Entries(MutableMapping[str, Any]):
    """Checkpoint entries by key; :class:`Stored` ones are read on each access, never cached.

    Iterating keys reads nothing; ``stored(key)`` gives the entry as held (for shapes, raw copies).
    """

    def __init__(self, items: Mapping[str, Any]):
        self._items = dict(items)

    def __setitem__(self, key: str, value: Any) -> None:
        self._items[key] = value

    def __delitem__(self, key: str) -> None:
        del self._items[key]

    def __getitem__(self, key: str) -> torch.Tensor | bytes | None:
        value = self._items[key]
        return value.load() if isinstance(value, Stored) else value

    def __contains__(self, key: object) -> bool:
        return key in self._items  # Mapping's default would read the entry

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def stored(self, key: str) -> Stored | torch.Tensor | bytes | None:
        return self._items[key]


def held(entries: Mapping[str, object], key: str) -> Any:
    """The entry as the mapping holds it: a :class:`Stored` for lazy entries, else the value."""
    return entries.stored(key) if isinstance(entries, Entries) else entries[key]


def same_bytes_key(value: Stored | torch.Tensor) -> Hashable:
    """Equal for two tensor entries that are the same bytes (tied weights), so they are written once."""
    if isinstance(value, Stored):
        return ("stored", value.identity())
    return ("memory", value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.dtype)


def tensor_meta(entries: Mapping[str, object], key: str) -> tuple[tuple[int, ...], DType] | None:
    """Shape and dtype of a tensor entry without reading it; None for byte blobs and empty entries."""
    value = held(entries, key)
    if isinstance(value, Stored):
        return (value.shape, value.dtype) if value.shape is not None and value.dtype is not None else None
    if is_tensor(value):
        return tuple(value.shape), dtype_of(value.dtype)  # type: ignore[attr-defined]
    return None
