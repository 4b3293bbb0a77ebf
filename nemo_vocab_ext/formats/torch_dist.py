"""Read and write megatron-core's torch_dist checkpoint folders with torch alone.

A folder holds ``.metadata`` (a pickled ``torch.distributed.checkpoint`` Metadata: every key's
global shape, dtype and where each chunk lives), ``__<rank>_<i>.distcp`` data files, ``common.pt``
(megatron's non-sharded state) and ``metadata.json`` (the backend names).

Everything runs in one process without a process group (``no_dist=True``): tensors come back
global, their shards joined. Byte entries (``_extra_state`` blobs, megatron's ShardedObjects) are
passed through as the exact bytes stored, never unpickled.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import ReadItem, SavePlan, WriteItem, WriteItemType

from ..errors import CheckpointFormatError, OutputExistsError, VocabExtError
from .safe_pickle import restricted_unpickle

METADATA_FILE = ".metadata"
COMMON_FILE = "common.pt"
METADATA_JSON = "metadata.json"
DEFAULT_METADATA_JSON = json.dumps(
    {
        "sharded_backend": "torch_dist",
        "sharded_backend_version": 1,
        "common_backend": "torch",
        "common_backend_version": 1,
    }
).encode()

Entry = torch.Tensor | bytes


@dataclass(frozen=True)
class TensorInfo:
    """A stored tensor's global shape and dtype, as ``.metadata`` records them."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def read_metadata(ckpt_dir: str | Path) -> Metadata:
    """The folder's ``.metadata``, unpickled with the restricted unpickler."""
    path = Path(ckpt_dir) / METADATA_FILE
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointFormatError(f"{path}: cannot read the torch_dist metadata ({exc.strerror})") from None
    metadata = restricted_unpickle(data, what=str(path))
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise CheckpointFormatError(f"{path}: not a torch.distributed.checkpoint metadata file")
    return metadata


def read_tensor_infos(ckpt_dir: str | Path) -> dict[str, TensorInfo]:
    """Global shape and dtype of every tensor, from ``.metadata`` alone (no tensor data is read)."""
    return {
        key: TensorInfo(tuple(md.size), md.properties.dtype)
        for key, md in read_metadata(ckpt_dir).state_dict_metadata.items()
        if isinstance(md, TensorStorageMetadata)
    }


def list_keys(ckpt_dir: str | Path) -> list[str]:
    """Every stored key, tensors and byte entries, in stored order (to read in bounded groups)."""
    return list(read_metadata(ckpt_dir).state_dict_metadata)


class _RestrictedReader(dcp.FileSystemReader):
    """FileSystemReader handed the ``.metadata`` we unpickled with the restricted unpickler, so it
    never ``pickle.load``s the file itself. Tensor data it reads with ``torch.load(weights_only=True)``."""

    def __init__(self, path: Path, metadata: Metadata) -> None:
        super().__init__(path)
        self._metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        # As FileSystemReader does: the load id marks this load in torch's own bookkeeping.
        if getattr(self._metadata, "storage_meta", None) is None:
            self._metadata.storage_meta = StorageMeta()
        self._metadata.storage_meta.load_id = self.load_id  # type: ignore[union-attr]
        return self._metadata


class _RawBytesLoadPlanner(DefaultLoadPlanner):
    """Keeps byte entries as stored; the default planner would ``torch.load(weights_only=False)`` them."""

    def __init__(self) -> None:
        # Flat keys as stored: no nesting by '.', which would split keys like 'model.embedding...'.
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        self.state_dict[read_item.dest_index.fqn] = value.getvalue()


@contextmanager
def _dcp_call() -> Iterator[None]:
    """Quiet dcp's single-process warning (single process is the intent) and unwrap its errors:
    dcp reports every failure as a CheckpointException (a BaseException) holding each rank's error."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            yield
        except CheckpointException as exc:
            causes = [cause for cause, _trace in exc.failures.values()]
            raise (causes[0] if causes else RuntimeError(str(exc))) from None


def read_torch_dist(ckpt_dir: str | Path, keys: Iterable[str] | None = None) -> dict[str, Entry]:
    """Global tensors (shards joined) and raw byte entries; only ``keys`` if given."""
    ckpt_dir = Path(ckpt_dir)
    metadata = read_metadata(ckpt_dir)
    stored = metadata.state_dict_metadata
    wanted = list(stored) if keys is None else list(dict.fromkeys(keys))
    missing = [k for k in wanted if k not in stored]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointFormatError(f"{ckpt_dir}: no such entries in the checkpoint: {shown}")

    # Empty global tensors of the stored shape and dtype: the reader copies every chunk into place.
    state: dict[str, Any] = {}
    for key in wanted:
        md = stored[key]
        if isinstance(md, TensorStorageMetadata):
            # Chunks are disjoint (megatron validates its sharding; dcp drops replicas), so they must
            # add up to the whole tensor, or torch.empty's uninitialised memory would come back.
            if sum(math.prod(chunk.sizes) for chunk in md.chunks) != math.prod(md.size):
                raise CheckpointFormatError(
                    f"{ckpt_dir}/{METADATA_FILE}: the stored chunks of {key!r} do not cover its shape {tuple(md.size)}"
                )
            state[key] = torch.empty(md.size, dtype=md.properties.dtype)
        elif isinstance(md, BytesStorageMetadata):
            state[key] = b""
        else:
            raise CheckpointFormatError(
                f"{ckpt_dir}/{METADATA_FILE}: entry {key!r} has unknown type {type(md).__name__}"
            )
    if not state:
        return {}
    try:
        with _dcp_call():
            dcp.load(
                state,
                storage_reader=_RestrictedReader(ckpt_dir, metadata),
                planner=_RawBytesLoadPlanner(),
                no_dist=True,
            )
    except VocabExtError:
        raise
    except Exception as exc:  # a missing, truncated or garbled .distcp surfaces as many types
        cause = " ".join(str(exc).split())
        raise CheckpointFormatError(
            f"{ckpt_dir}: cannot read tensor data ({type(exc).__name__}: {cause}); a .distcp file is missing or damaged"
        ) from None
    return state


class _RawBytesSavePlanner(DefaultSavePlanner):
    """Writes byte entries unchanged (the default planner would ``torch.save`` them again) and
    records megatron's per-tensor ``mcore_data`` as megatron's own planner does."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def transform_object(self, write_item: WriteItem, object: Any) -> Any:
        if write_item.type == WriteItemType.BYTE_IO:
            return io.BytesIO(object)
        return object

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        plans, metadata = super().create_global_plan(all_plans)
        # megatron reads mcore_data with getattr(..., {}); empty dicts = no N-D reformulation, as
        # megatron writes for plain model tensors. A plain attribute keeps the pickle torch-only.
        metadata.mcore_data = {  # type: ignore[attr-defined]
            k: {} for k, md in metadata.state_dict_metadata.items() if isinstance(md, TensorStorageMetadata)
        }
        return plans, metadata


def write_torch_dist(
    ckpt_dir: str | Path,
    tensors: Mapping[str, Entry],
    *,
    common: bytes,
    metadata_json: bytes | None = None,
) -> None:
    """Write a torch_dist folder that megatron-core's ``dist_checkpointing.load`` reads.

    ``tensors`` are written whole (one chunk each); ``bytes`` values are written as given. For
    megatron to load a byte entry it must be what megatron writes for a ShardedObject:
    ``torch.save([data])``, a list of one. ``common`` is the exact content of ``common.pt``.
    The folder must be new or empty.
    """
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.exists() and (not ckpt_dir.is_dir() or any(ckpt_dir.iterdir())):
        # Stale .distcp files from another checkpoint would sit beside ours unnoticed.
        raise OutputExistsError(f"{ckpt_dir}: exists and is not an empty folder; refusing to write a checkpoint there")
    state: dict[str, Any] = {}
    for key, value in tensors.items():
        if isinstance(value, torch.Tensor):
            state[key] = value.detach().cpu()
        elif isinstance(value, bytes | bytearray):
            state[key] = bytes(value)
        else:
            raise TypeError(f"{key}: expected a tensor or bytes, got {type(value).__name__}")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    # A str path, as megatron passes: it is pickled into .metadata (StorageMeta.checkpoint_id).
    writer = dcp.FileSystemWriter(str(ckpt_dir), single_file_per_rank=True, thread_count=1)
    with _dcp_call():
        dcp.save(state, storage_writer=writer, planner=_RawBytesSavePlanner(), no_dist=True)
    (ckpt_dir / COMMON_FILE).write_bytes(common)
    # Last: megatron recognises a checkpoint folder by metadata.json, so a crash before this point
    # leaves a folder that is not mistaken for a complete checkpoint.
    (ckpt_dir / METADATA_JSON).write_bytes(DEFAULT_METADATA_JSON if metadata_json is None else metadata_json)
