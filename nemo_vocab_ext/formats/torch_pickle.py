"""Stand-ins for the torch objects that checkpoint pickles hold, and a pickler that writes them as torch does.

Checkpoint pickles name a handful of torch objects: dtypes, storage types, ``torch.Size``,
``torch.device``, layouts and the functions that rebuild tensors. Reading and writing them needs
only their names, so the restricted unpickler maps those names to the stand-ins here, and
:class:`TorchPickler` writes the stand-ins back under torch's names: a file is read and written
without importing torch, and torch reads what is written as its own objects.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from types import FunctionType
from typing import Any

from ..core.dtypes import BY_NAME, BY_STORAGE, DType

TORCH = "torch"


MAX_DIMS = 64  # more dimensions than any tensor record of a checkpoint has (and than torch's kernels take)


class BadRecord(ValueError):
    """A record of a pickle (a tensor, a metadata entry) that is not what the format allows."""


TORCH_UTILS = "torch._utils"
UNTYPED_STORAGE = ("torch.storage", "UntypedStorage")


class Size(tuple):  # type: ignore[type-arg]
    """``torch.Size``."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (Size, (tuple(self),))


class Layout(str):
    """``torch.layout``: pickled as a lookup by name, ``torch.serialization._get_layout("torch.strided")``."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (get_layout, (str(self),))


def get_layout(name: str) -> Layout:
    if not isinstance(name, str):
        raise BadRecord(f"a tensor layout named {name!r}")
    return Layout(name)


STRIDED = Layout("torch.strided")


class Device:
    """``torch.device``, kept as the arguments it was pickled with."""

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __reduce__(self) -> tuple[Any, ...]:
        return (Device, self.args)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Device) and other.args == self.args

    def __hash__(self) -> int:
        return hash(self.args)


@dataclass(frozen=True)
class StorageType:
    """A storage class (``torch.BFloat16Storage``...); ``dtype`` None for ``torch.storage.UntypedStorage``."""

    dtype: DType | None


# Names as torch pickles them -> stand-in. Matched exactly.
TORCH_OBJECTS: dict[tuple[str, str], Any] = {
    (TORCH, "Size"): Size,
    (TORCH, "device"): Device,
    ("torch.serialization", "_get_layout"): get_layout,
    UNTYPED_STORAGE: StorageType(None),
    **{(TORCH, name): dtype for name, dtype in BY_NAME.items()},
    **{(TORCH, name): StorageType(dtype) for name, dtype in BY_STORAGE.items()},
}


# Names torch pickles for tensors this tool does not handle (complex, quantized, other element
# types; no NeMo GPT checkpoint holds them). A file naming one is refused as unsupported: these are
# torch's own inert names, not code that loading would run.
UNSUPPORTED_TORCH_NAMES: frozenset[tuple[str, str]] = frozenset(
    [
        *(
            (TORCH, name)
            for name in (
                "ComplexFloatStorage",
                "ComplexDoubleStorage",
                "QInt8Storage",
                "QUInt8Storage",
                "QInt32Storage",
                "QUInt4x2Storage",
                "QUInt2x4Storage",
                "complex32",
                "complex64",
                "complex128",
                "qint8",
                "quint8",
                "qint32",
                "quint4x2",
                "quint2x4",
                "uint16",
                "uint32",
                "uint64",
                "float8_e4m3fnuz",
                "float8_e5m2fnuz",
                "float8_e8m0fnu",
                "float4_e2m1fn_x2",
                "per_tensor_affine",
                "per_channel_affine",
                "per_channel_affine_float_qparams",
            )
        ),
        ("torch._utils", "_rebuild_qtensor"),
        ("torch._utils", "_rebuild_sparse_tensor"),
        ("torch._utils", "_rebuild_nested_tensor"),
    ]
)


def torch_name(obj: Any) -> tuple[str, str] | None:
    """The module and name torch pickles ``obj`` under, if it is one of the stand-ins."""
    if isinstance(obj, DType):
        return (TORCH, obj.name)
    if isinstance(obj, StorageType):
        return UNTYPED_STORAGE if obj.dtype is None or obj.dtype.storage is None else (TORCH, obj.dtype.storage)
    return _WRITE_NAMES.get(obj) if isinstance(obj, type | FunctionType) else None


# The classes and functions above, written back under the names they are read from.
_WRITE_NAMES: dict[Any, tuple[str, str]] = {
    obj: name for name, obj in TORCH_OBJECTS.items() if isinstance(obj, type | FunctionType)
}

_PurePickler: Any = pickle._Pickler  # type: ignore[attr-defined]


class TorchPickler(_PurePickler):
    """The pure-Python pickler, writing stand-ins under torch's names (and others registered with
    :func:`register_name`). The C pickler cannot: it imports each named module to check the name,
    the very import this avoids. The pickles written this way are small (tensor data goes elsewhere)."""

    def reducer_override(self, obj: Any) -> Any:
        # A string means "save as a global", through save_global below (the base pickler's dispatch
        # table would send functions to its own save_global).
        return "torch name" if torch_name(obj) is not None else NotImplemented

    def save_global(self, obj: Any, name: str | None = None) -> None:
        named = torch_name(obj)
        if named is None:
            super().save_global(obj, name)
            return
        self.write(pickle.GLOBAL + f"{named[0]}\n{named[1]}\n".encode())
        self.memoize(obj)


def register_name(obj: Any, module: str, name: str) -> None:
    """Have :class:`TorchPickler` write ``obj`` (a stand-in class or function) as ``module.name``."""
    _WRITE_NAMES[obj] = (module, name)


def dumps(obj: Any, persistent_id: Any = None) -> bytes:
    """``obj`` pickled (protocol 2, as torch writes) with the stand-ins under torch's names."""
    buffer = io.BytesIO()
    pickler = TorchPickler(buffer, protocol=2)
    if persistent_id is not None:
        pickler.persistent_id = persistent_id
    pickler.dump(obj)
    return buffer.getvalue()
