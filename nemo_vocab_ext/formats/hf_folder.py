"""Hugging Face model folders: ``config.json`` beside ``model.safetensors`` or shards and their index.

The weights are read by the safetensors adapter (entries stream, stored bytes are copied without
decoding). The config is ``config.json`` as it is; every other file of the folder (tokenizer files,
``generation_config.json``, the index...) travels as an artifact and is written back unchanged, so a
resized folder differs from its source only in the vocabulary tables, ``config.json``'s
``vocab_size``, the index's ``total_size`` and the tokenizer files. The vocabulary tables come from
the architecture ``config.json`` names (:data:`~..core.keys.HF_ARCHITECTURES`).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..checkpoint import HF_LAYOUT, Checkpoint
from ..core.keys import UnknownArchitectureError
from ..entries import Entries, tensor_meta
from ..errors import CheckpointFormatError, UnsupportedError
from .folder import InFolder
from .safetensors_io import INDEX, SINGLE_NAME, _file_entries, _json, _Planned, _shard_files, shard_writer
from .untrusted import MAX_CONFIG_BYTES, check_config

CONFIG_FILE = "config.json"
# Files that hold the vocabulary itself, replaced whole by a new tokenizer's; a base file the new
# tokenizer lacks is dropped (it would describe the old vocabulary).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt")
# Files that name tokens by id (ids a merge keeps): the new tokenizer's where it has them, else the base's.
TOKENIZER_COMPANIONS = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
MAX_CARRIED_BYTES = 1 << 30  # a carried file is held in memory; tokenizers are megabytes
# Weights in other forms (PyTorch, TensorFlow, Flax, Meta's originals, GGUF) beside the safetensors:
# they hold the old vocabulary, so a resized folder leaves them behind.
_OTHER_WEIGHTS = (".bin", ".pth", ".pt", ".h5", ".msgpack", ".gguf", ".safetensors")
_OTHER_INDEXES = ("pytorch_model.bin.index.json", "tf_model.h5.index.json", "flax_model.msgpack.index.json")


def is_hf_folder(path: Path) -> bool:
    """A folder with ``config.json`` and Hugging Face safetensors weights (one file or an index)."""
    return (path / CONFIG_FILE).is_file() and ((path / INDEX).is_file() or (path / SINGLE_NAME).is_file())


def _weight_map(artifacts: dict[str, bytes], where: Path) -> dict[str, str] | None:
    if INDEX not in artifacts:
        return None
    index = _json(artifacts[INDEX], str(where / INDEX))
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    assert isinstance(index, dict) and isinstance(weight_map, dict)  # checked by _shard_files when the folder was read
    metadata = index.get("metadata", {})
    if not isinstance(metadata, dict):  # a resize sets its total_size
        raise CheckpointFormatError(f"{where / INDEX}: 'metadata' is a {type(metadata).__name__}, not a mapping")
    return weight_map


def _other_weights(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base in _OTHER_INDEXES or (base.endswith(_OTHER_WEIGHTS) and base != "training_args.bin")


def left_behind(src: Path) -> list[str]:
    """Files of the folder at ``src`` that a resized folder does not carry: weights in other forms (and
    safetensors files its index does not name)."""
    shards = {p.name for p in _shard_files(src)}
    return [name for name in InFolder(src).names() if name not in shards and _other_weights(name)]


def read_hf_folder(src: str | Path) -> Checkpoint:
    """The weights (read when used), ``config.json``, and every other file as an artifact, but weights
    in other forms (:func:`left_behind`)."""
    src = Path(src)
    folder = InFolder(src)
    if not folder.has(CONFIG_FILE):
        raise CheckpointFormatError(f"{src}: no {CONFIG_FILE}; not a Hugging Face model folder")
    data = folder.read(CONFIG_FILE, max_bytes=MAX_CONFIG_BYTES)
    config = check_config(_json(data, str(src / CONFIG_FILE)), src / CONFIG_FILE)
    shard_paths = _shard_files(src)
    shards = {p.name for p in shard_paths}
    artifacts: dict[str, bytes] = {}
    for name in folder.names():
        if name == CONFIG_FILE or name in shards or _other_weights(name):
            continue
        artifacts[name] = folder.read(name, max_bytes=MAX_CARRIED_BYTES)
    weight_map = _weight_map(artifacts, src)
    entries: dict[str, Any] = {}
    for path in shard_paths:
        found, _ = _file_entries(path)
        if weight_map is not None:
            listed = {k for k, v in weight_map.items() if v == path.name}
            if set(found) != listed:
                odd = sorted(set(found) ^ listed)[0]
                where = "lists" if odd in listed else "does not list"
                raise CheckpointFormatError(
                    f"{path}: the index {where} '{odd}' in this shard, but its header disagrees; the folder is damaged"
                )
        entries.update(found)
    ckpt = Checkpoint(Entries(entries), dict(config), HF_LAYOUT, artifacts)
    try:
        ckpt.vocab_keys()
    except UnknownArchitectureError as e:
        raise UnsupportedError(f"{src / CONFIG_FILE}: {e}") from None
    return ckpt


def write_hf_folder(ckpt: Checkpoint, dst: Path) -> None:
    """``config.json``, every artifact as it is, and the weights in the shards the index names (one
    ``model.safetensors`` without an index), each shard's entries in their order."""
    if ckpt.layout != HF_LAYOUT:
        raise UnsupportedError(
            f"{dst}: a {ckpt.layout} checkpoint cannot be written as a Hugging Face model folder; "
            "use NeMo's Hugging Face exporters"
        )
    dst.mkdir(parents=True)
    (dst / CONFIG_FILE).write_text(json.dumps(ckpt.config, indent=2) + "\n")
    for name, data in ckpt.artifacts.items():
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        (dst / name).write_bytes(data)
    weight_map = _weight_map(ckpt.artifacts, dst)
    shards: dict[str, list[_Planned]] = {}
    for key in ckpt.tensors:
        meta = tensor_meta(ckpt.tensors, key)
        shard = SINGLE_NAME if weight_map is None else weight_map.get(key)
        if meta is None or shard is None:
            raise CheckpointFormatError(f"{dst}: entry '{key}' is not a tensor the index places in a shard")
        shape, dtype = meta
        shards.setdefault(shard, []).append(_Planned(key, dtype, shape, math.prod(shape) * dtype.itemsize))
    with contextlib.ExitStack() as stack:
        writers = [
            stack.enter_context(contextlib.closing(shard_writer(dst / shard, planned, ckpt.tensors, {"format": "pt"})))
            for shard, planned in shards.items()
        ]
        # Every shard's stored entries first, then the computed tables in shard order: a resize's
        # embedding and output layer lie in different shards, and the copy then never waits for the
        # first table while another shard's bytes are still to copy.
        for writer in writers:
            next(writer)
        for writer in writers:
            next(writer, None)


def _totals(ckpt: Checkpoint) -> tuple[int, int]:
    """The bytes and the elements of every stored tensor, as an index's ``total_size`` and
    ``total_parameters`` count them."""
    size = parameters = 0
    for key in ckpt.tensors:
        if (meta := tensor_meta(ckpt.tensors, key)) is not None:
            parameters += math.prod(meta[0])
            size += math.prod(meta[0]) * meta[1].itemsize
    return size, parameters


def with_new_rows(ckpt: Checkpoint, rows: int) -> Checkpoint:
    """A resized folder's ``config.json`` (``vocab_size``: the table's rows, as transformers builds it)
    and index (``total_size``)."""
    artifacts = dict(ckpt.artifacts)
    if INDEX in artifacts:
        index = json.loads(artifacts[INDEX])
        metadata = index.setdefault("metadata", {})
        metadata["total_size"], parameters = _totals(ckpt)
        if "total_parameters" in metadata:  # written by transformers since 4.52
            metadata["total_parameters"] = parameters
        artifacts[INDEX] = (json.dumps(index, indent=2) + "\n").encode()
    return replace(ckpt, config=dict(ckpt.config, vocab_size=rows), artifacts=artifacts)


def new_tokenizer_files(tokenizer: Path) -> dict[str, Path]:
    """The files of a tokenizer (a folder, a tokenizer.json or a SentencePiece .model) under the names a
    Hugging Face folder gives them."""
    if tokenizer.is_dir():
        names = (*TOKENIZER_FILES, *TOKENIZER_COMPANIONS)
        return {name: tokenizer / name for name in names if (tokenizer / name).is_file()}
    if tokenizer.suffix == ".model":
        return {"tokenizer.model": tokenizer}
    if tokenizer.name in ("vocab.json", "merges.txt"):
        return new_tokenizer_files(tokenizer.parent)
    return {"tokenizer.json": tokenizer}


def with_tokenizer(ckpt: Checkpoint, tokenizer: Path) -> tuple[Checkpoint, list[str]]:
    """``ckpt`` with the tokenizer files of ``tokenizer`` in place of its own, and what changed."""
    files = new_tokenizer_files(tokenizer)
    artifacts = dict(ckpt.artifacts)
    dropped = [name for name in TOKENIZER_FILES if name in artifacts and name not in files]
    for name in dropped:
        del artifacts[name]
    for name, path in files.items():
        artifacts[name] = path.read_bytes()
    lines = [f"tokenizer files: {', '.join(files)} from {tokenizer}"]
    if dropped:
        lines.append(
            f"removed the base's {', '.join(dropped)}: the new tokenizer has no such file, "
            "and the base's would describe the old vocabulary"
        )
    return replace(ckpt, artifacts=artifacts), lines


def hf_tokenizer_files(ckpt: Checkpoint, out_dir: Path) -> Path | None:
    """Write the folder's own tokenizer to ``out_dir`` as transformers loads it: ``tokenizer.json`` where
    there is one (a ``vocab.json`` beside it lacks the added tokens), else ``tokenizer.model``, else
    ``vocab.json`` + ``merges.txt``; None when it has none."""
    for names in (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt")):
        if all(name in ckpt.artifacts for name in names):
            for name in (*names, *TOKENIZER_COMPANIONS):
                if name in ckpt.artifacts:
                    (out_dir / name).write_bytes(ckpt.artifacts[name])
            return out_dir
    return None
