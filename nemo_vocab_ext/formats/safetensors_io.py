"""The safetensors adapter: one file, or shards with ``model.safetensors.index.json``.

Files are read and written here directly (an 8-byte length, a JSON header, then each tensor's
bytes): entries are read one at a time, and bytes already stored as the output needs them are
copied without decoding. Everything needed to rebuild the .nemo travels in ``__metadata__``
(strings only): the model config,
the layout, the tokenizer artifacts (base64) and which entries are opaque byte blobs or None, so
safetensors to .nemo needs nothing else. Tensors sharing storage are stored once.
"""

from __future__ import annotations

import base64
import json
import math
import struct
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoint import Checkpoint, Value
from ..core.dtypes import BY_SAFETENSORS, UINT8, DType
from ..errors import CheckpointFormatError
from .region import (
    Entries,
    FileRegion,
    InRegion,
    OutFile,
    Stored,
    entry_parts,
    held,
    is_tensor,
    same_bytes_key,
    tensor_meta,
    write_order,
)

INDEX = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5_000_000_000  # the Hugging Face convention (decimal GB)

META_CONFIG = "nemo_vocab_ext.config"
META_LAYOUT = "nemo_vocab_ext.layout"
META_ARTIFACTS = "nemo_vocab_ext.artifacts"
META_BLOBS = "nemo_vocab_ext.blobs"
META_NONE = "nemo_vocab_ext.none_keys"
META_ALIASES = "nemo_vocab_ext.aliases"


def _encode_metadata(ckpt: Checkpoint, blobs: list[str], nones: list[str], aliases: dict[str, str]) -> dict[str, str]:
    return {
        "format": "pt",
        META_CONFIG: json.dumps(ckpt.config),
        META_LAYOUT: ckpt.layout,
        META_ARTIFACTS: json.dumps({k: base64.b64encode(v).decode() for k, v in ckpt.artifacts.items()}),
        META_BLOBS: json.dumps(blobs),
        META_NONE: json.dumps(nones),
        META_ALIASES: json.dumps(aliases),
    }


_HEADER_ALIGN = 8  # the header is padded with spaces so that tensor data starts 8-byte aligned
_MAX_HEADER = 100_000_000  # safetensors' own limit on the header's size


@dataclass(frozen=True, eq=False)
class SafetensorsEntry(InRegion):
    """A tensor in a safetensors file; a byte blob (stored as uint8) when ``shape`` is None."""

    region: FileRegion
    dtype: DType | None
    shape: tuple[int, ...] | None


@dataclass
class _Planned:
    """One stored tensor of the output: where its bytes come from."""

    key: str
    dtype: DType
    shape: tuple[int, ...]
    nbytes: int


def _plan(tensors: Mapping[str, Value]) -> tuple[list[_Planned], list[str], list[str], dict[str, str]]:
    """What to store, from shapes alone: byte blobs as uint8, None entries and tied aliases in metadata."""
    planned: list[_Planned] = []
    blobs: list[str] = []
    nones: list[str] = []
    aliases: dict[str, str] = {}
    seen: dict[Hashable, str] = {}
    for key in tensors:
        value = held(tensors, key)
        if value is None:
            nones.append(key)
            continue
        if not (isinstance(value, Stored | bytes) or is_tensor(value)):
            raise CheckpointFormatError(
                f"entry '{key}' is a {type(value).__name__}; only tensors, bytes and None can be stored"
            )
        meta = tensor_meta(tensors, key)
        if isinstance(value, bytes) or meta is None:  # a byte blob
            nbytes = len(value) if isinstance(value, bytes) else value.nbytes
            blobs.append(key)
            planned.append(_Planned(key, UINT8, (nbytes,), nbytes))
            continue
        shape, dtype = meta
        nbytes = math.prod(shape) * dtype.itemsize
        ident = same_bytes_key(value)
        if nbytes and ident in seen:  # tied weights: store once, remember the alias
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        planned.append(_Planned(key, dtype, tuple(shape), nbytes))
    return planned, blobs, nones, aliases


def _write_file(path: Path, planned: list[_Planned], tensors: Mapping[str, Value], metadata: dict[str, str]) -> None:
    header: dict[str, Any] = {"__metadata__": metadata}
    for p in planned:  # the header lists entries in their order; data comes in write order
        header[p.key] = {"dtype": p.dtype.safetensors, "shape": list(p.shape)}
    order = list(write_order(planned, lambda p: held(tensors, p.key)))
    offset = 0
    for p in order:
        header[p.key]["data_offsets"] = [offset, offset + p.nbytes]
        offset += p.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(len(text) + 8) % _HEADER_ALIGN)
    with open(path, "wb") as f:
        out = OutFile(f)
        out.write(struct.pack("<Q", len(text)))
        out.write(text)
        for p in write_order(order, lambda p: held(tensors, p.key)):  # the same order, checked as it goes
            # Stored bytes that are already what we write are copied, not decoded.
            if out.put(entry_parts(held(tensors, p.key))) != p.nbytes:
                raise CheckpointFormatError(f"entry '{p.key}' changed size while it was written")


def write_safetensors(ckpt: Checkpoint, dst: Path, *, max_shard_bytes: int | None = None) -> None:
    """A single file when ``dst`` ends in .safetensors, else a folder of shards plus the index; one entry at a time."""
    if ckpt.rank_tensors is not None and len(ckpt.rank_tensors) > 1:
        raise CheckpointFormatError(
            f"{ckpt.layout} checkpoints with several ranks cannot be stored as one safetensors model; "
            "merge the partitions first with NeMo's megatron_change_num_partitions.py"
        )
    planned, blobs, nones, aliases = _plan(ckpt.tensors)
    metadata = _encode_metadata(ckpt, blobs, nones, aliases)
    if dst.suffix == ".safetensors":
        _write_file(dst, planned, ckpt.tensors, metadata)
        return
    limit = max_shard_bytes or DEFAULT_MAX_SHARD_BYTES
    shards: list[list[_Planned]] = [[]]
    size = 0
    for p in planned:
        if shards[-1] and size + p.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += p.nbytes
    dst.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _write_file(dst / name, shard, ckpt.tensors, metadata)
        weight_map.update(dict.fromkeys((p.key for p in shard), name))
    total = sum(p.nbytes for p in planned)
    index = {"metadata": {"total_size": total, **metadata}, "weight_map": weight_map}
    (dst / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))


def _shard_files(src: Path) -> list[Path]:
    if src.is_file():
        return [src]
    index = src / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise CheckpointFormatError(f"{index}: not a safetensors index ({e})") from e
        return [src / name for name in sorted(set(weight_map.values()))]
    if (src / SINGLE_NAME).is_file():
        return [src / SINGLE_NAME]
    raise CheckpointFormatError(f"{src}: no {INDEX} or {SINGLE_NAME} in this folder")


def _decode_metadata(
    meta: dict[str, str], source: Path
) -> tuple[dict[str, Any], str, dict[str, bytes], list[str], list[str], dict[str, str]]:
    if META_CONFIG not in meta:
        raise CheckpointFormatError(
            f"{source}: no NeMo model config in the safetensors metadata; it was not written by nemo-vocab-ext "
            "(a Hugging Face checkpoint needs NeMo's HF importers instead)"
        )
    try:
        artifacts = {k: base64.b64decode(v) for k, v in json.loads(meta.get(META_ARTIFACTS, "{}")).items()}
        return (
            json.loads(meta[META_CONFIG]),
            meta.get(META_LAYOUT, "single"),
            artifacts,
            json.loads(meta.get(META_BLOBS, "[]")),
            json.loads(meta.get(META_NONE, "[]")),
            json.loads(meta.get(META_ALIASES, "{}")),
        )
    except ValueError as e:
        raise CheckpointFormatError(f"{source}: corrupt nemo_vocab_ext metadata ({e})") from e


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The header and where tensor data starts."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointFormatError(f"{path}: not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", head)
        if length > min(_MAX_HEADER, size - 8):
            raise CheckpointFormatError(f"{path}: not a safetensors file (header length {length})")
        try:
            header = json.loads(f.read(length))
        except ValueError as e:
            raise CheckpointFormatError(f"{path}: not a safetensors file (header: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{path}: not a safetensors file (header is not an object)")
    return header, 8 + length


def _file_entries(path: Path) -> tuple[dict[str, SafetensorsEntry], dict[str, str]]:
    header, data_start = _read_header(path)
    container = FileRegion(path, data_start, path.stat().st_size - data_start)
    meta = header.pop("__metadata__", None) or {}
    entries: dict[str, SafetensorsEntry] = {}
    for key, info in header.items():
        try:
            dtype = BY_SAFETENSORS[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointFormatError(f"{path}: entry '{key}' has a malformed header ({e})") from None
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise CheckpointFormatError(f"{path}: entry '{key}' has {end - begin} bytes for shape {list(shape)}")
        region = container.sub(begin, end - begin)
        entries[key] = SafetensorsEntry(region, dtype, shape)
    return entries, meta


def read_safetensors(src: str | Path) -> Checkpoint:
    """Entries are read when used; byte blobs, None entries and aliases are restored from the metadata."""
    src = Path(src)
    entries: dict[str, Stored | None] = {}
    meta: dict[str, str] | None = None
    for f in _shard_files(src):
        if not f.is_file():
            raise CheckpointFormatError(f"{f}: shard listed in the index is missing")
        found, file_meta = _file_entries(f)
        entries.update(found)
        meta = meta or file_meta
    config, layout, artifacts, blobs, nones, aliases = _decode_metadata(meta or {}, src)
    for key in blobs:
        entry = entries[key]
        assert isinstance(entry, SafetensorsEntry)
        entries[key] = SafetensorsEntry(entry.region, None, None)
    for key in nones:
        entries[key] = None
    for key, target in aliases.items():
        entries[key] = entries[target]
    return Checkpoint(Entries(entries), config, layout, artifacts)
