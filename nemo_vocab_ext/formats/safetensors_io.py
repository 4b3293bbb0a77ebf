"""The safetensors adapter: one file, or shards with ``model.safetensors.index.json``.

Everything needed to rebuild the .nemo travels in ``__metadata__`` (strings only): the model config,
the layout, the tokenizer artifacts (base64) and which entries are opaque byte blobs or None, so
safetensors to .nemo needs nothing else. Tensors sharing storage are stored once.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..checkpoint import Checkpoint, Value
from ..errors import CheckpointFormatError

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


def _to_storable(tensors: dict[str, Value]) -> tuple[dict[str, torch.Tensor], list[str], list[str], dict[str, str]]:
    out: dict[str, torch.Tensor] = {}
    blobs: list[str] = []
    nones: list[str] = []
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...], torch.dtype], str] = {}
    for key, value in tensors.items():
        if value is None:
            nones.append(key)
        elif isinstance(value, bytes):
            out[key] = (
                torch.frombuffer(bytearray(value), dtype=torch.uint8) if value else torch.empty(0, dtype=torch.uint8)
            )
            blobs.append(key)
        elif isinstance(value, torch.Tensor):
            ident = (value.untyped_storage().data_ptr(), int(value.storage_offset()), tuple(value.shape), value.dtype)
            if value.numel() and ident in seen:  # tied weights: store once, remember the alias
                aliases[key] = seen[ident]
                continue
            seen[ident] = key
            out[key] = value.detach().contiguous()
        else:
            raise CheckpointFormatError(
                f"entry '{key}' is a {type(value).__name__}; only tensors, bytes and None can be stored"
            )
    return out, blobs, nones, aliases


def write_safetensors(ckpt: Checkpoint, dst: Path, *, max_shard_bytes: int | None = None) -> None:
    """A single file when ``dst`` ends in .safetensors, else a folder of shards plus the index."""
    if ckpt.rank_tensors is not None and len(ckpt.rank_tensors) > 1:
        raise CheckpointFormatError(
            f"{ckpt.layout} checkpoints with several ranks cannot be stored as one safetensors model; "
            "merge the partitions first with NeMo's megatron_change_num_partitions.py"
        )
    tensors, blobs, nones, aliases = _to_storable(dict(ckpt.tensors))
    metadata = _encode_metadata(ckpt, blobs, nones, aliases)
    if dst.suffix == ".safetensors":
        save_file(tensors, str(dst), metadata=metadata)
        return
    limit = max_shard_bytes or DEFAULT_MAX_SHARD_BYTES
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    dst.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(dst / name), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
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


def read_safetensors(src: str | Path) -> Checkpoint:
    src = Path(src)
    files = _shard_files(src)
    tensors: dict[str, Value] = {}
    meta: dict[str, str] | None = None
    for f in files:
        if not f.is_file():
            raise CheckpointFormatError(f"{f}: shard listed in the index is missing")
        try:
            with safe_open(str(f), framework="pt") as handle:
                meta = meta or handle.metadata() or {}
                for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                    tensors[key] = handle.get_tensor(key)
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            if isinstance(e, CheckpointFormatError):
                raise
            raise CheckpointFormatError(f"{f}: not a readable safetensors file ({e})") from e
    config, layout, artifacts, blobs, nones, aliases = _decode_metadata(meta or {}, src)
    for key in blobs:
        t = tensors[key]
        assert isinstance(t, torch.Tensor)
        tensors[key] = t.numpy().tobytes()
    for key in nones:
        tensors[key] = None
    for key, target in aliases.items():
        tensors[key] = tensors[target]
    return Checkpoint(tensors, config, layout, artifacts)
