"""Write synthetic Megatron GPT checkpoints of real shapes, through this project's own writers.

The keys, shapes and ``_extra_state`` entries are those NeMo 2.4.1 stores for an mcore GPT built
with the local layer spec (no Transformer Engine, ``megatron_amp_O2=False``, learned absolute
positions, LayerNorm with bias); ``tests/test_make_checkpoint.py`` checks them against a model
built by NeMo itself and restores the generated files in NeMo. Values are seeded random numbers
(bf16 by default), the same in every layout and format for a given seed. The tokenizer embedded
in the checkpoint is a byte-level BPE of exactly the vocabulary size, trained with the project's
``train_bpe`` on a generated corpus (cached: a 50257-token one takes ~30 s).

Examples::

    python tools/make_checkpoint.py --size 1.3b --out bench/gpt1.3b.nemo
    python tools/make_checkpoint.py --size 1.3b --untied --layout single --format ckpt --out bench/gpt.ckpt
    python tools/make_checkpoint.py --size tiny --format safetensors --out /tmp/tiny.safetensors \\
        --merged-tokenizer /tmp/merged_tok

``--format ckpt`` writes NeMo's distributed training-checkpoint folder for ``--layout distributed``
and one Lightning file for ``--layout single``. Memory: the library's writers take the whole
state dict, so the tensors of one checkpoint are held at once (2.6 GB for the 1.3B in bf16);
each is built on its own, one layer at a time, without a float32 copy of the whole.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import pickle
import struct
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import checkout_root  # noqa: F401 (the harness)
import numpy as np
import torch

from nemo_vocab_ext.core.keys import EMBEDDING_KEYS, MCORE, OUTPUT_LAYER_KEYS
from nemo_vocab_ext.core.layers import LAYERS, NORM_NAMES, OUTPUT_EXTRA_STATE

# ------------------------------------------------------------------------------------------ shapes


@dataclass(frozen=True)
class ModelShape:
    """A GPT's sizes; ``vocab`` is the tokenizer size as NeMo counts it, ``new_tokens`` what the
    merged tokenizer of the resize benchmark adds."""

    num_layers: int
    hidden: int
    ffn: int
    heads: int
    seq: int
    vocab: int
    new_tokens: int
    divisible_by: int = 128

    @property
    def padded_vocab(self) -> int:
        return math.ceil(self.vocab / self.divisible_by) * self.divisible_by  # at TP=1

    @property
    def padded_new_vocab(self) -> int:
        return math.ceil((self.vocab + self.new_tokens) / self.divisible_by) * self.divisible_by

    def num_parameters(self, tied: bool) -> int:
        return sum(math.prod(s) * n for _, s, n in tensor_specs(self, tied))


# GPT-3 paper shapes with GPT-2's 50257-token vocabulary (NeMo's megatron_gpt 126m/350m/1.3b), plus
# "tiny": the test fixtures' config (tests/conftest.py builds the same one with NeMo).
SIZES: dict[str, ModelShape] = {
    "tiny": ModelShape(num_layers=2, hidden=64, ffn=256, heads=4, seq=64, vocab=500, new_tokens=200),
    "125m": ModelShape(num_layers=12, hidden=768, ffn=3072, heads=12, seq=2048, vocab=50257, new_tokens=7000),
    "350m": ModelShape(num_layers=24, hidden=1024, ffn=4096, heads=16, seq=2048, vocab=50257, new_tokens=7000),
    "1.3b": ModelShape(num_layers=24, hidden=2048, ffn=8192, heads=16, seq=2048, vocab=50257, new_tokens=7000),
}

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# What NeMo writes into model_config.yaml for the trainer precision that goes with each dtype.
PRECISION = {"bf16": "bf16-mixed", "fp16": "16-mixed", "fp32": "32-true"}

# ------------------------------------------------------------------------------------ key tables
# As NeMo 2.4.1 stores an mcore GPT (local layer spec). Per decoder layer, single-file names, in
# stored order; a shape is (rows, cols) in units of (hidden h, ffn f), None for an empty _extra_state.

_LAYER_KEYS: tuple[tuple[str, tuple[str, ...] | None], ...] = (
    ("input_layernorm.weight", ("h",)),
    ("input_layernorm.bias", ("h",)),
    ("self_attention.linear_proj.weight", ("h", "h")),
    ("self_attention.linear_proj.bias", ("h",)),
    ("self_attention.linear_proj._extra_state", None),
    ("self_attention.linear_qkv.weight", ("3h", "h")),
    ("self_attention.linear_qkv.bias", ("3h",)),
    ("self_attention.linear_qkv._extra_state", None),
    ("pre_mlp_layernorm.weight", ("h",)),
    ("pre_mlp_layernorm.bias", ("h",)),
    ("mlp.linear_fc1.weight", ("f", "h")),
    ("mlp.linear_fc1.bias", ("f",)),
    ("mlp.linear_fc1._extra_state", None),
    ("mlp.linear_fc2.weight", ("h", "f")),
    ("mlp.linear_fc2.bias", ("h",)),
    ("mlp.linear_fc2._extra_state", None),
)
EMBEDDING = EMBEDDING_KEYS[MCORE]
POSITIONS = "model.embedding.position_embeddings.weight"
OUTPUT_LAYER = OUTPUT_LAYER_KEYS[MCORE]
FINAL_NORM = ("model.decoder.final_layernorm.weight", "model.decoder.final_layernorm.bias")


def _dims(shape: ModelShape, units: tuple[str, ...]) -> tuple[int, ...]:
    sizes = {"h": shape.hidden, "3h": 3 * shape.hidden, "f": shape.ffn}
    return tuple(sizes[u] for u in units)


def tensor_specs(shape: ModelShape, tied: bool) -> Iterator[tuple[str, tuple[int, ...], int]]:
    """(single-file key with ``{i}`` for the layer, shape of one, how many) of every tensor."""
    yield EMBEDDING, (shape.padded_vocab, shape.hidden), 1
    yield POSITIONS, (shape.seq, shape.hidden), 1
    for name, units in _LAYER_KEYS:
        if units is not None:
            yield f"{LAYERS}{{i}}.{name}", _dims(shape, units), shape.num_layers
    for key in FINAL_NORM:
        yield key, (shape.hidden,), 1
    if not tied:
        yield OUTPUT_LAYER, (shape.padded_vocab, shape.hidden), 1


@dataclass(frozen=True)
class Spec:
    """One stored entry: a tensor of ``shape`` (stacked over ``layers`` in the distributed layout),
    or, with ``shape`` None, an empty ``_extra_state`` (None in a state dict, a blob when distributed).
    ``source`` names the single-file key(s) whose values it holds (``{i}`` for the layer)."""

    key: str
    shape: tuple[int, ...] | None
    source: str
    layers: int | None = None  # stacked over this many layers
    layer: int | None = None  # one layer's blob


def key_specs(shape: ModelShape, layout: str, tied: bool) -> list[Spec]:
    """Every entry a NeMo 2.4.1 checkpoint of this shape stores, in NeMo's order."""
    specs = [
        Spec(EMBEDDING, (shape.padded_vocab, shape.hidden), EMBEDDING),
        Spec(POSITIONS, (shape.seq, shape.hidden), POSITIONS),
    ]
    n = shape.num_layers
    if layout == "single":
        for i in range(n):
            for name, units in _LAYER_KEYS:
                key = f"{LAYERS}{i}.{name}"
                specs.append(Spec(key, None if units is None else _dims(shape, units), key))
    elif layout == "distributed":
        for name, units in _LAYER_KEYS:
            source = f"{LAYERS}{{i}}.{name}"
            if units is None:  # megatron stores each layer's extra state as its own object
                specs += [Spec(f"{LAYERS}{name}/shard_{i}_{n}", None, source, layer=i) for i in range(n)]
            else:
                specs.append(Spec(LAYERS + NORM_NAMES.get(name, name), (n, *_dims(shape, units)), source, n))
    else:
        raise ValueError(f"layout must be 'distributed' or 'single', not {layout!r}")
    specs += [Spec(key, (shape.hidden,), key) for key in FINAL_NORM]
    if not tied:
        specs.append(Spec(OUTPUT_LAYER, (shape.padded_vocab, shape.hidden), OUTPUT_LAYER))
    if layout == "single":  # always there in an mcore state dict; None without Transformer Engine
        specs.append(Spec(OUTPUT_EXTRA_STATE, None, OUTPUT_EXTRA_STATE))
    return specs


# ------------------------------------------------------------------------------------------ values


def _generator(seed: int, key: str) -> torch.Generator:
    # One stream per single-file key: a value does not depend on the layout, order or other keys.
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def fill_value(out: torch.Tensor, key: str, seed: int) -> torch.Tensor:
    """Fill ``out`` with ``key``'s deterministic values: N(0, 0.02), norm weights around 1."""
    noise = torch.randn(out.shape, generator=_generator(seed, key)).mul_(0.02)
    if key.endswith("layernorm.weight"):
        noise.add_(1.0)
    return out.copy_(noise)


def empty_extra_state_blob() -> bytes:
    """What megatron stores for a module whose extra state is None: ``torch.save([None])``."""
    buf = io.BytesIO()
    torch.save([None], buf)
    return buf.getvalue()


def generate_tensors(
    shape: ModelShape, layout: str, tied: bool, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16
) -> Iterator[tuple[str, torch.Tensor | bytes | None]]:
    """Every stored entry with its value, built one at a time (a stacked tensor one layer at a time)."""
    blob = empty_extra_state_blob()
    for spec in key_specs(shape, layout, tied):
        if spec.shape is None:
            yield spec.key, (blob if layout == "distributed" else None)
        elif spec.layers is None:
            yield spec.key, fill_value(torch.empty(spec.shape, dtype=dtype), spec.source, seed)
        else:
            stacked = torch.empty(spec.shape, dtype=dtype)
            for i in range(spec.layers):
                fill_value(stacked[i], spec.source.format(i=i), seed)
            yield spec.key, stacked


# --------------------------------------------------------------------------------------- tokenizers

_LATIN = (
    [*"bcdfghjklmnprstvwz", "ch", "sh", "th", "tr", "st", "pl", "gr", "br", "kr", "fl"],
    [*"aeiouy", "ai", "ea", "ou", "ee", "oo", "io"],
    ["", "", "", "", "", "", *"nrstlmkd", "ng", "st", "nd"],
)
# A second script for the new language: Cyrillic letters are two UTF-8 bytes the base never saw.
_CYRILLIC = (
    [*"бвгджзклмнпрстфхцчшщ"],
    [*"аеиоуыэюяё"],
    ["", "", "", "", *"йнрлмск"],
)


def synthetic_corpus(
    letters: tuple[list[str], list[str], list[str]], words: int, tokens: int, seed: int
) -> Iterator[str]:
    """Lines of a made-up language: ``words`` distinct words of 1-4 syllables, Zipf-distributed,
    about ``tokens`` words in all, every word at least twice (BPE's default min_frequency)."""
    rng = np.random.default_rng(seed)
    onsets, vowels, codas = letters
    syllables = [o + v + c for o in onsets for v in vowels for c in codas]
    lexicon: list[str] = []
    seen: set[str] = set()
    while len(lexicon) < words:
        for length, picks in zip(
            rng.integers(1, 5, size=words), rng.integers(0, len(syllables), size=(words, 4)), strict=True
        ):
            word = "".join(syllables[j] for j in picks[:length])
            if word not in seen and len(lexicon) < words:
                seen.add(word)
                lexicon.append(word)
    ranks = np.arange(1, words + 1)
    counts = np.maximum(2, (tokens / ranks**0.9 / 25).astype(np.int64))
    order = rng.permutation(np.repeat(np.arange(words), counts))
    for start in range(0, len(order), 1000):
        yield " ".join(lexicon[k] for k in order[start : start + 1000])


def _corpus_size(vocab: int) -> tuple[int, int]:
    """(distinct words, words in all) that leave BPE more candidate merges than ``vocab`` needs."""
    return max(2000, 3 * vocab), max(50_000, 100 * vocab)


def make_base_tokenizer(vocab_size: int, out_dir: Path, *, seed: int = 0) -> Path:
    """A GPT-2 style byte-level BPE of exactly ``vocab_size`` tokens (``<|endoftext|>`` = 0) in ``out_dir``.

    Reused when ``out_dir`` already holds one of that size.
    """
    from nemo_vocab_ext.tokenization.load import load_tokenizer
    from nemo_vocab_ext.tokenization.train import train_bpe

    if (out_dir / "vocab.json").is_file() and load_tokenizer(out_dir).vocab_size == vocab_size:
        return out_dir
    words, tokens = _corpus_size(vocab_size)
    train_bpe(synthetic_corpus(_LATIN, words, tokens, seed), out_dir, vocab_size)
    got = load_tokenizer(out_dir).vocab_size
    if got != vocab_size:  # the corpus ran out of merges
        raise RuntimeError(f"{out_dir}: trained {got} tokens instead of {vocab_size}; enlarge the synthetic corpus")
    return out_dir


def make_merged_tokenizer(base_dir: Path, new_tokens: int, out_dir: Path, *, seed: int = 0) -> Path:
    """``base_dir``'s tokenizer plus exactly ``new_tokens`` tokens of a second (Cyrillic) made-up language,
    merged with the project's ``merge_bpe`` (base ids kept). Reused when ``out_dir`` holds it already."""
    from nemo_vocab_ext.tokenization.load import load_tokenizer
    from nemo_vocab_ext.tokenization.merge import merge_bpe, write_gpt2_bpe
    from nemo_vocab_ext.tokenization.train import train_bpe

    base = load_tokenizer(base_dir)
    if (out_dir / "vocab.json").is_file() and load_tokenizer(out_dir).vocab_size == base.vocab_size + new_tokens:
        return out_dir
    with tempfile.TemporaryDirectory() as tmp:
        words, tokens = _corpus_size(new_tokens)
        trained = load_tokenizer(
            train_bpe(synthetic_corpus(_CYRILLIC, words, tokens, seed + 1), Path(tmp) / "new", new_tokens + 400)
        )
        # A BPE cut after its first m merges is still a BPE: cut where exactly new_tokens tokens are new.
        known = set(base.tokens)
        results = {a + b for a, b in trained.merges}
        alphabet = [t for t in trained.tokens if t not in results]
        added = sum(t not in known for t in alphabet)
        cut = 0
        while added < new_tokens and cut < len(trained.merges):
            added += (trained.merges[cut][0] + trained.merges[cut][1]) not in known
            cut += 1
        if added != new_tokens:
            raise RuntimeError(f"the new-language BPE has only {added} tokens the base lacks, {new_tokens} wanted")
        merges = trained.merges[:cut]
        cut_dir = Path(tmp) / "cut"
        write_gpt2_bpe(cut_dir, [*alphabet, *(a + b for a, b in merges)], merges)
        result = merge_bpe(base_dir, cut_dir, out_dir)
    if result.tokens_added != new_tokens:
        raise RuntimeError(f"{out_dir}: merging added {result.tokens_added} tokens, {new_tokens} wanted")
    return out_dir


# ------------------------------------------------------------------------------------------ writing


def model_config(shape: ModelShape, tied: bool, tokenizer_dir: Path, dtype_name: str) -> dict[str, Any]:
    """The ``model_config.yaml`` NeMo writes for this shape (the CPU-runnable tiny test config, resized)."""
    from omegaconf import OmegaConf

    from harness.tiny import tiny_model_config

    cfg = tiny_model_config(
        tokenizer_dir / "vocab.json",
        tokenizer_dir / "merges.txt",
        tied=tied,
        num_layers=shape.num_layers,
        hidden=shape.hidden,
        ffn=shape.ffn,
        heads=shape.heads,
        seq=shape.seq,
        divisible_by=shape.divisible_by,
    )
    config = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(config, dict)
    # Keys NeMo's save_to adds.
    config["precision"] = PRECISION[dtype_name]
    config["target"] = "nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel"
    config["nemo_version"] = "2.4.1"
    return config  # type: ignore[return-value]


def build_checkpoint(
    shape: ModelShape, *, layout: str, tied: bool, tokenizer_dir: Path, seed: int = 0, dtype_name: str = "bf16"
) -> Any:
    """A :class:`nemo_vocab_ext.checkpoint.Checkpoint` with the tokenizer embedded as NeMo artifacts."""
    from nemo_vocab_ext.checkpoint import Checkpoint
    from nemo_vocab_ext.formats.nemo import embed_tokenizer
    from nemo_vocab_ext.tokenization.load import load_tokenizer

    got = load_tokenizer(tokenizer_dir).vocab_size
    if got != shape.vocab:
        raise ValueError(f"{tokenizer_dir}: {got} tokens, but this shape has a {shape.vocab}-token vocabulary")
    tensors = dict(generate_tensors(shape, layout, tied, seed=seed, dtype=DTYPES[dtype_name]))
    ckpt = Checkpoint(tensors, model_config(shape, tied, tokenizer_dir, dtype_name), layout, {})
    files = {"vocab_file": tokenizer_dir / "vocab.json", "merge_file": tokenizer_dir / "merges.txt"}
    return embed_tokenizer(ckpt, files)


def write_checkpoint(
    out: Path,
    fmt: str,
    shape: ModelShape,
    *,
    layout: str,
    tied: bool,
    tokenizer_dir: Path,
    seed: int = 0,
    dtype_name: str = "bf16",
    force: bool = False,
) -> Path:
    """Build and write with ``nemo_vocab_ext.io.save_checkpoint`` (which reads everything back and compares)."""
    from nemo_vocab_ext.io import Format, save_checkpoint

    ckpt = build_checkpoint(
        shape, layout=layout, tied=tied, tokenizer_dir=tokenizer_dir, seed=seed, dtype_name=dtype_name
    )
    save_checkpoint(ckpt, out, Format(fmt), force=force)
    return out


# ------------------------------------------------------------------------- reading what was stored
# Independent of the library's readers: the tests compare NeMo's own files with generated ones, and
# the benchmark takes its memory budget from the file it benchmarks.


@dataclass(frozen=True)
class Stored:
    """One stored entry: a tensor's shape and dtype, a blob's length, or None for an empty extra state."""

    kind: str  # "tensor", "bytes" or "none"
    shape: tuple[int, ...] = ()
    dtype: str = ""
    nbytes: int = 0


def _dist_entries(metadata: bytes, distcp: dict[str, bytes] | None = None) -> dict[str, Stored]:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    md = pickle.loads(metadata)  # names megatron-core classes when NeMo wrote it; for trusted files only
    lengths = {index.fqn: info.length for index, info in md.storage_data.items()}
    out: dict[str, Stored] = {}
    for key, entry in md.state_dict_metadata.items():
        if isinstance(entry, TensorStorageMetadata):
            dtype = entry.properties.dtype
            nbytes = math.prod(entry.size) * dtype.itemsize
            out[key] = Stored("tensor", tuple(entry.size), str(dtype).removeprefix("torch."), nbytes)
        elif isinstance(entry, BytesStorageMetadata):
            out[key] = Stored("bytes", nbytes=lengths[key])
    return out


def _state_dict_entries(state: dict[str, Any]) -> dict[str, Stored]:
    out = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            dtype = str(value.dtype).removeprefix("torch.")
            out[key] = Stored("tensor", tuple(value.shape), dtype, value.numel() * value.element_size())
        else:
            out[key] = Stored("none" if value is None else type(value).__name__)
    return out


def _safetensors_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return [path / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [path / "model.safetensors"]


def _safetensors_entries(path: Path) -> dict[str, Stored]:
    names = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "U8": "uint8"}
    out = {}
    for f in _safetensors_files(path):
        with open(f, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        # nemo-vocab-ext stores byte entries (_extra_state blobs) as uint8 tensors and lists them here.
        blobs = set(json.loads(header.get("__metadata__", {}).get("nemo_vocab_ext.blobs", "[]")))
        for key, info in header.items():
            if key != "__metadata__":
                begin, end = info["data_offsets"]
                if key in blobs:
                    out[key] = Stored("bytes", nbytes=end - begin)
                else:
                    dtype = names.get(info["dtype"], info["dtype"])
                    out[key] = Stored("tensor", tuple(info["shape"]), dtype, end - begin)
    return out


def stored_entries(path: str | Path) -> dict[str, Stored]:
    """Every entry ``path`` stores (.nemo, distributed or Lightning .ckpt, safetensors), from its own
    metadata where it has some. Single-file state dicts are loaded whole: small files only."""
    path = Path(path)
    if path.suffix == ".safetensors" or (path / "model.safetensors.index.json").is_file():
        return _safetensors_entries(path)
    if path.is_dir() and (path / ".metadata").is_file():
        return _dist_entries((path / ".metadata").read_bytes())
    if path.suffix == ".ckpt":
        payload = torch.load(path, map_location="cpu", weights_only=False)
        return _state_dict_entries(payload["state_dict"])
    with tarfile.open(path) as tar:
        members = {m.name.removeprefix("./"): m for m in tar.getmembers()}
        member = members.get("model_weights/.metadata")
        if member is not None:
            return _dist_entries(_read_member(tar, member))
        data = _read_member(tar, members["model_weights.ckpt"])
    return _state_dict_entries(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(member)
    assert f is not None
    return f.read()


def largest_stored_tensor_bytes(path: str | Path) -> int:
    """The largest tensor ``path`` stores, in bytes, from metadata only (no tensor data is read).

    Single-file state dicts (``torch.save`` zips) keep one storage record per tensor (``data/N``),
    so the zip's directory gives the sizes.
    """
    path = Path(path)
    if path.suffix == ".safetensors" or path.is_dir():
        return max(e.nbytes for e in stored_entries(path).values() if e.kind == "tensor")
    if path.suffix == ".ckpt":
        with zipfile.ZipFile(path) as z:
            return _largest_storage(z)
    with tarfile.open(path) as tar:
        members = {m.name.removeprefix("./"): m for m in tar.getmembers()}
        if "model_weights/.metadata" in members:
            entries = _dist_entries(_read_member(tar, members["model_weights/.metadata"]))
            return max(e.nbytes for e in entries.values() if e.kind == "tensor")
        f = tar.extractfile(members["model_weights.ckpt"])
        assert f is not None
        with zipfile.ZipFile(f) as z:  # tar members of a plain tar are seekable
            return _largest_storage(z)


def _largest_storage(z: zipfile.ZipFile) -> int:
    return max(i.file_size for i in z.infolist() if "/data/" in i.filename)


# ---------------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("Examples::")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--size", choices=sorted(SIZES), default="tiny", help="model shape (default tiny)")
    tie = p.add_mutually_exclusive_group()
    tie.add_argument("--tied", dest="tied", action="store_true", default=True, help="shared embedding (default)")
    tie.add_argument("--untied", dest="tied", action="store_false", help="own output layer")
    p.add_argument("--layout", choices=["distributed", "single"], default="distributed")
    p.add_argument("--format", choices=["nemo", "ckpt", "safetensors"], help="default: from --out's suffix")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", type=Path, help="embed this vocab.json+merges.txt folder (default: a generated one)")
    p.add_argument("--tokenizer-cache", type=Path, help="where generated tokenizers live (default: beside --out)")
    p.add_argument("--merged-tokenizer", type=Path, help="also write the base tokenizer plus --new-tokens here")
    p.add_argument("--new-tokens", type=int, help="tokens the merged tokenizer adds (default: the size's)")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    return p.parse_args(argv)


def base_tokenizer_dir(cache: Path, vocab: int, seed: int) -> Path:
    return cache / f"bpe{vocab}_seed{seed}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shape = SIZES[args.size]
    fmt = args.format or args.out.suffix.lstrip(".")
    if fmt not in ("nemo", "ckpt", "safetensors"):
        print(f"error: cannot tell the format from {args.out}; pass --format", file=sys.stderr)
        return 2
    cache = args.tokenizer_cache or args.out.parent / "tokenizers"
    tok = args.tokenizer or make_base_tokenizer(
        shape.vocab, base_tokenizer_dir(cache, shape.vocab, args.seed), seed=args.seed
    )
    if args.merged_tokenizer is not None:
        new_tokens = shape.new_tokens if args.new_tokens is None else args.new_tokens
        make_merged_tokenizer(tok, new_tokens, args.merged_tokenizer, seed=args.seed)
        print(f"wrote {args.merged_tokenizer} ({shape.vocab} + {new_tokens} tokens)")
    write_checkpoint(
        args.out,
        fmt,
        shape,
        layout=args.layout,
        tied=args.tied,
        tokenizer_dir=tok,
        seed=args.seed,
        dtype_name=args.dtype,
        force=args.force,
    )
    params = shape.num_parameters(args.tied)
    print(
        f"wrote {args.out} ({fmt}, {args.layout}, {'tied' if args.tied else 'untied'}, {args.size}: "
        f"{params / 1e6:.1f}M parameters, {args.dtype}, {shape.padded_vocab} rows, tokenizer {tok})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
