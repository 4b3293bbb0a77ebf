"""The data model of a checkpoint's entries: values in memory, entries still on disk, entries still
being computed, and the order in which writers take them.

Every reader describes each stored entry by where its bytes lie (a :class:`Region`, a
:class:`~.formats.byteio.FileRegion`) instead of loading it. A writer then either loads one entry at
a time, or, when the bytes it needs are exactly the stored ones, copies them file to file without
decoding. Either way at most one entry is in memory.
"""

from __future__ import annotations

import abc
import math
import sys
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from .core.dtypes import DType, dtype_of
from .errors import CheckpointFormatError

if TYPE_CHECKING:
    import numpy as np
    import torch

T = TypeVar("T")


class Region(Protocol):
    """``length`` bytes of the file at ``path`` from ``offset`` (:class:`~.formats.byteio.FileRegion`)."""

    @property
    def path(self) -> Path: ...

    @property
    def offset(self) -> int: ...

    @property
    def length(self) -> int: ...

    def sub(self, offset: int, length: int) -> Region: ...

    def read_into(self, buffer: memoryview) -> None: ...


# What a writer appends for an entry, in order: a file's bytes where they lie, or bytes in memory.
Part = Region | memoryview


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

    def raw(self) -> Sequence[Region] | None:
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
        result: Callable[[], Sequence[Region | memoryview | np.ndarray]],
        ready: Sequence[Region] = (),
        kept_from: Stored | None = None,
    ):
        self.shape = shape
        self.dtype = dtype
        self._result = result
        self._ready = list(ready)
        # The entry whose leading rows ``ready`` are, as it stores them: a writer that can refer to
        # that entry's stored bytes (a torch_dist folder's linked chunks) writes only the computed rows.
        self.kept_from = kept_from

    @property
    def kept_rows(self) -> int:
        """The rows ``ready`` holds."""
        row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize
        return sum(map(part_length, self._ready)) // row_bytes if row_bytes else 0

    def computed_rows(self) -> Deferred:
        """The rows after the kept ones, alone, as a tensor of their own."""
        return Deferred((self.shape[0] - self.kept_rows, *self.shape[1:]), self.dtype, self._result)

    def parts(self) -> Iterator[Part]:
        import numpy as np

        yield from self._ready
        # An empty part before waiting: the writer copies the kept rows now, while the rows are computed
        # (OutFile.put holds regions back to join them).
        yield memoryview(b"")
        computed: list[Part] = []
        for part in self._result():
            if not isinstance(part, np.ndarray):
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
            if isinstance(part, memoryview):
                view[done : done + n] = part
            else:
                part.read_into(view[done : done + n])
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
    return part.nbytes if isinstance(part, memoryview) else part.length


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
