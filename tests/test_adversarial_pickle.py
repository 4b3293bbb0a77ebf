"""Crafted checkpoints: whatever a pickle or a record says, loading it changes nothing in the program, and
every command refuses it with one line and exit 1, writing nothing and leaving the source as it was.

The crafted files are real files this tool writes, rewritten: opcodes put in front of their pickles,
tensor records pickled with chosen views, torch_dist records edited with torch's own classes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import pathlib
import pickle
import pickletools
import re
import struct
import tarfile
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from conftest import english_texts
from test_cli import make_nemo

from nemo_vocab_ext.checkpoint import SINGLE
from nemo_vocab_ext.cli import main
from nemo_vocab_ext.errors import CheckpointFormatError, UnsafeCheckpointError
from nemo_vocab_ext.formats import dcp_records
from nemo_vocab_ext.formats.safe_pickle import MAX_DEPTH, config_global, restricted_loads
from nemo_vocab_ext.io import Format, load_checkpoint, save_checkpoint
from nemo_vocab_ext.tokenization.train import train_bpe

EMBEDDING = "model.embedding.word_embeddings.weight"
WEIGHTS = "model_weights.ckpt"
METADATA = "model_weights/.metadata"
DISTCP = "model_weights/__0_0.distcp"


# --- the files ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A distributed and a single-file .nemo and a Lightning .ckpt of one tiny model, written by this tool."""
    root = tmp_path_factory.mktemp("sources")
    tokenizer = train_bpe(english_texts(), root / "tok", 400)
    dist = make_nemo(root / "dist.nemo", tokenizer, tied=False)
    ckpt, _ = load_checkpoint(dist)
    ckpt.layout = SINGLE
    save_checkpoint(ckpt, root / "single.nemo", Format.NEMO)
    save_checkpoint(ckpt, root / "single.ckpt", Format.CKPT)
    return {"dist.nemo": dist, "single.nemo": root / "single.nemo", "single.ckpt": root / "single.ckpt"}


def _members(nemo: Path) -> dict[str, bytes]:
    with tarfile.open(nemo) as tar:
        return {
            m.name.removeprefix("./"): tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }


def _write_nemo(dst: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(dst, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return dst


def _rewrite_pickle(torch_file: bytes, fn: Callable[[bytes], bytes]) -> bytes:
    """A torch.save file with its data.pkl replaced by ``fn(data.pkl)``."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(torch_file)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            # Stored records, read where they lie (this tool writes no CRC for tensor data, as it streams it).
            name_len, extra_len = struct.unpack_from("<2H", torch_file, info.header_offset + 26)
            start = info.header_offset + 30 + name_len + extra_len
            data = torch_file[start : start + info.file_size]
            dst.writestr(info.filename, fn(data) if info.filename.endswith("/data.pkl") else data)
    return out.getvalue()


def _crafted(sources: dict[str, Path], name: str, dst: Path, fn: Callable[[bytes], bytes]) -> Path:
    """``sources[name]`` with the pickle the attack goes into replaced by ``fn(pickle)``."""
    if name == "single.ckpt":
        dst.write_bytes(_rewrite_pickle(sources[name].read_bytes(), fn))
        return dst
    members = _members(sources[name])
    if name == "single.nemo":
        members[WEIGHTS] = _rewrite_pickle(members[WEIGHTS], fn)
    else:
        members[METADATA] = fn(members[METADATA])
    return _write_nemo(dst, members)


def _in_front(opcodes: bytes) -> Callable[[bytes], bytes]:
    """Run ``opcodes`` (leaving the stack as it was) before a protocol-2 pickle's object."""
    return lambda data: data[:2] + opcodes + data[2:]


def _build_on_class(module: str, name: str, attributes: dict[str, Any]) -> bytes:
    """Opcodes that push a class, BUILD it with ``attributes`` as slot state (setattr on the class) and pop it."""
    state = pickletools.optimize(pickle.dumps((None, attributes), protocol=2))[2:-1]
    return f"c{module}\n{name}\n".encode() + state + pickle.BUILD + pickle.POP


# --- every command refuses, and nothing changes -----------------------------------------------------


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _refused(src: Path, work: Path, match: str) -> None:
    """inspect, validate, convert and resize each fail with one line matching ``match`` and exit 1; nothing
    is written under ``work`` and the source is unchanged."""
    before, digest = sorted(work.rglob("*")), _digest(src)
    out = work / "out.nemo"
    for args in (
        ["inspect", src],
        ["validate", src],
        ["convert", src, out],
        ["resize", src, out, "--vocab-size", "1000", "--init", "mean"],
    ):
        with _classes_kept():
            result = CliRunner().invoke(main, [str(a) for a in args])
        assert type(result.exception) is SystemExit and result.exit_code == 1, (args[0], result.output)
        assert len(result.output.strip().splitlines()) == 1 and re.search(match, result.output), (
            args[0],
            result.output,
        )
    assert sorted(work.rglob("*")) == before
    assert _digest(src) == digest


# Classes a crafted BUILD could change: each load here is watched, and they are put back at once (pytest
# itself uses pathlib: a changed Path would break its report of the failure).
def _watched() -> list[type]:
    from omegaconf import AnyNode, DictConfig, ListConfig

    records = [c for c in vars(dcp_records).values() if isinstance(c, type) and issubclass(c, dcp_records.Record)]
    return [pathlib.Path, pathlib.PosixPath, pathlib.PurePath, DictConfig, ListConfig, AnyNode, *records]


@contextlib.contextmanager
def _classes_kept() -> Iterator[None]:
    before = {cls: dict(vars(cls)) for cls in _watched()}
    try:
        yield
    finally:
        changed = [cls.__name__ for cls, attrs in before.items() if dict(vars(cls)) != attrs]
        for cls, attrs in before.items():
            for name in set(vars(cls)) - set(attrs):
                delattr(cls, name)
            for name, value in attrs.items():
                if vars(cls).get(name) is not value and name not in ("__dict__", "__weakref__", "__doc__"):
                    setattr(cls, name, value)
    assert not changed, f"loading changed the classes {changed}"


# --- 1. no allowed class takes state from the file ---------------------------------------------------


@pytest.mark.parametrize("name", ["single.nemo", "dist.nemo", "single.ckpt"])
def test_build_on_a_class_is_refused(sources: dict[str, Path], tmp_path: Path, name: str) -> None:
    # Path.name made an absolute path: the output would be written there instead of beside its destination.
    outside = tmp_path / "outside" / "evil.pth"
    opcodes = _build_on_class("pathlib", "Path", {"name": str(outside), "is_file": True})
    src = _crafted(sources, name, tmp_path / f"crafted_{name}", _in_front(opcodes))
    _refused(src, tmp_path, r"refused to load: it sets the attributes of Path")
    assert not outside.parent.exists()


@pytest.mark.parametrize(
    ("module", "name"),
    [("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"), ("pathlib", "PosixPath")],
)
def test_build_on_a_metadata_class_is_refused(sources: dict[str, Path], tmp_path: Path, module: str, name: str) -> None:
    opcodes = _build_on_class(module, name, {"__eq__": None, "name": "/"})
    src = _crafted(sources, "dist.nemo", tmp_path / "crafted.nemo", _in_front(opcodes))
    _refused(src, tmp_path, rf"crafted.nemo:model_weights: refused to load: it sets the attributes of {name}")


def _opcodes(*parts: bytes | str) -> bytes:
    return b"\x80\x02" + b"".join(p.encode("latin-1") if isinstance(p, str) else p for p in parts) + pickle.STOP


def _config_pickle(edit: Callable[[Any], None]) -> bytes:
    """A real OmegaConf config, pickled as Lightning does, after ``edit`` changed its objects' state."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"cfg": {"hidden_size": 8, "layers": [1, 2]}})
    edit(cfg)
    return pickle.dumps(cfg, protocol=2)


def _self_containing() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


def _nested_opcodes(depth: int) -> bytes:
    """Lists in lists ``depth`` deep, as opcodes (the pickler itself cannot write them that deep)."""
    return pickle.EMPTY_LIST * depth + pickle.APPEND * (depth - 1)


# A value that _torch_file writes as lists nested 100,000 deep.
NESTED = "@@nested@@"


def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        # Objects of allowed classes with state from the file.
        (_opcodes("cpathlib\nPath\n)\x81"), UnsafeCheckpointError, "makes a Path without calling it"),
        (_opcodes("cpathlib\nPath\nX\x02\x00\x00\x00/x\x85R}X\x04\x00\x00\x00_strX\x04\x00\x00\x00/etcsb"),
         UnsafeCheckpointError, "sets the attributes of PosixPath"),
        (_opcodes("cpathlib\nPath\nC\x01x\x85R"), UnsafeCheckpointError, "calls Path with unexpected arguments"),
        (_opcodes("c__builtin__\ndict\n)R"), UnsafeCheckpointError, "calls dict"),
        (_opcodes("c_codecs\nencode\nX\x01\x00\x00\x00xX\x05\x00\x00\x00rot13\x86R"), UnsafeCheckpointError,
         "calls encode with unexpected arguments"),
        (_opcodes("ccollections\ndefaultdict\ncpathlib\nPath\n\x85R"), UnsafeCheckpointError, "calls defaultdict with"),
        (_opcodes("c_io\nBytesIO\n)\x81C\x01xK\x05N\x87b"), CheckpointFormatError, "BytesIO whose state"),
        (_opcodes("c_io\nBytesIO\n)\x81"), CheckpointFormatError, "BytesIO whose state"),  # never given state
        (_opcodes("ccollections\nOrderedDict\n)R}X\x04\x00\x00\x00keysNsb"), CheckpointFormatError,
         "other attributes than module versions"),
        # Containers filled that are not containers.
        (_opcodes("c__builtin__\nlist\n(K\x01e"), CheckpointFormatError, "APPENDS on a type"),
        (_opcodes("ccollections\nOrderedDict\nK\x01K\x02s"), CheckpointFormatError, "SETITEM on a type"),
        # OmegaConf objects with other attributes, values or shapes than OmegaConf gives them.
        (_config_pickle(lambda cfg: vars(cfg).update(_evil=1)), CheckpointFormatError, "other attributes"),
        (_config_pickle(lambda cfg: vars(cfg._get_node("cfg")._get_node("hidden_size")).update(_val=[1])),
         CheckpointFormatError, "not a plain value"),
        (_config_pickle(lambda cfg: vars(cfg._get_node("cfg")).update(_content=[])), CheckpointFormatError,
         "not a tree"),
        (_config_pickle(lambda cfg: vars(cfg._get_node("cfg")._metadata).update(object_type=OrderedDict)),
         CheckpointFormatError, "values of other types"),
        # Objects without end.
        (pickle.dumps({"state_dict": _self_containing()}, protocol=2), CheckpointFormatError, "contains itself"),
        (pickle.dumps(_nested(MAX_DEPTH + 1), protocol=2), CheckpointFormatError, "nested more than"),
        (_opcodes(_nested_opcodes(50_000)), CheckpointFormatError, "nested more than"),
    ],
    ids=lambda value: value if isinstance(value, str) else getattr(value, "__name__", "pickle"),
)  # fmt: skip
def test_crafted_opcodes_are_refused(data: bytes, error: type[Exception], message: str) -> None:
    with _classes_kept(), pytest.raises(error, match=message) as err:
        restricted_loads(data, config_global, what="x.ckpt")
    assert str(err.value).startswith("x.ckpt: ") and "\n" not in str(err.value)


def test_real_configs_and_shared_containers_still_load() -> None:
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"cfg": {"a": [1, {"b": "${cfg.a}"}], "p": pathlib.Path("/tmp/x"), "n": None}})
    shared = {"x": 1}
    data = pickle.dumps({"hyper_parameters": cfg, "one": shared, "two": shared}, protocol=2)
    loaded = restricted_loads(data, config_global, what="x.ckpt")
    assert loaded["hyper_parameters"] == cfg and loaded["one"] is loaded["two"]
    assert OmegaConf.to_container(loaded["hyper_parameters"]) == OmegaConf.to_container(cfg)


# --- 2. tensor records ---------------------------------------------------------------------------------


class _Storage:
    """A storage record: its bytes, and the element type and count its reference declares."""

    def __init__(self, data: bytes, kind: Any = torch.FloatStorage, numel: int | None = None) -> None:
        self.data, self.kind, self.numel = data, kind, len(data) // 4 if numel is None else numel


class _Tensor:
    """Pickles as torch.save pickles a tensor, with the view (and dtype, for ``_rebuild_tensor_v3``) given."""

    def __init__(self, storage: _Storage, shape: Any, stride: Any, offset: Any = 0, dtype: Any = None) -> None:
        self.storage, self.shape, self.stride, self.offset, self.dtype = storage, shape, stride, offset, dtype

    @classmethod
    def of(cls, t: torch.Tensor) -> _Tensor:
        assert t.dtype == torch.float32 and t.is_contiguous()
        return cls(_Storage(t.numpy().tobytes()), tuple(t.shape), t.stride())

    def __reduce__(self) -> tuple[Any, ...]:
        args = (self.storage, self.offset, self.shape, self.stride, False, OrderedDict())
        if self.dtype is None:
            return (torch._utils._rebuild_tensor_v2, args)
        return (torch._utils._rebuild_tensor_v3, (*args, self.dtype))


def _torch_file(obj: Any) -> bytes:
    """What torch.save writes for ``obj`` (its tensors given as :class:`_Tensor`)."""
    storages: list[_Storage] = []

    class Pickler(pickle.Pickler):
        def persistent_id(self, value: Any) -> Any:
            if not isinstance(value, _Storage):
                return None
            if value not in storages:
                storages.append(value)
            return ("storage", value.kind, str(storages.index(value)), "cpu", value.numel)

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump(obj)
    marker = pickle.dumps(NESTED, protocol=2)[2:-3]  # its BINUNICODE opcode, without the memo's BINPUT
    pickled = buffer.getvalue().replace(marker, _nested_opcodes(100_000))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pickled)
        zf.writestr("archive/byteorder", "little")
        for i, storage in enumerate(storages):
            zf.writestr(f"archive/data/{i}", storage.data)
        zf.writestr("archive/version", "3\n")
    return out.getvalue()


def _with_weights(sources: dict[str, Path], dst: Path, extra: dict[Any, Any]) -> Path:
    """The single-file .nemo with its weights pickled again, plus ``extra`` entries."""
    members = _members(sources["single.nemo"])
    state = torch.load(io.BytesIO(members[WEIGHTS]), weights_only=True)
    members[WEIGHTS] = _torch_file({**{k: _Tensor.of(v) for k, v in state.items()}, **extra})
    return _write_nemo(dst, members)


def test_the_crafted_weights_are_what_torch_writes(sources: dict[str, Path], tmp_path: Path) -> None:
    """The tensor records below differ from a real file only where they say (else their refusals prove nothing)."""
    src = _with_weights(sources, tmp_path / "same.nemo", {"model.extra": _Tensor(_Storage(bytes(64)), (2, 8), (8, 1))})
    state = torch.load(io.BytesIO(_members(src)[WEIGHTS]), weights_only=True)
    real = torch.load(io.BytesIO(_members(sources["single.nemo"])[WEIGHTS]), weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in real.items()) and torch.equal(
        state["model.extra"], torch.zeros(2, 8)
    )
    result = CliRunner().invoke(main, ["inspect", str(src)])
    assert result.exit_code == 0, result.output


_FLOATS = _Storage(bytes(64))  # 16 float32 elements

TENSOR_RECORDS = {
    "negative size": (_Tensor(_FLOATS, (-1, 4), (4, 1)), "shape"),
    "negative stride": (_Tensor(_FLOATS, (4, 4), (4, -1), 3), "shape"),
    "negative offset": (_Tensor(_FLOATS, (2, 4), (4, 1), -4), "shape"),
    "float size": (_Tensor(_FLOATS, (4.0, 4), (4, 1)), "shape"),
    "size over int64": (_Tensor(_FLOATS, (0, 2**70), (1, 1)), "shape"),
    "stride over int64": (_Tensor(_FLOATS, (1, 16), (2**64, 1)), "shape"),
    "fewer strides": (_Tensor(_FLOATS, (4, 4), (1,)), "shape"),
    "view past the storage": (_Tensor(_FLOATS, (4, 4), (4, 1), 8), "reaches past its 64-byte storage"),
    "strides past the storage": (_Tensor(_FLOATS, (4, 4), (8, 1)), "reaches past its 64-byte storage"),
    "more elements than stored": (_Tensor(_FLOATS, (1000,), (0,)), "reaches past its 64-byte storage"),
    "storage shorter than declared": (_Tensor(_Storage(bytes(64), numel=32), (4, 4), (4, 1)), "holds 64 bytes, not"),
    "storage longer than declared": (_Tensor(_Storage(bytes(64), numel=8), (2, 4), (4, 1)), "holds 64 bytes, not"),
    "dtype not a dtype": (_Tensor(_Storage(bytes(64), torch.UntypedStorage, 64), (16,), (1,), 0, "float32"),
                          "element type is not its storage's"),
    "dtype a class": (_Tensor(_Storage(bytes(64), torch.UntypedStorage, 64), (16,), (1,), 0, torch.Size),
                      "element type is not its storage's"),
    "dtype not the storage's": (_Tensor(_FLOATS, (8,), (1,), 0, torch.bfloat16), "element type is not its storage's"),
    "container holding itself": (_self_containing(), "contains itself"),
    "nested without end": (NESTED, "nested more than"),
}  # fmt: skip


@pytest.mark.parametrize("case", TENSOR_RECORDS)
def test_bad_tensor_records_are_refused(sources: dict[str, Path], tmp_path: Path, case: str) -> None:
    record, message = TENSOR_RECORDS[case]
    src = _with_weights(sources, tmp_path / "crafted.nemo", {"model.extra": record})
    _refused(src, tmp_path, rf"{WEIGHTS}: .*{re.escape(message)}")


def test_state_dict_keys_that_are_not_strings_are_refused(sources: dict[str, Path], tmp_path: Path) -> None:
    src = _with_weights(sources, tmp_path / "crafted.nemo", {7: _Tensor(_FLOATS, (4, 4), (4, 1))})
    _refused(src, tmp_path, r"a tensor is named 7, not by a string")


# --- 3. torch_dist records -------------------------------------------------------------------------------


def _torch_metadata(sources: dict[str, Path]) -> tuple[dict[str, bytes], Any]:
    """The distributed .nemo's members, and its .metadata as torch's own records (it is this tool's file)."""
    members = _members(sources["dist.nemo"])
    return members, pickle.loads(members[METADATA])


def _edited(sources: dict[str, Path], dst: Path, edit: Callable[[Any, dict[str, bytes]], None]) -> Path:
    members, metadata = _torch_metadata(sources)
    edit(metadata, members)
    members[METADATA] = pickle.dumps(metadata, protocol=2)
    return _write_nemo(dst, members)


def _split_embedding(metadata: Any, members: dict[str, bytes], offsets: list[int], rows: list[int]) -> None:
    """The embedding stored as chunks of ``rows`` rows at ``offsets``, each an item appended to the data file."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    md = metadata.state_dict_metadata[EMBEDDING]
    (item,) = [v for k, v in metadata.storage_data.items() if k.fqn == EMBEDDING]
    md.chunks = []
    for offset, count in zip(offsets, rows, strict=True):
        saved = io.BytesIO()
        torch.save(torch.ones(count, md.size[1]), saved)
        chunk_offsets = torch.Size([offset, 0])
        md.chunks.append(ChunkStorageMetadata(chunk_offsets, torch.Size([count, md.size[1]])))
        info = type(item)(item.relative_path, len(members[DISTCP]), len(saved.getvalue()))
        metadata.storage_data[MetadataIndex(EMBEDDING, chunk_offsets)] = info
        members[DISTCP] += saved.getvalue()


def _set(path: str, value: Any) -> Callable[[Any, dict[str, bytes]], None]:
    """An edit setting one attribute of the embedding's records (``del`` for value ``...``)."""

    def edit(metadata: Any, members: dict[str, bytes]) -> None:
        md = metadata.state_dict_metadata[EMBEDDING]
        (info,) = [v for k, v in metadata.storage_data.items() if k.fqn == EMBEDDING]
        owner_name, _, attr = path.rpartition(".")
        owner = {"md": md, "properties": md.properties, "chunk": md.chunks[0], "info": info}[owner_name]
        if value is ...:
            delattr(owner, attr)
        else:
            setattr(owner, attr, value)

    return edit


DIST_RECORDS: dict[str, tuple[Callable[[Any, dict[str, bytes]], None], str]] = {
    # Chunk sizes add up to the tensor's, so only a tiling check finds these.
    "overlapping chunks": (lambda m, b: _split_embedding(m, b, [0, 128], [256, 256]), "do not cover its shape"),
    "chunk before the tensor": (lambda m, b: _split_embedding(m, b, [-128, 128], [256, 384]), "no valid shape"),
    "chunk past the tensor": (lambda m, b: _split_embedding(m, b, [0, 384], [256, 256]), "do not cover"),
    "missing chunks": (_set("md.chunks", ...), "missing or unknown fields"),
    "size a string": (_set("md.size", "512"), "no valid shape"),
    "chunk offsets strings": (_set("chunk.offsets", ("0", "0")), "no valid shape"),
    "chunk of another rank": (_set("chunk.sizes", torch.Size([512])), "no valid shape"),
    "dtype a string": (_set("properties.dtype", "float32"), "properties of .* are not a tensor's"),
    "storage offset a string": (_set("info.offset", "0"), "not a file name and a byte range"),
    "storage past its file": (_set("info.offset", 10**9), "lies outside its"),
    "transforms not a list": (_set("info.transform_descriptors", 5), "not a file name and a byte range"),
    "key not a string": (lambda m, b: m.state_dict_metadata.update({7: m.state_dict_metadata.pop(EMBEDDING)}),
                         "an entry is named 7"),
    "complex dtype": (_set("properties.dtype", torch.complex64), "holds torch.complex64 tensors"),
}  # fmt: skip


@pytest.mark.parametrize("case", DIST_RECORDS)
def test_bad_torch_dist_records_are_refused(sources: dict[str, Path], tmp_path: Path, case: str) -> None:
    edit, message = DIST_RECORDS[case]
    src = _edited(sources, tmp_path / "crafted.nemo", edit)
    _refused(src, tmp_path, message)


def test_chunks_that_tile_the_tensor_still_read(sources: dict[str, Path], tmp_path: Path) -> None:
    src = _edited(sources, tmp_path / "split.nemo", lambda m, b: _split_embedding(m, b, [256, 0], [256, 256]))
    ckpt, _ = load_checkpoint(src)
    assert torch.equal(ckpt.tensors[EMBEDDING], torch.ones(512, 8))


def test_a_data_file_outside_the_checkpoint_is_refused(sources: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "elsewhere.distcp").write_bytes(_members(sources["dist.nemo"])[DISTCP])
    src = _edited(sources, tmp_path / "crafted.nemo", _set("info.relative_path", "../../elsewhere.distcp"))
    _refused(src, tmp_path, "elsewhere.distcp")
