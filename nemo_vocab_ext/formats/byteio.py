"""Bytes where they lie in files, and the moves that serve them: regions read straight into
memory or mapped, and an output file that takes regions of other files in the kernel
(``copy_file_range``, as ``cp`` does) with its space allocated before it is written.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ..core.dtypes import DType
from ..entries import Part, Region, Stored, array_bytes, part_length, tensor_bytes, torch_as_array
from ..errors import CheckpointFormatError

if TYPE_CHECKING:
    import numpy as np
    import torch

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


def read_tensor(region: FileRegion, dtype: DType, shape: tuple[int, ...]) -> torch.Tensor:
    """A new tensor filled straight from the file (no intermediate buffer); the first use of torch."""
    import torch

    t = torch.empty(shape, dtype=dtype.torch)
    region.read_into(tensor_bytes(t))
    return t


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
        Regions that follow each other in one file are copied as one (a shard's tensors lie back to
        back: one copy instead of one per tensor); bytes, even none, first copy the regions held back,
        so a producer about to wait yields an empty part to have what it gave copied meanwhile.
        Returns the bytes appended."""
        appended = 0
        pending: Region | None = None  # a region not copied yet, which the next part may extend
        for part in parts:
            appended += part_length(part)
            if isinstance(part, memoryview):
                if pending is not None:
                    self.copy_from(pending)
                    pending = None
                if part:
                    self.write(part)
            elif pending is not None and part.path == pending.path and part.offset == pending.offset + pending.length:
                pending = FileRegion(pending.path, pending.offset, pending.length + part.length)
            else:
                if pending is not None:
                    self.copy_from(pending)
                pending = part
        if pending is not None:
            self.copy_from(pending)
        return appended

    def copy_from(self, region: Region) -> None:
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


def byte_prefix(regions: Iterable[Region], length: int) -> list[Region]:
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


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link ``dst`` of ``src`` (no byte copied; both names then share one inode), or, where the
    file system cannot link (another file system, no link support), a kernel copy of its bytes."""
    try:
        os.link(src, dst)
    except OSError:
        with open(dst, "xb") as f:
            OutFile(f).copy_from(FileRegion(src, 0, src.stat().st_size))
