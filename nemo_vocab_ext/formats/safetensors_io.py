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
from collections.abc import Generator, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from ..checkpoint import DISTRIBUTED, MP_RANK, SINGLE, TP_PP_RANK, Checkpoint, Value
from ..core.dtypes import BY_SAFETENSORS, UINT8, DType
from ..entries import (
    Deferred,
    Entries,
    Part,
    Stored,
    entry_parts,
    held,
    is_tensor,
    part_length,
    same_bytes_key,
    tensor_meta,
    write_order,
)
from ..errors import CheckpointFormatError, ConfigError
from .byteio import FileRegion, InRegion, OutFile
from .folder import InFolder
from .untrusted import MAX_CONFIG_BYTES, check_artifacts, check_config

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
    for _ in shard_writer(path, planned, tensors, metadata):
        pass


def shard_writer(
    path: Path, planned: list[_Planned], tensors: Mapping[str, Value], metadata: dict[str, str]
) -> Generator[None, None, None]:
    """Write one file in two steps: its header and every entry but those computed while it is written
    (:class:`~..entries.Deferred`, last in the data), then, once resumed, those. A folder of shards
    copies every shard's stored entries before it waits for any computed one."""
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
    computed = [p for p in order if isinstance(held(tensors, p.key), Deferred)]
    stored = [p for p in order if p not in computed]

    def parts(entries: list[_Planned]) -> Iterator[Part]:
        # Stored bytes that are already what we write are copied, not decoded; entries are read one at a time.
        for p in entries:
            written = 0
            for part in entry_parts(held(tensors, p.key)):
                written += part_length(part)
                yield part
            if written != p.nbytes:
                raise CheckpointFormatError(f"entry '{p.key}' changed size while it was written")

    with open(path, "wb") as f:
        out = OutFile(f)
        out.write(struct.pack("<Q", len(text)))
        out.write(text)
        out.put(parts(stored))
        yield
        out.put(parts(computed))


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


_MAX_ENTRIES = 100_000  # tensors in one model, all shards together; a 70B model's headers list about a thousand
_LAYOUTS = (SINGLE, DISTRIBUTED, MP_RANK, TP_PP_RANK)


def _json(data: bytes, what: str) -> object:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # RecursionError: nested too deep to parse
        raise CheckpointFormatError(f"{what}: not valid JSON ({str(e)[:200]})") from None


def _shard_files(src: Path) -> list[Path]:
    """The files holding the model: ``src`` itself, or the shards its index names (plain names in the folder)."""
    if src.is_file():
        return [src]
    folder = InFolder(src)
    if folder.has(INDEX):
        index = _json(folder.read(INDEX, max_bytes=_MAX_HEADER), str(src / INDEX))
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointFormatError(f"{src / INDEX}: not a safetensors index (no weight_map of file names)")
        if len(weight_map) > _MAX_ENTRIES:
            raise CheckpointFormatError(f"{src / INDEX}: {len(weight_map)} entries, over the limit of {_MAX_ENTRIES}")
        names = sorted(set(weight_map.values()))
        for name in names:
            if not folder.has(name):
                raise CheckpointFormatError(f"{src / name}: shard listed in the index is missing")
        return [folder.region(name).path for name in names]
    if folder.has(SINGLE_NAME):
        return [folder.region(SINGLE_NAME).path]
    raise CheckpointFormatError(f"{src}: no {INDEX} or {SINGLE_NAME} in this folder")


def _json_field(meta: Mapping[str, str], key: str, default: str, kind: type, source: Path) -> Any:
    """A metadata value that holds JSON text of type ``kind``."""
    value = _json(meta.get(key, default).encode(), f"{source}: metadata '{key}'")
    if not isinstance(value, kind):
        raise CheckpointFormatError(f"{source}: metadata '{key}' holds a {type(value).__name__}, not a {kind.__name__}")
    return value


def _strings(value: Iterable[object], what: str, source: Path, stored: Mapping[str, object] | None = None) -> list[str]:
    """Entry names the metadata lists: text, and where ``stored`` is given, each one of its entries."""
    bad = [v for v in value if not isinstance(v, str) or (stored is not None and v not in stored)]
    if bad:
        kind = "a stored entry" if stored is not None else "an entry name"
        raise CheckpointFormatError(f"{source}: metadata '{what}' lists {bad[0]!r}, which is not {kind}")
    return list(value)  # type: ignore[arg-type]


def _decode_metadata(
    meta: Mapping[str, str], entries: Mapping[str, SafetensorsEntry], source: Path
) -> tuple[dict[str, Any], str, dict[str, bytes], list[str], list[str], dict[str, str]]:
    if META_CONFIG not in meta:
        raise CheckpointFormatError(
            f"{source}: no NeMo model config in the safetensors metadata; it was not written by nemo-vocab-ext "
            "(a Hugging Face model folder needs its config.json beside the weights)"
        )
    if len(meta[META_CONFIG]) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: the model config is over the {MAX_CONFIG_BYTES}-byte limit")
    config = check_config(_json_field(meta, META_CONFIG, "", dict, source), f"{source}: metadata '{META_CONFIG}'")
    layout = meta.get(META_LAYOUT, SINGLE)
    if layout not in _LAYOUTS:
        raise CheckpointFormatError(f"{source}: metadata '{META_LAYOUT}' is {layout!r}, not one of {list(_LAYOUTS)}")
    encoded = _json_field(meta, META_ARTIFACTS, "{}", dict, source)
    try:
        artifacts = {k: base64.b64decode(v, validate=True) for k, v in encoded.items()}
    except (TypeError, ValueError) as e:
        raise CheckpointFormatError(f"{source}: metadata '{META_ARTIFACTS}' holds a value that is not base64") from e
    blobs = _strings(_json_field(meta, META_BLOBS, "[]", list, source), META_BLOBS, source, entries)
    nones = _strings(_json_field(meta, META_NONE, "[]", list, source), META_NONE, source)
    aliases = _json_field(meta, META_ALIASES, "{}", dict, source)
    _strings(aliases, META_ALIASES, source)
    _strings(aliases.values(), META_ALIASES, source, entries)
    return config, layout, check_artifacts(artifacts, source), blobs, nones, aliases


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
        header = _json(f.read(length), f"{path}: not a safetensors file, its header")
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{path}: not a safetensors file (header is not an object)")
    if len(header) > _MAX_ENTRIES:
        raise CheckpointFormatError(f"{path}: the header lists {len(header)} entries, over the limit of {_MAX_ENTRIES}")
    return header, 8 + length


def _naturals(value: object) -> TypeGuard[list[int]]:
    return isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)


def _file_entries(path: Path) -> tuple[dict[str, SafetensorsEntry], dict[str, str]]:
    """Every entry, checked as safetensors checks them: a known dtype, a shape, and data offsets inside the file
    that hold exactly that many bytes, no two entries sharing a byte."""
    header, data_start = _read_header(path)
    container = FileRegion(path, data_start, path.stat().st_size - data_start)
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointFormatError(f"{path}: the header's __metadata__ is not a table of strings")
    entries: dict[str, SafetensorsEntry] = {}
    for key, info in header.items():
        fields = info if isinstance(info, dict) else {}
        name, shape, offsets = fields.get("dtype"), fields.get("shape"), fields.get("data_offsets")
        dtype = BY_SAFETENSORS.get(name) if isinstance(name, str) else None
        if dtype is None or not _naturals(shape) or not (_naturals(offsets) and len(offsets) == 2):
            raise CheckpointFormatError(
                f"{path}: entry {key!r} has a malformed header (expected a known dtype, a shape and two data offsets)"
            )
        begin, end = offsets
        if end < begin or end - begin != math.prod(shape) * dtype.itemsize:
            raise CheckpointFormatError(f"{path}: entry {key!r} has {end - begin} bytes for shape {shape}")
        entries[key] = SafetensorsEntry(container.sub(begin, end - begin), dtype, tuple(shape))
    # Sorted by start, two entries overlap only if two neighbours do.
    ranges = sorted((r.offset, r.offset + r.length, k) for k, e in entries.items() if (r := e.region).length)
    for (_, end, first), (begin, _, second) in zip(ranges, ranges[1:], strict=False):
        if begin < end:
            raise CheckpointFormatError(f"{path}: entries {first!r} and {second!r} overlap; the header is damaged")
    return entries, meta


def read_safetensors(src: str | Path) -> Checkpoint:
    """Entries are read when used; byte blobs, None entries and aliases are restored from the metadata."""
    src = Path(src)
    stored: dict[str, SafetensorsEntry] = {}
    meta: dict[str, str] = {}
    for f in _shard_files(src):
        found, file_meta = _file_entries(f)
        stored.update(found)
        if len(stored) > _MAX_ENTRIES:
            raise CheckpointFormatError(f"{src}: the shards list over {_MAX_ENTRIES} entries")
        meta = meta or file_meta
    config, layout, artifacts, blobs, nones, aliases = _decode_metadata(meta, stored, src)
    entries: dict[str, Stored | None] = dict(stored)
    for key in blobs:
        entries[key] = SafetensorsEntry(stored[key].region, None, None)
    for key in nones:
        entries[key] = None
    for key, target in aliases.items():
        entries[key] = entries[target]
    return Checkpoint(Entries(entries), config, layout, artifacts)
