"""Property-based fuzzing of every checkpoint reader, in-process, with hypothesis.

Seeds are tiny checkpoints written by the project's own writers (``tools/make_checkpoint.py``'s
``tiny`` shape) in every container a reader takes: .nemo as a plain tar, a tar.gz and an extracted
folder (distributed ``model_weights/`` and single ``model_weights.ckpt`` layouts), a Lightning
``.ckpt`` file and a distributed ``.ckpt`` folder, one safetensors file and a sharded folder with
its index; and, written by the libraries that make them, a Hugging Face model folder (transformers'
``save_pretrained``, sharded, with its tokenizer files) and Megatron run folders (megatron-core's
``dist_checkpointing.save`` through ``harness/megatron_run.py``, as Megatron-LM leaves them and as
Megatron-Bridge does: no args, a ``run_config.yaml``, its train state). Each case mutates a seed
(raw bytes; pickle opcodes; safetensors and JSON headers; torch_dist ``.metadata`` records; the YAML
config; a run's tracker, its pickled args, Bridge's run config; a config.json's keys; an index's
shard names; archive members, folder files swapped) and runs what a command runs on it: ``read``
(inspect, validate, every entry read), ``convert`` to another format, or ``resize``.

The property: the command succeeds, or fails with the project's own error class; never another
exception, never past a deadline, never an open, write or rename outside the input (read-only),
the output folder and the temporary folder, nothing left behind outside the output, the input
unchanged; a convert or resize that succeeds has written an output that reads back whole, equal to
what was read, and validates.

    python tools/fuzz.py --examples 2000            # every reader, 2000 cases each
    python tools/fuzz.py --reader st_file --examples 500
    python tools/fuzz.py --repro '<a case as printed>'  # one case, with its traceback

``tests/test_fuzz.py`` runs the same strategies, bounded and derandomized, in CI.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gzip
import hashlib
import io
import json
import math
import os
import pickle
import pickletools
import resource
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
sys.path.insert(1, str(TOOLS.parent))  # harness/: the Megatron seed is saved by megatron-core through it

from make_checkpoint import SIZES, build_checkpoint, make_base_tokenizer  # noqa: E402

import nemo_vocab_ext  # noqa: E402
from nemo_vocab_ext.core.keys import UnknownKeysError  # noqa: E402
from nemo_vocab_ext.errors import VocabExtError  # noqa: E402

# Errors the CLI edge reports as one line for bad input (cli_common.report_errors, OS errors aside).
CLEAN_ERRORS = (VocabExtError, UnknownKeysError)
PACKAGE_DIR = str(Path(nemo_vocab_ext.__path__[0]).resolve())  # where a traceback frame is the reader's

# ------------------------------------------------------------------------------------------- seeds


@dataclass
class Seed:
    """A checkpoint as members (relative path -> bytes) and how they are put together: ``tar``,
    ``tgz`` or ``dir`` (the input is a folder of the members), or ``file`` (one member, the input)."""

    name: str
    container: str
    filename: str
    members: list[tuple[str, bytes]] = field(repr=False)  # no megabytes in hypothesis' reports


READERS = (
    "nemo_tar_dist",
    "nemo_tar_single",
    "nemo_tgz_dist",
    "nemo_dir_dist",
    "nemo_dir_single",
    "ckpt_file",
    "ckpt_dir",
    "st_file",
    "st_sharded",
)
# Folders other libraries write: a Hugging Face model (transformers), Megatron runs (megatron-core).
FOREIGN_READERS = ("hf_sharded", "megatron_lm", "megatron_bridge")
READERS += FOREIGN_READERS


def _folder_members(root: Path) -> list[tuple[str, bytes]]:
    return [(p.relative_to(root).as_posix(), p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()]


def build_seeds(root: Path) -> dict[str, Seed]:
    """Every reader's seed: the project's formats written by its writers (each read back and checked as it
    is written), the Hugging Face folder by transformers, the Megatron runs by megatron-core."""
    from nemo_vocab_ext.formats.lightning import write_lightning
    from nemo_vocab_ext.formats.nemo import write_nemo, write_nemo_dir
    from nemo_vocab_ext.formats.safetensors_io import write_safetensors
    from nemo_vocab_ext.io import Format, load_checkpoint, verify_written

    tok = make_base_tokenizer(SIZES["tiny"].vocab, root / "tokenizer")
    ckpts = {
        layout: build_checkpoint(SIZES["tiny"], layout=layout, tied=layout == "distributed", tokenizer_dir=tok)
        for layout in ("distributed", "single")
    }
    dist, single = ckpts["distributed"], ckpts["single"]
    out = root / "seeds"
    out.mkdir()
    writes: list[tuple[str, Any, Callable[[Any, Path], None], Format, str]] = [
        ("nemo_dist.nemo", dist, write_nemo, Format.NEMO, "tar"),
        ("nemo_single.nemo", single, write_nemo, Format.NEMO, "tar"),
        ("nemo_dir_dist", dist, write_nemo_dir, Format.NEMO, "dir"),
        ("nemo_dir_single", single, write_nemo_dir, Format.NEMO, "dir"),
        ("single.ckpt", single, write_lightning, Format.CKPT, "file"),
        ("dist.ckpt", dist, write_lightning, Format.CKPT, "dir"),
        ("model.safetensors", single, write_safetensors, Format.SAFETENSORS, "file"),
        ("sharded", dist, lambda c, p: write_safetensors(c, p, max_shard_bytes=64_000), Format.SAFETENSORS, "dir"),
    ]
    found: dict[str, tuple[str, list[tuple[str, bytes]]]] = {}
    for name, ckpt, write, fmt, container in writes:
        path = out / name
        write(ckpt, path)
        verify_written(ckpt, load_checkpoint(path, fmt)[0], path, bitwise=True)
        if container == "tar":
            with tarfile.open(path) as tar:
                members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]  # type: ignore[union-attr]
        elif container == "dir":
            members = _folder_members(path)
        else:
            members = [("", path.read_bytes())]
        found[name] = (container, members)
    spec = {
        "nemo_tar_dist": ("nemo_dist.nemo", "tar", "model.nemo"),
        "nemo_tar_single": ("nemo_single.nemo", "tar", "model.nemo"),
        "nemo_tgz_dist": ("nemo_dist.nemo", "tgz", "model.nemo"),
        "nemo_dir_dist": ("nemo_dir_dist", "dir", "model_nemo"),
        "nemo_dir_single": ("nemo_dir_single", "dir", "model_nemo"),
        "ckpt_file": ("single.ckpt", "file", "model.ckpt"),
        "ckpt_dir": ("dist.ckpt", "dir", "model.ckpt"),
        "st_file": ("model.safetensors", "file", "model.safetensors"),
        "st_sharded": ("sharded", "dir", "model_st"),
    }
    seeds = {r: Seed(r, container, filename, found[src][1]) for r, (src, container, filename) in spec.items()}
    seeds["hf_sharded"] = Seed("hf_sharded", "dir", "model_hf", _folder_members(_hf_folder(tok, root / "hf")))
    run = _megatron_run(tok, root / "megatron")
    seeds["megatron_lm"] = Seed("megatron_lm", "dir", "run", _folder_members(run))
    seeds["megatron_bridge"] = Seed("megatron_bridge", "dir", "run", _folder_members(_bridge_run(run, root / "bridge")))
    return seeds


def _hf_folder(tok: Path, out: Path) -> Path:
    """A tiny untied Llama and its tokenizer (``tok``'s BPE), saved by transformers in three shards."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2TokenizerFast, LlamaConfig

    tokenizer = GPT2TokenizerFast(str(tok / "vocab.json"), str(tok / "merges.txt"), eos_token="<|endoftext|>")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out, max_shard_size="20KB")
    tokenizer.save_pretrained(out)
    return out


def _megatron_run(tok: Path, out: Path) -> Path:
    """A Megatron-LM run folder saved by megatron-core (in its own process: its CPU patches stay there)."""
    from harness.tiny import cpu_env

    shape = f"--untied --iteration 10 --hidden 32 --heads 2 --layers 1 --vocab-size {SIZES['tiny'].vocab}"
    argv = [sys.executable, "-m", "harness.megatron_run", str(out), *shape.split(), "--tokenizer", str(tok)]
    done = subprocess.run(argv, env=cpu_env(out.parent / "hf_home"), capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"megatron-core could not save the seed run:\n{done.stderr[-3000:]}")
    return out


def _bridge_run(lm_run: Path, out: Path) -> Path:
    """A copy of the Megatron-LM run as Megatron-Bridge leaves it: ``common.pt`` without args, the model
    and tokenizer settings in ``run_config.yaml``, and its train state beside the iteration and the tracker."""
    import torch

    from harness.megatron_run import as_bridge_run

    run = Path(shutil.copytree(lm_run, out))
    args = torch.load(next(run.glob("iter_*/common.pt")), weights_only=False)["args"]
    model = {
        "num_layers": args.num_layers,
        "hidden_size": args.hidden_size,
        "vocab_size": SIZES["tiny"].vocab,
        "should_pad_vocab": True,
        "make_vocab_size_divisible_by": args.make_vocab_size_divisible_by,
        "tensor_model_parallel_size": 1,
        "pipeline_model_parallel_size": 1,
        "share_embeddings_and_output_weights": False,
    }
    tokenizer = {"tokenizer_type": "GPT2BPETokenizer", "vocab_file": args.vocab_file, "merge_file": args.merge_file}
    return as_bridge_run(run, model, tokenizer, train_state={"step": 10, "consumed_train_samples": 640})


def _parse_common(data: bytes) -> dict[str, Any]:
    """A run's ``common.pt`` as the run reader parses it."""
    from nemo_vocab_ext.formats.megatron_run import _parse_common as parse

    common = parse(data)
    if common is None:
        raise ValueError("common.pt holds no dict")
    return common


# --------------------------------------------------------------------------- values worth trying

INTS = [0, 1, -1, 2, 7, 63, 64, 255, 256, 511, 512, 513, 65535, 2**31 - 1, 2**31, -(2**31), 2**32, 2**53]
INTS += [2**63 - 1, 2**63, -(2**63), 2**64, 10**30]
STRINGS = ["", "0", "1", "99", "data/0", "cpu", "meta", "\x00", "a" * 300, "../secret.txt", "../../secret.txt"]
STRINGS += ["/etc/hostname", "__0_0.distcp", "../__0_0.distcp", "model_weights/__0_0.distcp", "nemo:../secret.txt"]
STRINGS += ["model.embedding.word_embeddings.weight", "model.output_layer.weight", "state_dict", "storage", "zarr"]
STRINGS += ["torch_dist", "model.safetensors", "model-00001-of-00003.safetensors", "model-00009-of-00009.safetensors"]
STRINGS += ["config.json", "sub/model.safetensors", "model.embed_tokens.weight", "lm_head.weight", "LlamaForCausalLM"]
VALUES: list[Any] = [None, True, False, 1.5, math.nan, math.inf, [], [1, 2], {}, {"a": 1}, [[1]], *INTS, *STRINGS]
VALUES += ["F32", "BF16", "I64", "F8_E4M3", "C64", "BOOL", [0, 0], [-1, 1], [1, 0], [0, 10**12], [2**64, 2**64 + 4]]
GLOBALS = [
    ("builtins", "eval"),
    ("os", "system"),
    ("posix", "system"),
    ("subprocess", "Popen"),
    ("builtins", "getattr"),
    ("builtins", "object"),
    ("builtins", "set"),
    ("__builtin__", "set"),
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch", "FloatStorage"),
    ("torch", "BFloat16Storage"),
    ("torch", "LongStorage"),
    ("torch", "BoolStorage"),
    ("torch", "UntypedStorage"),
    ("torch", "ComplexFloatStorage"),
    ("torch", "QInt8Storage"),
    ("torch", "bfloat16"),
    ("torch", "float8_e4m3fn"),
    ("torch", "strided"),
    ("torch", "sparse_coo"),
    ("torch", "Size"),
    ("torch.nn.parameter", "Parameter"),
    ("omegaconf.dictconfig", "DictConfig"),
    ("omegaconf.listconfig", "ListConfig"),
    ("omegaconf.nodes", "AnyNode"),
    ("omegaconf.base", "ContainerMetadata"),
    ("typing", "Any"),
    ("pathlib", "PosixPath"),
    *(
        ("torch.distributed.checkpoint.metadata", n)
        for n in ("Metadata", "TensorStorageMetadata", "ChunkStorageMetadata", "BytesStorageMetadata", "MetadataIndex")
    ),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.planner", "WriteItemType"),
]
CONFIG_KEYS = [
    "make_vocab_size_divisible_by",
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "override_vocab_size",
    "share_embeddings_and_output_weights",
    "hidden_size",
    "num_layers",
    "mcore_gpt",
    "precision",
    "tokenizer",
    "tokenizer.vocab_file",
    "tokenizer.merge_file",
    "tokenizer.library",
    "tokenizer.type",
    "tokenizer.model",
]
# config.json of a Hugging Face folder, and Megatron-Bridge's run_config.yaml.
HF_CONFIG_KEYS = ["vocab_size", "tie_word_embeddings", "architectures", "hidden_size", "torch_dtype", "model_type"]
HF_CONFIG_KEYS += ["num_hidden_layers", "pad_token_id", "eos_token_id", "auto_map"]
RUN_CONFIG_KEYS = [f"model.{k}" for k in CONFIG_KEYS[:6]]
RUN_CONFIG_KEYS += ["model.vocab_size", "model.should_pad_vocab", "model", "tokenizer", "tokenizer.tokenizer_type"]
RUN_CONFIG_KEYS += ["tokenizer.tokenizer_model", "tokenizer.vocab_file", "tokenizer.merge_file"]
# Megatron-LM's args in common.pt (``args.<name>``) and common.pt's own keys.
ARGS_KEYS = ["padded_vocab_size", "vocab_size", "make_vocab_size_divisible_by", "tensor_model_parallel_size"]
ARGS_KEYS += ["pipeline_model_parallel_size", "untie_embeddings_and_output_weights", "tokenizer_type"]
ARGS_KEYS += ["tokenizer_model", "vocab_file", "merge_file", "hidden_size", "num_layers", "iteration"]
COMMON_KEYS = ["args", "iteration", "checkpoint_version", "optimizer", "model"]
TRACKER_TEXTS = ["10", "release", "0", "9", "11", "-10", "+10", "10.0", " 10\n", "1e1", "0x0a", "", "\x00"]
TRACKER_TEXTS += [
    "0000010",
    "iter_0000010",
    "../10",
    "9" * 30,
    "1" * 5000,
    "\u0661\u0660",
    "\u00b9\u2070",
    "\uff11\uff10",
]
_BOMB = "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True))
YAML_TEXTS = [
    "make_vocab_size_divisible_by: &x [*x]\n",
    "tokenizer: &t {library: *t}\n",
    "a: &a [x, x, x, x, x, x, x, x, x]\n" + _BOMB + "make_vocab_size_divisible_by: *i\n",
    "a: &a [x, x, x, x, x, x, x, x, x]\n" + _BOMB + "tokenizer: {vocab_file: *i}\n",
    "make_vocab_size_divisible_by: !!python/object/apply:os.system ['true']\n",
    "tensor_model_parallel_size: " + "[" * 3000 + "]" * 3000 + "\n",
    "tokenizer: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n",
    "make_vocab_size_divisible_by: 0x80\ntensor_model_parallel_size: 1_0\n",
    "make_vocab_size_divisible_by: 1e400\noverride_vocab_size: .nan\n",
    "tokenizer: {1: 2, null: 3, [a]: 4}\n",
    "? [a, b]\n: 1\n",
    "<<: *undefined\n",
    "base: &base {make_vocab_size_divisible_by: 0}\n<<: *base\n",
    "--- !!binary AAAA\n",
    "- 1\n- 2\n",
]
MEMBER_NAMES = ["../evil", "/tmp/evil_abs", "a/../../evil", "./model_config.yaml", "model_weights/__9_9.distcp"]
MEMBER_NAMES += [
    "x" * 300,
    "model_weights",
    "c:evil",
    "model_weights/.metadata/x",
    "0123456789abcdef0123456789abcdef_v",
    "release",
    "iter_0000011",
    "iter_0000010/__9_9.distcp",
    "iter_0000010/mp_rank_00",
    "iter_0000010/tokenizer/tokenizer.model",
    "model-00009-of-00009.safetensors",
    "pytorch_model.bin",
]
LINK_TARGETS = ["SECRET", "/etc/hostname", "model_config.yaml", "."]  # SECRET: a file beside the input
NEW_KINDS = ["file", "symlink", "hardlink", "dir", "fifo", "empty"]

# -------------------------------------------------------------------------------------- mutations


@dataclass(frozen=True)
class Mutation:
    """``kind`` with ``args`` applied to ``member`` (an index into the seed's members, taken modulo their
    count; None: the packed container, or the member list itself for the ``tree_*`` kinds)."""

    kind: str
    member: int | None
    args: tuple[Any, ...]

    def __str__(self) -> str:
        where = "container" if self.member is None else f"member#{self.member}"
        return f"{self.kind}@{where}{self.args!r}"


def _raw_truncate(data: bytes, pos: int) -> bytes:
    return data[: pos % (len(data) + 1)]


def _raw_flip(data: bytes, pos: int, bit: int) -> bytes:
    if not data:
        return data
    out = bytearray(data)
    out[pos % len(out)] ^= 1 << bit
    return bytes(out)


def _raw_insert(data: bytes, pos: int, blob: bytes) -> bytes:
    pos %= len(data) + 1
    return data[:pos] + blob + data[pos:]


def _raw_delete(data: bytes, pos: int, n: int) -> bytes:
    pos %= len(data) + 1
    return data[:pos] + data[pos + n :]


def _raw_overwrite(data: bytes, pos: int, blob: bytes) -> bytes:
    pos %= len(data) + 1
    return data[:pos] + blob + data[pos + len(blob) :]


# Pickles: edited op by op, where pickletools finds them (in a torch.save zip, in its data.pkl).


def _pickle_ops(data: bytes) -> list[tuple[str, Any, int, int]]:
    """(op name, argument, start, end) of every op."""
    ops = list(pickletools.genops(data))
    starts = [pos or 0 for _, _, pos in ops]  # positions are known when reading bytes
    return [(op.name, arg, a, b) for (op, arg, _), a, b in zip(ops, starts, [*starts[1:], len(data)], strict=True)]


def _int_op(v: int) -> bytes:
    if 0 <= v < 256:
        return b"K" + bytes([v])
    if 0 <= v < 65536:
        return b"M" + v.to_bytes(2, "little")
    if -(2**31) <= v < 2**31:
        return b"J" + v.to_bytes(4, "little", signed=True)
    raw = pickle.encode_long(v)
    return b"\x8a" + bytes([len(raw)]) + raw


def _str_op(s: str) -> bytes:
    b = s.encode("utf-8", "surrogatepass")
    return b"X" + len(b).to_bytes(4, "little") + b


INT_OPS = {"BININT", "BININT1", "BININT2", "LONG1", "LONG4", "INT", "LONG"}
STR_OPS = {"BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING"}
GET_OPS = {"BINGET", "LONG_BINGET", "GET"}
PUSH_OPS = INT_OPS | STR_OPS | {"NONE", "NEWTRUE", "NEWFALSE", "EMPTY_DICT", "EMPTY_LIST", "EMPTY_TUPLE", "BINFLOAT"}
BUILD_PAYLOADS = [b"}b", b"Nb", b")b", b"(N}tb", b"}X\x05\x00\x00\x00shapeK\x01sb", b"]b", b"K\x01b"]


def _pickle_edit(data: bytes, which: set[str] | None, index: int, make: Callable[[str, Any, bytes], bytes]) -> bytes:
    """Replace the ``index``-th op (modulo) among those named ``which`` (all if None) with ``make(name, arg, op)``."""
    try:
        ops = [o for o in _pickle_ops(data) if which is None or o[0] in which]
    except Exception:  # already garbled by an earlier mutation: leave it
        return data
    if not ops:
        return data
    name, arg, start, end = ops[index % len(ops)]
    return data[:start] + make(name, arg, data[start:end]) + data[end:]


def _pickle_int(data: bytes, index: int, value: int) -> bytes:
    return _pickle_edit(data, INT_OPS, index, lambda *_: _int_op(value))


def _pickle_str(data: bytes, index: int, value: str) -> bytes:
    return _pickle_edit(data, STR_OPS, index, lambda *_: _str_op(value))


def _pickle_global(data: bytes, index: int, choice: int) -> bytes:
    """Another name for a GLOBAL: one of the same pickle's (a swap) or one of :data:`GLOBALS`."""
    try:
        own = [tuple(arg.split(" ", 1)) for name, arg, _, _ in _pickle_ops(data) if name == "GLOBAL"]
    except Exception:
        return data
    names = own + GLOBALS
    module, name = names[choice % len(names)]
    return _pickle_edit(data, {"GLOBAL"}, index, lambda *_: f"c{module}\n{name}\n".encode())


def _pickle_get(data: bytes, index: int, memo: int) -> bytes:
    return _pickle_edit(data, GET_OPS, index, lambda *_: b"j" + (memo % 2**32).to_bytes(4, "little"))


def _pickle_drop(data: bytes, index: int) -> bytes:
    return _pickle_edit(data, None, index, lambda *_: b"")


def _pickle_dup(data: bytes, index: int) -> bytes:
    return _pickle_edit(data, None, index, lambda _n, _a, op: op + op)


def _pickle_build(data: bytes, index: int, payload: int) -> bytes:
    """A BUILD (``__setstate__`` or ``__dict__`` update) on what an op left on the stack."""
    blob = BUILD_PAYLOADS[payload % len(BUILD_PAYLOADS)]
    return _pickle_edit(
        data, {"REDUCE", "GLOBAL", "NEWOBJ", "BUILD", "EMPTY_DICT"}, index, lambda _n, _a, op: op + blob
    )


def _pickle_nest(data: bytes, index: int, depth: int, kind: int) -> bytes:
    """Wrap a pushed value in ``depth`` lists, tuples or dicts."""
    open_, close = [(b"(", b"l"), (b"(", b"t"), (b"}(X\x01\x00\x00\x00k", b"u")][kind % 3]
    return _pickle_edit(data, PUSH_OPS, index, lambda _n, _a, op: open_ * depth + op + close * depth)


PICKLE_EDITS: dict[str, Callable[..., bytes]] = {
    "pickle_int": _pickle_int,
    "pickle_str": _pickle_str,
    "pickle_global": _pickle_global,
    "pickle_get": _pickle_get,
    "pickle_drop": _pickle_drop,
    "pickle_dup": _pickle_dup,
    "pickle_build": _pickle_build,
    "pickle_nest": _pickle_nest,
}


def _is_zip(data: bytes) -> bool:
    return data[:4] == b"PK\x03\x04"


def _in_torch_zip(data: bytes, edit: Callable[[bytes], bytes]) -> bytes:
    """Apply ``edit`` to a torch.save zip's data.pkl, records rewritten uncompressed as torch writes them."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            records = [(i.filename, z.read(i)) for i in z.infolist()]
    except Exception:
        return data
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for name, blob in records:
            z.writestr(name, edit(blob) if name.endswith("/data.pkl") else blob)
    return out.getvalue()


def _apply_pickle(data: bytes, kind: str, *args: Any) -> bytes:
    edit = lambda pkl: PICKLE_EDITS[kind](pkl, *args)  # noqa: E731
    return _in_torch_zip(data, edit) if _is_zip(data) else edit(data)


# JSON-like trees (safetensors headers, the index, metadata.json, configs): one value set, deleted or added.


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def _edit_tree(obj: Any, path: tuple[Any, ...], action: str, value: Any) -> Any:
    """``obj`` with the value at ``path`` replaced (``set``), removed (``delete``) or given a sibling key (``add``)."""
    if not path:
        return value if action == "set" else obj
    parent = obj
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if action == "set":
        parent[last] = value
    elif action == "delete":
        del parent[last]
    elif isinstance(parent, dict):
        parent[f"extra_{len(parent)}"] = value
    else:
        parent.append(value)
    return obj


def _json_edit(obj: Any, index: int, action: str, value: Any) -> Any:
    paths = list(_paths(obj))
    return _edit_tree(obj, paths[index % len(paths)], action, value)


def _config_edit(config: Any, key: int, action: str, value: Any, keys: list[str] = CONFIG_KEYS) -> Any:
    """A named config key (``tokenizer.vocab_file``) set to ``value`` or deleted; a missing parent is made."""
    if not isinstance(config, dict):
        return config
    *parents, last = keys[key % len(keys)].split(".")
    node = config
    for p in parents:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    if action == "delete":
        node.pop(last, None)
    else:
        node[last] = value
    return config


def _safetensors_split(data: bytes) -> tuple[Any, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _safetensors_join(header: Any, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def _json_member(data: bytes, edit: Callable[[Any], Any]) -> bytes:
    """``edit`` applied to a JSON file, or to a safetensors file's header."""
    try:
        if data[:1] in (b"{", b"["):
            return json.dumps(edit(json.loads(data))).encode()
        header, body = _safetensors_split(data)
    except Exception:
        return data
    return _safetensors_join(edit(header), body)


def _json_value(data: bytes, index: int, action: str, value: Any) -> bytes:
    return _json_member(data, lambda obj: _json_edit(obj, index, action, value))


def _metadata_config(data: bytes, key: int, action: str, value: Any) -> bytes:
    """A config key edited in a safetensors header's (or the index's) NeMo config."""

    def edit(obj: Any) -> Any:
        meta = obj.get("__metadata__") or obj.get("metadata") if isinstance(obj, dict) else None
        if isinstance(meta, dict) and isinstance(meta.get("nemo_vocab_ext.config"), str):
            config = _config_edit(json.loads(meta["nemo_vocab_ext.config"]), key, action, value)
            meta["nemo_vocab_ext.config"] = json.dumps(config)
        return obj

    return _json_member(data, edit)


def _yaml_config(data: bytes, key: int, action: str, value: Any) -> bytes:
    try:
        config = yaml.safe_load(data)
        return yaml.safe_dump(_config_edit(config, key, action, value)).encode()
    except Exception:
        return data


def _hf_config(data: bytes, key: int, action: str, value: Any) -> bytes:
    """A key of a Hugging Face ``config.json`` set or deleted."""
    return _json_member(data, lambda obj: _config_edit(obj, key, action, value, HF_CONFIG_KEYS))


def _run_config(data: bytes, key: int, action: str, value: Any) -> bytes:
    """A key of Megatron-Bridge's ``run_config.yaml`` set or deleted."""
    try:
        config = yaml.safe_load(data)
        return yaml.safe_dump(_config_edit(config, key, action, value, RUN_CONFIG_KEYS)).encode()
    except Exception:
        return data


def _weight_map(data: bytes, entry: int, choice: int) -> bytes:
    """An index entry pointing at another shard of the folder, at a file that is not a shard, or at none."""

    def edit(index: Any) -> Any:
        weight_map = index["weight_map"]
        keys = sorted(weight_map)
        names = sorted(set(weight_map.values())) + STRINGS
        key = keys[entry % len(keys)]
        if choice % 5 == 0:
            del weight_map[key]
        elif choice % 5 == 1:  # a tensor no shard holds
            weight_map[f"{key}.extra"] = weight_map[key]
        else:
            weight_map[key] = names[choice % len(names)]
        return index

    return _json_member(data, edit)


def _tracker(data: bytes, text: int) -> bytes:
    return TRACKER_TEXTS[text % len(TRACKER_TEXTS)].encode("utf-8", "surrogatepass")


def _common_value(data: bytes, key: int, action: str, value: Any) -> bytes:
    """One of Megatron-LM's args (or one of common.pt's own keys) set, deleted or given a sibling, the
    file saved again as torch saves it."""
    from nemo_vocab_ext.formats.torch_zip import torch_file_bytes

    common = _parse_common(data)
    names = [f"args.{k}" for k in ARGS_KEYS] + COMMON_KEYS
    name = names[key % len(names)]
    if name.startswith("args."):
        args = common.get("args")
        if args is None:
            return data
        attr = name.split(".", 1)[1] if action != "add" else "extra"
        if action == "delete":
            vars(args).pop(attr, None)
        else:
            setattr(args, attr, value)
    elif action == "delete":
        common.pop(name, None)
    else:
        common[name if action == "set" else "extra"] = value
    return torch_file_bytes(common)


def _yaml_text(data: bytes, text: int) -> bytes:
    """Lines appended to the YAML (a later key wins), or a whole document of their own."""
    snippet = YAML_TEXTS[text % len(YAML_TEXTS)].encode()
    return snippet if snippet.startswith((b"---", b"- ", b"?")) else data + b"\n" + snippet


# torch_dist .metadata: the records as the project's restricted unpickler reads them, edited, re-pickled.


def _dcp_slots(md: Any) -> list[tuple[Any, str]]:
    """(record, attribute) of every value a reader trusts: shapes, chunks, dtypes, file names, offsets."""
    slots: list[tuple[Any, str]] = [(md, "state_dict_metadata"), (md, "storage_data")]
    for entry in md.state_dict_metadata.values():
        if hasattr(entry, "chunks"):
            slots += [(entry, "size"), (entry, "chunks"), (entry.properties, "dtype")]
            slots += [(c, a) for c in entry.chunks for a in ("offsets", "sizes")]
    for info in md.storage_data.values() if isinstance(md.storage_data, dict) else []:
        slots += [(info, a) for a in ("relative_path", "offset", "length", "transform_descriptors")]
    return slots


def _dcp_record(data: bytes, slot: int, pick: int, value: Any) -> bytes:
    """One trusted value replaced: a tuple's element set to ``value``, a list or dict's item dropped or
    duplicated (``pick``), a dtype swapped, or the value replaced whole."""
    from nemo_vocab_ext.core.dtypes import DTYPES
    from nemo_vocab_ext.formats.dcp_records import dumps
    from nemo_vocab_ext.formats.safe_pickle import restricted_unpickle

    try:
        md = restricted_unpickle(data, what="seed")
        record, attr = _dcp_slots(md)[slot % len(_dcp_slots(md))]
        old = getattr(record, attr)
        if isinstance(old, tuple) and old and pick % 2:
            new: Any = (*old[: pick % len(old)], value, *old[pick % len(old) + 1 :])
        elif isinstance(old, list) and old:
            new = old[:-1] if pick % 2 else [*old, old[pick % len(old)]]
        elif isinstance(old, dict) and old:
            keys = list(old)
            new = {k: v for k, v in old.items() if k != keys[pick % len(keys)]}
            if pick % 3 == 0:  # not dropped: one key's record under another key
                new = dict(old, **{keys[pick % len(keys)]: old[keys[(pick + 1) % len(keys)]]})
        elif attr == "dtype":
            new = DTYPES[pick % len(DTYPES)] if pick % 4 else value
        else:
            new = value
        object.__setattr__(record, attr, new)  # frozen records too
        return dumps(md)
    except Exception:
        return data


# Archives and folders: members added, linked, dropped, renamed, duplicated.


@dataclass(frozen=True)
class Link:
    target: str
    hard: bool = False


@dataclass(frozen=True)
class Special:
    kind: str  # "dir" or "fifo"


Member = bytes | Link | Special


def _tree_add(members: list[tuple[str, Member]], name: int, kind: int) -> list[tuple[str, Member]]:
    new_name = MEMBER_NAMES[name % len(MEMBER_NAMES)]
    values: dict[str, Member] = {
        "file": b"x",
        "empty": b"",
        "symlink": Link("SECRET"),
        "hardlink": Link("model_config.yaml", hard=True),
        "dir": Special("dir"),
        "fifo": Special("fifo"),
    }
    return [*members, (new_name, values[NEW_KINDS[kind % len(NEW_KINDS)]])]


def _tree_link(members: list[tuple[str, Member]], index: int, target: int) -> list[tuple[str, Member]]:
    i = index % len(members)
    link = Link(LINK_TARGETS[target % len(LINK_TARGETS)])
    return [*members[:i], (members[i][0], link), *members[i + 1 :]]


def _tree_special(members: list[tuple[str, Member]], index: int, kind: int) -> list[tuple[str, Member]]:
    i = index % len(members)
    return [*members[:i], (members[i][0], Special(["fifo", "dir"][kind % 2])), *members[i + 1 :]]


def _tree_drop(members: list[tuple[str, Member]], index: int) -> list[tuple[str, Member]]:
    i = index % len(members)
    return members[:i] + members[i + 1 :]


def _tree_rename(members: list[tuple[str, Member]], index: int, name: int) -> list[tuple[str, Member]]:
    i = index % len(members)
    return [*members[:i], (MEMBER_NAMES[name % len(MEMBER_NAMES)], members[i][1]), *members[i + 1 :]]


def _tree_swap(members: list[tuple[str, Member]], index: int, other: int) -> list[tuple[str, Member]]:
    """One member's content under another's name: a shard for another, common.pt for .metadata..."""
    i, j = index % len(members), other % len(members)
    return [*members[:i], (members[i][0], members[j][1]), *members[i + 1 :]]


def _tree_dup(members: list[tuple[str, Member]], index: int, blob: bytes) -> list[tuple[str, Member]]:
    return [*members, (members[index % len(members)][0], blob)]


TREE_EDITS: dict[str, Callable[..., list[tuple[str, Member]]]] = {
    "tree_add": _tree_add,
    "tree_link": _tree_link,
    "tree_special": _tree_special,
    "tree_drop": _tree_drop,
    "tree_rename": _tree_rename,
    "tree_dup": _tree_dup,
    "tree_swap": _tree_swap,
}
BYTE_EDITS: dict[str, Callable[..., bytes]] = {
    "truncate": _raw_truncate,
    "flip": _raw_flip,
    "insert": _raw_insert,
    "delete": _raw_delete,
    "overwrite": _raw_overwrite,
    **{k: (lambda data, *a, _k=k: _apply_pickle(data, _k, *a)) for k in PICKLE_EDITS},
    "json_value": _json_value,
    "metadata_config": _metadata_config,
    "yaml_config": _yaml_config,
    "yaml_text": _yaml_text,
    "dcp_record": _dcp_record,
    "hf_config": _hf_config,
    "run_config": _run_config,
    "weight_map": _weight_map,
    "tracker": _tracker,
    "common_value": _common_value,
}

# ---------------------------------------------------------------------------------------- strategies

positions = st.one_of(st.integers(0, 64), st.integers(0, 2**20), st.integers(0, 2**31))
ints = st.one_of(st.sampled_from(INTS), st.integers(-(2**70), 2**70))
texts = st.one_of(st.sampled_from(STRINGS), st.text(max_size=20))
values = st.one_of(st.sampled_from(VALUES), ints, texts)
blobs = st.one_of(st.binary(min_size=1, max_size=16), st.sampled_from([b"\xff" * 8, b"\x00" * 8, b"PK\x03\x04"]))
small = st.integers(0, 1000)
actions = st.sampled_from(["set", "set", "delete", "add"])

ARGS: dict[str, st.SearchStrategy[tuple[Any, ...]]] = {
    "truncate": st.tuples(positions),
    "flip": st.tuples(positions, st.integers(0, 7)),
    "insert": st.tuples(positions, blobs),
    "delete": st.tuples(positions, st.integers(1, 4096)),
    "overwrite": st.tuples(positions, blobs),
    "pickle_int": st.tuples(small, ints),
    "pickle_str": st.tuples(small, texts),
    "pickle_global": st.tuples(small, small),
    "pickle_get": st.tuples(small, st.integers(0, 2**32)),
    "pickle_drop": st.tuples(small),
    "pickle_dup": st.tuples(small),
    "pickle_build": st.tuples(small, small),
    "pickle_nest": st.tuples(small, st.sampled_from([2, 100, 1000, 100_000]), small),
    "json_value": st.tuples(small, actions, values),
    "metadata_config": st.tuples(small, actions, values),
    "yaml_config": st.tuples(small, actions, values),
    "yaml_text": st.tuples(small),
    "dcp_record": st.tuples(small, small, values),
    "tree_add": st.tuples(small, small),
    "tree_link": st.tuples(small, small),
    "tree_special": st.tuples(small, small),
    "tree_drop": st.tuples(small),
    "tree_rename": st.tuples(small, small),
    "tree_dup": st.tuples(small, blobs),
    "tree_swap": st.tuples(small, small),
    "hf_config": st.tuples(small, actions, values),
    "run_config": st.tuples(small, actions, values),
    "weight_map": st.tuples(small, small),
    "tracker": st.tuples(small),
    "common_value": st.tuples(small, actions, values),
}


def _member_kinds(name: str, data: bytes) -> list[str]:
    """The structure-aware edits that fit a member, beside the raw ones every member takes."""
    base = name.rsplit("/", 1)[-1]
    if base == "run_config.yaml":
        return ["run_config", "yaml_text"]
    if name.endswith(".yaml"):
        return ["yaml_config", "yaml_text"]
    if base == "latest_checkpointed_iteration.txt":
        return ["tracker"]
    if base == "common.pt":  # the args' values as often as the pickle's opcodes
        return [*["common_value"] * len(PICKLE_EDITS), *PICKLE_EDITS]
    if base == "config.json":
        return ["hf_config", "json_value"]
    if base == "model.safetensors.index.json":
        return ["weight_map", "json_value"]
    if name.endswith(".metadata"):
        return ["dcp_record", *PICKLE_EDITS]
    if _is_zip(data):
        return list(PICKLE_EDITS)
    if name.endswith(".json") or name.endswith(".safetensors") or (not name and data[8:9] == b"{"):
        return ["json_value", "metadata_config"]
    return []


RAW = ["truncate", "flip", "insert", "delete", "overwrite"]


@st.composite
def mutations(draw: st.DrawFn, seed: Seed) -> Mutation:
    """One mutation of ``seed``: of the packed container, of one member's bytes, or of the member list."""
    where = ["member", "member", "member"]
    if seed.container in ("tar", "tgz", "file"):
        where.append("container")
    if seed.container != "file":
        where.append("tree")
    place = draw(st.sampled_from(where))
    if place == "tree":
        kind = draw(st.sampled_from(list(TREE_EDITS)))
        return Mutation(kind, None, draw(ARGS[kind]))
    if place == "container":
        kind = draw(st.sampled_from(RAW))
        return Mutation(kind, None, draw(ARGS[kind]))
    index = draw(st.integers(0, len(seed.members) - 1))
    name, data = seed.members[index]
    structured = _member_kinds(name, data)
    use_structure = bool(structured) and draw(st.booleans())
    kind = draw(st.sampled_from(structured if use_structure else RAW))
    return Mutation(kind, index, draw(ARGS[kind]))


# Where convert and resize write, by format: a run folder and a Hugging Face folder have no suffix.
DESTINATIONS = {"nemo": "out.nemo", "ckpt": "out.ckpt", "safetensors": "out.safetensors", "hf": "out_hf"}
DESTINATIONS["megatron"] = "out_run"
# The formats each reader's checkpoints convert to: a Hugging Face folder only to another one.
FORMATS = ["nemo", "ckpt", "safetensors"]
# Megatron-LM's: the .ckpt reader refuses the args Namespace its common.pt would carry, so no .ckpt.
CONVERTS = {"hf_sharded": ["hf"], "megatron_lm": ["nemo", "safetensors", "megatron"]}
CONVERTS["megatron_bridge"] = [*FORMATS, "megatron"]


def reader_format(reader: str) -> str:
    return {"st": "safetensors"}.get(reader.split("_")[0], reader.split("_")[0])


def seed_ops(reader: str) -> list[str]:
    """Every command a reader's seed, unmutated, passes."""
    return ["read", "resize", *(f"convert:{f}" for f in CONVERTS.get(reader, FORMATS))]


@dataclass(frozen=True)
class Case:
    reader: str
    op: str  # read, convert:<format>, resize
    mutations: tuple[Mutation, ...]

    def to_json(self) -> str:
        muts = [[m.kind, m.member, list(m.args)] for m in self.mutations]
        return json.dumps([self.reader, self.op, muts], default=lambda b: {"bytes": b.hex()})

    @staticmethod
    def from_json(text: str) -> Case:
        reader, op, muts = json.loads(text)
        decode = lambda a: bytes.fromhex(a["bytes"]) if isinstance(a, dict) and "bytes" in a else a  # noqa: E731
        return Case(reader, op, tuple(Mutation(k, m, tuple(decode(a) for a in args)) for k, m, args in muts))


def cases(seed: Seed) -> st.SearchStrategy[Case]:
    own = reader_format(seed.name)
    converts = [op for op in seed_ops(seed.name)[2:] if op != f"convert:{own}" or own == "hf"]
    ops = st.sampled_from(["read", "read", "resize", *converts])
    return st.builds(Case, st.just(seed.name), ops, st.lists(mutations(seed), min_size=1, max_size=3).map(tuple))


# ------------------------------------------------------------------------------------- the input


def _edit_bytes(m: Mutation, data: bytes) -> bytes:
    """``data`` mutated; unchanged where the mutation does not fit (JSON edits of what is no longer JSON)."""
    try:
        return BYTE_EDITS[m.kind](data, *m.args)
    except Exception:
        return data


def _members_after(seed: Seed, case: Case) -> tuple[list[tuple[str, Member]], list[Mutation]]:
    members: list[tuple[str, Member]] = list(seed.members)
    container_edits = []
    for m in case.mutations:
        if m.kind in TREE_EDITS:
            members = TREE_EDITS[m.kind](members, *m.args) if members else members
        elif m.member is None:
            container_edits.append(m)
        elif members:
            i = m.member % len(members)
            name, data = members[i]
            if isinstance(data, bytes):
                members[i] = (name, _edit_bytes(m, data))
    return members, container_edits


def _tar_bytes(members: list[tuple[str, Member]], gz: bool) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, value in members:
            info = tarfile.TarInfo(name)
            info.mode = 0o644
            if isinstance(value, bytes):
                info.size = len(value)
                tar.addfile(info, io.BytesIO(value))
                continue
            if isinstance(value, Link):
                info.type = tarfile.LNKTYPE if value.hard else tarfile.SYMTYPE
                info.linkname = "../secret.txt" if value.target == "SECRET" else value.target
            else:
                info.type = tarfile.DIRTYPE if value.kind == "dir" else tarfile.FIFOTYPE
            tar.addfile(info)
    data = out.getvalue()
    return gzip.compress(data, compresslevel=1, mtime=0) if gz else data


def _write_folder(root: Path, members: list[tuple[str, Member]], secret: Path) -> None:
    root.mkdir()
    for name, value in members:
        rel = os.path.normpath(name)
        if not name or os.path.isabs(name) or rel.startswith(".."):
            continue  # a folder cannot hold such names; only archives can
        path = root / rel
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif os.path.lexists(path):  # a file, a link or a fifo (writing into a fifo would block)
                path.unlink()
            if isinstance(value, bytes):
                path.write_bytes(value)
            elif isinstance(value, Link) and not value.hard:
                target = os.path.relpath(secret, path.parent) if value.target == "SECRET" else value.target
                path.symlink_to(target)
            elif isinstance(value, Special):
                path.mkdir() if value.kind == "dir" else os.mkfifo(path)


def materialize(seed: Seed, case: Case, work: Path) -> Path:
    """Write the case's input under ``work/in``; returns its path."""
    members, container_edits = _members_after(seed, case)
    src = work / "in" / seed.filename
    src.parent.mkdir()
    if seed.container == "dir":
        _write_folder(src, members, work / "secret.txt")
        return src
    if seed.container == "file":
        data = next((v for _, v in members if isinstance(v, bytes)), b"")
    else:
        data = _tar_bytes(members, gz=seed.container == "tgz")
    for m in container_edits:
        data = _edit_bytes(m, data)
    src.write_bytes(data)
    return src


# -------------------------------------------------------------------------------- the property


class Hang(BaseException):
    """The per-case deadline passed (a BaseException: no ``except Exception`` in the reader swallows it)."""


class Violation(Exception):
    """The property failed without an exception of the reader's own: an access outside, a broken output."""


_watch: dict[str, Any] | None = None  # set while a case runs: where it may touch and what it touched
_WRITE_EVENTS = {"os.rename", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.symlink", "os.link"}
_WRITE_EVENTS |= {"os.truncate", "os.chmod", "os.chown", "os.utime", "shutil.copyfile", "shutil.move"}


def _reader_frame() -> str:
    """The innermost frame of the package on the stack: where a reader made the call."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.startswith(PACKAGE_DIR):
            return f"{os.path.relpath(frame.f_code.co_filename, PACKAGE_DIR)}:{frame.f_lineno} {frame.f_code.co_name}"
        frame = frame.f_back  # type: ignore[assignment]
    return "?"


def _audit(event: str, args: tuple[Any, ...]) -> None:
    watch = _watch
    if watch is None or (event != "open" and event not in _WRITE_EVENTS):
        return
    two = event in ("os.rename", "os.symlink", "os.link", "shutil.copyfile", "shutil.move")
    for i, arg in enumerate(args[: 2 if two else 1]):
        # A hard link's or a copy's source is only read (a run folder's output links the input's data files).
        writes = (event != "open" or _open_writes(args)) and not (i == 0 and event in ("os.link", "shutil.copyfile"))
        # Relative names are those shutil.rmtree opens beside a folder's descriptor; a reader's own
        # relative names land in the empty working folder, checked afterwards.
        if not isinstance(arg, str | bytes | os.PathLike) or not os.path.isabs(os.fsdecode(arg)):
            continue
        path = os.path.realpath(os.fsdecode(arg))
        ok = any(path == r or path.startswith(r + os.sep) for r in watch["write" if writes else "read"])
        if not ok:
            watch["outside"].append(f"{'write' if writes else 'read'} {path} ({event}) at {_reader_frame()}")


def _open_writes(args: tuple[Any, ...]) -> bool:
    mode, flags = (args + (None, None))[1:3]
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return isinstance(flags, int) and bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC))


_audit_installed = False


@contextlib.contextmanager
def watching(work: Path) -> Iterator[list[str]]:
    """Within the block, in the sandbox ``work``: the current folder is ``work/cwd``, temporary files go
    to ``work/tmp``, and every open or file-system change outside ``work/in`` (read only), ``work/out``,
    ``work/tmp`` and Python's own folders is listed in the yielded list."""
    global _watch, _audit_installed
    if not _audit_installed:
        sys.addaudithook(_audit)
        _audit_installed = True
    inp, out, scratch = (str(work / d) for d in ("in", "out", "tmp"))
    watch: dict[str, Any] = {"read": [inp, out, scratch, *_library_roots(work)], "write": [out, scratch], "outside": []}
    old_cwd, old_tempdir = os.getcwd(), tempfile.tempdir
    os.chdir(work / "cwd")
    tempfile.tempdir = scratch
    try:
        _watch = watch
        yield watch["outside"]
    finally:
        _watch = None
        os.chdir(old_cwd)
        tempfile.tempdir = old_tempdir


def _library_roots(sandbox: Path) -> list[str]:
    """Where imports and torch may read: Python's and the venv's folders (none that holds the sandbox)."""
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, "/proc", "/sys", "/dev/null", "/dev/urandom"}
    roots |= {p for p in sys.path if p and os.path.isdir(p)}
    real = {os.path.realpath(r) for r in roots}
    return [r for r in real if not (str(sandbox) + os.sep).startswith(r + os.sep)]


def _digest(root: Path) -> str:
    """Names, link targets and bytes of everything under ``root`` (fifos by name only)."""
    h = hashlib.sha256()
    paths = [root] if not root.is_dir() or root.is_symlink() else [root, *sorted(root.rglob("*"))]
    for p in paths:
        h.update(str(p.relative_to(root.parent)).encode() + b"\0")
        if p.is_symlink():
            h.update(os.readlink(p).encode())
        elif p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _read_everything(ckpt: Any) -> None:
    states = list(ckpt.rank_tensors.values()) if ckpt.rank_tensors else [ckpt.tensors]
    for state in states:
        for key in state:
            state[key]


def _check_output(dst: Path, fmt: Any, expected: Any | None) -> None:
    """A written output reads back whole, equal to ``expected`` (bitwise) when given, and validates
    (a clean error of the validation is the input's own fault, carried over; anything else fails)."""
    from nemo_vocab_ext.io import load_checkpoint, verify_written
    from nemo_vocab_ext.validate import validate_checkpoint

    try:
        written, _ = load_checkpoint(dst, fmt)
        _read_everything(written)
        if expected is not None:
            verify_written(expected, written, dst, bitwise=True)
    except Exception as e:
        raise Violation(f"the command succeeded but its output does not read back: {type(e).__name__}: {e}") from e
    validate_checkpoint(written)


def run_op(op: str, src: Path, out: Path) -> None:
    """What the CLI's command runs for ``op``, in-process."""
    from nemo_vocab_ext.core.rows import Init
    from nemo_vocab_ext.describe import describe
    from nemo_vocab_ext.formats.detect import detect_format
    from nemo_vocab_ext.io import Format, convert_checkpoint, load_checkpoint
    from nemo_vocab_ext.options import ResizeOptions
    from nemo_vocab_ext.resize_job import run_resize
    from nemo_vocab_ext.validate import validate_checkpoint

    if op == "read":  # inspect, validate, and every entry read
        ckpt, fmt = load_checkpoint(src)
        describe(ckpt, str(fmt))
        validate_checkpoint(ckpt)
        _read_everything(ckpt)
    elif op.startswith("convert:"):  # as the convert command does
        fmt = Format(op.split(":", 1)[1])
        dst = out / DESTINATIONS[fmt.value]
        convert_checkpoint(src, dst, fmt)
        _check_output(dst, fmt, load_checkpoint(src)[0])
    elif op == "resize":  # as the command does: a Hugging Face folder or a run into its own kind, else a .nemo
        fmt = {Format.HF: Format.HF, Format.MEGATRON: Format.MEGATRON}.get(detect_format(src), Format.NEMO)
        dst = out / DESTINATIONS[fmt.value]
        options = ResizeOptions(init=Init.MEAN)
        run_resize(src, dst, fmt=fmt, tokenizer=None, vocab_size=SIZES["tiny"].vocab + 100, options=options)
        _check_output(dst, fmt, None)
    else:
        raise ValueError(op)


@contextlib.contextmanager
def _limits(deadline_s: float, memory_bytes: int) -> Iterator[None]:
    """A deadline (SIGALRM raising :class:`Hang`) and an address-space cap, both lifted afterwards."""

    armed = [True]

    def alarm(*_: Any) -> None:
        if armed[0]:
            raise Hang(f"still running after {deadline_s} s")

    old_handler = signal.signal(signal.SIGALRM, alarm)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    used = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
    cap = used + memory_bytes if hard == resource.RLIM_INFINITY else min(hard, used + memory_bytes)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    signal.setitimer(signal.ITIMER_REAL, deadline_s, 0.5)  # again and again: a callback may swallow one
    try:
        yield
    finally:
        armed[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@dataclass
class Outcome:
    """``ok``, ``clean <Error>``, or a failure: ``FAIL <what> at <where>`` with its details."""

    label: str
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.label.startswith("FAIL")


def _site(exc: BaseException) -> str:
    """Where an exception was raised: its innermost frame in the package, else its innermost frame."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if f.filename.startswith(PACKAGE_DIR)]
    f = (ours or frames)[-1]
    return f"{os.path.relpath(f.filename, PACKAGE_DIR) if ours else f.filename}:{f.lineno} {f.name}"


def run_case(seeds: dict[str, Seed], case: Case, deadline_s: float = 20.0, memory_gb: float = 4.0) -> Outcome:
    """Build the case's input in a fresh sandbox, run it under the deadline, check the property."""
    with tempfile.TemporaryDirectory(prefix="fuzz.") as tmp:
        work = Path(tmp).resolve()
        for d in ("out", "tmp", "cwd"):
            (work / d).mkdir()
        (work / "secret.txt").write_bytes(b"outside the input\n")
        src = materialize(seeds[case.reader], case, work)
        before = _digest(work / "in")
        error: BaseException | None = None
        with watching(work) as accesses:
            try:
                with _limits(deadline_s, int(memory_gb * 2**30)):
                    run_op(case.op, src, work / "out")
            except (Exception, Hang) as e:  # classified below
                error = e
        outside = [p.replace(str(work), "<sandbox>") for p in accesses]
        if _digest(work / "in") != before:
            outside.append("write to the input (it changed) at ?")
        if (work / "secret.txt").read_bytes() != b"outside the input\n":
            outside.append("write beside the input (a file there changed) at ?")
        leftovers = sorted({p.name for p in work.iterdir()} - {"in", "out", "tmp", "cwd", "secret.txt"})
        leftovers += [f"{d}/{p.name}" for d in ("tmp", "cwd") for p in (work / d).iterdir()]
        if error is not None:  # a failed command leaves no output
            leftovers += [f"out/{p.name}" for p in (work / "out").iterdir()]
    return _outcome(error, outside, leftovers)


def _outcome(error: BaseException | None, outside: list[str], leftovers: list[str]) -> Outcome:
    """Accesses outside first, then the command's own failure, then what it left behind."""
    if outside:
        first = outside[0]
        return Outcome(f"FAIL {first.split(' (')[0]} at {first.rsplit(' at ', 1)[-1]}", "; ".join(outside))
    if isinstance(error, Hang):
        return Outcome(f"FAIL hang at {_site(error)}", str(error))
    if isinstance(error, Violation):
        cause = error.__cause__ or error
        return Outcome(f"FAIL broken output ({type(cause).__name__}) at {_site(cause)}", str(error))
    if error is not None and not isinstance(error, CLEAN_ERRORS):
        detail = "".join(traceback.format_exception(error)[-6:])
        return Outcome(f"FAIL {type(error).__name__} at {_site(error)}", detail)
    if leftovers:
        return Outcome(f"FAIL left behind after {type(error).__name__ if error else 'success'}", "; ".join(leftovers))
    return Outcome("ok" if error is None else f"clean {type(error).__name__}")


# ---------------------------------------------------------------------------------------- running


def fuzz_settings(examples: int, derandomize: bool) -> settings:
    """No example database (inputs are files, rebuilt from the case), no hypothesis deadline (ours is a
    real one), no shrinking: a case is already a few small mutations, and shrinking one that hangs
    reruns it to the deadline many times."""
    return settings(
        max_examples=examples,
        derandomize=derandomize,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.reuse, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )


@dataclass
class Tally:
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    repro: dict[str, tuple[Case, str]] = field(default_factory=dict)  # failure -> its shortest case


def fuzz_reader(seeds: dict[str, Seed], reader: str, examples: int, tally: Tally, deadline_s: float) -> None:
    @fuzz_settings(examples, derandomize=False)
    @given(cases(seeds[reader]))
    def one(case: Case) -> None:
        outcome = run_case(seeds, case, deadline_s)
        tally.counts[f"{reader}\t{outcome.label}"] += 1
        known = tally.repro.get(outcome.label)
        if outcome.failed and (known is None or len(case.to_json()) < len(known[0].to_json())):
            tally.repro[outcome.label] = (case, outcome.detail)

    one()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=500, help="cases per reader (default 500)")
    p.add_argument("--reader", action="append", choices=READERS, help="only these readers (repeatable)")
    p.add_argument("--deadline", type=float, default=20.0, help="seconds per case before it counts as a hang")
    p.add_argument("--repro", help="run one case (as printed) and show its traceback")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fuzz_seeds.") as tmp:
        seeds = build_seeds(Path(tmp))
        if args.repro:
            case = Case.from_json(args.repro)
            outcome = run_case(seeds, case, args.deadline)
            print(outcome.label, outcome.detail, sep="\n")
            return 1 if outcome.failed else 0
        tally = Tally()
        for reader in args.reader or READERS:
            start = time.monotonic()
            fuzz_reader(seeds, reader, args.examples, tally, args.deadline)
            print(f"{reader}: {args.examples} cases in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
    print("reader\toutcome\tcount")
    for key, n in sorted(tally.counts.items()):
        print(f"{key}\t{n}")
    for label, (case, detail) in sorted(tally.repro.items()):
        print(
            f"\n{label}\n  repro: python tools/fuzz.py --repro {shlex.quote(case.to_json())}\n  {detail.strip()[-600:]}"
        )
    return 1 if tally.repro else 0


if __name__ == "__main__":
    sys.exit(main())
