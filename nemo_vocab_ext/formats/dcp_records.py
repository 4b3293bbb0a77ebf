"""The records of a torch_dist ``.metadata`` file, read and written without ``torch.distributed.checkpoint``.

Importing that package costs about 1.3 s (it pulls in DTensor and sympy) on every command that
touches a distributed checkpoint, while all we need from it are a dozen plain records. These are
their stand-ins: the restricted unpickler maps torch's class names to them, and :func:`dumps`
writes them back under torch's names, in the state each real class unpickles from (torch 2.13,
the pinned version; NeMo's own restore of files we write is tested). Megatron-core's subclasses
map to the same stand-ins.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from ..core.dtypes import DType
from . import torch_pickle
from .torch_pickle import STRIDED, BadRecord, Layout

METADATA_MODULE = "torch.distributed.checkpoint.metadata"
PLANNER_MODULE = "torch.distributed.checkpoint.planner"
FILESYSTEM_MODULE = "torch.distributed.checkpoint.filesystem"
PLANNER_RECORDS = ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")  # in megatron's all_local_plans


class Record:
    """A stand-in. It pickles and unpickles as the plain dataclass it replaces (``cls.__new__``,
    then its state into ``__dict__``), so both sides of a file agree. Unpickling goes through the
    dataclass's own ``__init__``: every field set, no other attribute (the values' types are checked
    where they are read)."""

    def __setstate__(self, state: Any) -> None:
        if state is None:  # pickled with no state: a record without fields
            state = {}
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise BadRecord(f"a {type(self).__name__} record whose state is not its fields")
        try:
            self.__init__(**state)  # type: ignore[misc]
        except TypeError:
            raise BadRecord(f"a {type(self).__name__} record with missing or unknown fields {sorted(state)}") from None


@dataclass
class ChunkStorageMetadata(Record):
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


class MemoryFormat(enum.Enum):
    """torch's ``_MEM_FORMAT_ENCODING``: how TensorProperties pickles its memory format."""

    TORCH_CONTIGUOUS_FORMAT = 0
    TORCH_CHANNELS_LAST = 1
    TORCH_PRESERVE_FORMAT = 2


@dataclass
class TensorProperties(Record):
    dtype: DType
    layout: Layout = STRIDED
    requires_grad: bool = False
    memory_format: MemoryFormat = MemoryFormat.TORCH_CONTIGUOUS_FORMAT
    pin_memory: bool = False

    # torch pickles these five as a tuple (memory formats cannot be pickled; their encoding can).
    def __getstate__(self) -> Any:
        return (self.dtype, self.layout, self.requires_grad, self.memory_format, self.pin_memory)

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) != 5:
            raise BadRecord("a TensorProperties record whose state is not its five fields")
        self.__init__(*state)  # type: ignore[misc]


@dataclass
class TensorStorageMetadata(Record):
    properties: TensorProperties
    size: tuple[int, ...]
    chunks: list[ChunkStorageMetadata]


@dataclass
class BytesStorageMetadata(Record):
    pass


@dataclass
class StorageMeta(Record):
    checkpoint_id: Any = None
    save_id: str | None = None
    load_id: str | None = None
    modules: list[str] = field(default_factory=list)


@dataclass
class Metadata(Record):
    state_dict_metadata: dict[str, TensorStorageMetadata | BytesStorageMetadata]
    planner_data: Any = None
    storage_data: Any = None
    storage_meta: StorageMeta | None = None
    version: str | None = None

    def __setstate__(self, state: Any) -> None:
        # megatron's MCoreMetadata adds these attributes; a file of torch's Metadata has none.
        extra = {k: state.pop(k) for k in MEGATRON_FIELDS if k in state} if isinstance(state, dict) else {}
        super().__setstate__(state)
        self.__dict__.update(extra)


MEGATRON_FIELDS = ("mcore_data", "all_local_plans")


@dataclass(frozen=True)
class MetadataIndex(Record):
    fqn: str
    offset: tuple[int, ...] | None = None
    index: int | None = field(default=None, hash=False, compare=False)


@dataclass
class StorageInfo(Record):
    """torch's ``_StorageInfo``: where one item's bytes lie."""

    relative_path: str
    offset: int
    length: int
    transform_descriptors: list[str] | None = None

    def __getstate__(self) -> Any:
        return {k: v for k, v in self.__dict__.items() if v is not None}  # as torch writes it


class Opaque(Record):
    """Megatron's and the planner's records that ``.metadata`` may hold and nothing here reads."""

    def __init__(self, *args: Any) -> None:  # enums unpickle as a call with their value
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


# (module, class name) as torch pickles them -> stand-in. Matched exactly.
STAND_INS: dict[tuple[str, str], type] = {
    (METADATA_MODULE, "ChunkStorageMetadata"): ChunkStorageMetadata,
    (METADATA_MODULE, "_MEM_FORMAT_ENCODING"): MemoryFormat,
    (METADATA_MODULE, "TensorProperties"): TensorProperties,
    (METADATA_MODULE, "TensorStorageMetadata"): TensorStorageMetadata,
    (METADATA_MODULE, "BytesStorageMetadata"): BytesStorageMetadata,
    (METADATA_MODULE, "StorageMeta"): StorageMeta,
    (METADATA_MODULE, "Metadata"): Metadata,
    (METADATA_MODULE, "MetadataIndex"): MetadataIndex,
    (FILESYSTEM_MODULE, "_StorageInfo"): StorageInfo,
    **{(PLANNER_MODULE, name): type(name, (Opaque,), {}) for name in PLANNER_RECORDS},
}
for (_module, _name), _cls in STAND_INS.items():
    torch_pickle.register_name(_cls, _module, _name)


def dumps(metadata: Metadata) -> bytes:
    """``metadata`` pickled as torch.distributed.checkpoint writes it: loadable by ``pickle.load`` there."""
    return torch_pickle.dumps(metadata)
