"""torch_dist read/write and safe unpickling: round trips, refusals, and megatron-core on both sides."""

from __future__ import annotations

import dataclasses
import io
import os
import pathlib
import pickle
import subprocess
import sys
import tempfile
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from nemo_vocab_ext.core.dtypes import BY_NAME, dtype_of
from nemo_vocab_ext.errors import CheckpointFormatError, OutputExistsError, UnsafeCheckpointError, UnsupportedError
from nemo_vocab_ext.formats.byteio import FileRegion
from nemo_vocab_ext.formats.safe_pickle import restricted_unpickle, safe_torch_load
from nemo_vocab_ext.formats.torch_dist import (
    DEFAULT_METADATA_JSON,
    TensorInfo,
    list_keys,
    read_tensor_infos,
    read_torch_dist,
    write_torch_dist,
)
from nemo_vocab_ext.formats.torch_pickle import Layout, Size
from nemo_vocab_ext.formats.torch_zip import load_all, read_torch_file

EXTRA = "model.decoder.layers.mlp.linear_fc1._extra_state/shard_0_2"


def _saved(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _sample() -> dict[str, torch.Tensor | bytes]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embedding.word_embeddings.weight": torch.randn(8, 4, generator=g),
        "model.decoder.layers.self_attention.linear_qkv.weight": torch.randn(2, 12, 4, generator=g).bfloat16(),
        "model.decoder.final_layernorm.weight": torch.randn(4, generator=g).half(),
        "counts": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "flags": torch.tensor([True, False]),
        "scalar": torch.tensor(3.25),
        EXTRA: _saved(None),
        "model.output_layer._extra_state": b"\x00raw\xffbytes",
    }


def _assert_same(got: dict[str, torch.Tensor | bytes], want: dict[str, torch.Tensor | bytes]) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        if isinstance(value, bytes):
            assert got[key] == value, key
        else:
            out = got[key]
            assert isinstance(out, torch.Tensor) and out.dtype == value.dtype and torch.equal(out, value), key


@pytest.fixture
def written(tmp_path: Path) -> Path:
    ckpt = tmp_path / "ckpt"
    write_torch_dist(ckpt, _sample(), common=_saved({"step": 3}))
    return ckpt


def test_round_trip_is_bit_exact(written: Path) -> None:
    _assert_same(read_torch_dist(written), _sample())
    assert (written / "common.pt").read_bytes() == _saved({"step": 3})  # written as given
    assert (written / "metadata.json").read_bytes() == DEFAULT_METADATA_JSON
    assert list_keys(written) == list(_sample())


def test_views_are_written_as_their_own_values(tmp_path: Path) -> None:
    big = torch.arange(100.0).reshape(25, 4)
    write_torch_dist(tmp_path / "c", {"rows": big[10:12], "col": big[:, 1]}, common=b"")
    got = read_torch_dist(tmp_path / "c")
    assert torch.equal(got["rows"], big[10:12]) and torch.equal(got["col"], big[:, 1])


def test_subset_read_returns_only_the_asked_keys(written: Path) -> None:
    got = read_torch_dist(written, ["scalar", EXTRA])
    _assert_same(got, {k: v for k, v in _sample().items() if k in ("scalar", EXTRA)})
    with pytest.raises(CheckpointFormatError, match="no such entries.*nope"):
        read_torch_dist(written, ["scalar", "nope"])


def test_tensor_infos_come_from_metadata_only(written: Path) -> None:
    for data_file in written.glob("*.distcp"):
        data_file.unlink()  # no tensor data left: read_tensor_infos must not need it
    infos = read_tensor_infos(written)
    assert infos["model.embedding.word_embeddings.weight"] == TensorInfo((8, 4), BY_NAME["float32"])
    assert infos["model.decoder.layers.self_attention.linear_qkv.weight"] == TensorInfo((2, 12, 4), BY_NAME["bfloat16"])
    assert infos["scalar"] == TensorInfo((), BY_NAME["float32"])
    assert EXTRA not in infos  # byte entries have no shape
    with pytest.raises(CheckpointFormatError, match="data file .* is missing"):
        read_torch_dist(written, ["scalar"])


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete"])
def test_damaged_metadata_is_a_clear_error(written: Path, damage: str) -> None:
    meta = written / ".metadata"
    if damage == "truncate":
        meta.write_bytes(meta.read_bytes()[: meta.stat().st_size // 2])
    elif damage == "garbage":
        meta.write_bytes(b"not a pickle at all")
    else:
        meta.unlink()
    with pytest.raises(CheckpointFormatError, match=r"\.metadata"):
        read_tensor_infos(written)


def test_chunks_that_miss_rows_are_refused(written: Path) -> None:
    meta_file = written / ".metadata"
    metadata = pickle.loads(meta_file.read_bytes())  # a file this test wrote: torch's own classes
    emb = metadata.state_dict_metadata["model.embedding.word_embeddings.weight"]
    emb.chunks[0] = dataclasses.replace(emb.chunks[0], sizes=torch.Size([4, 4]))  # rows 4..7 in no chunk
    meta_file.write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointFormatError, match="do not cover"):
        read_torch_dist(written, ["model.embedding.word_embeddings.weight"])


def _declare_rows(ckpt: Path, key: str, rows: int) -> None:
    """Rewrite ``.metadata`` so that ``key`` (one chunk) is declared ``rows`` rows long, its stored bytes unchanged."""
    meta_file = ckpt / ".metadata"
    metadata = pickle.loads(meta_file.read_bytes())  # a file this test wrote: torch's own classes
    record = metadata.state_dict_metadata[key]
    size = torch.Size([rows, *record.size[1:]])
    record.size, record.chunks[0] = size, dataclasses.replace(record.chunks[0], sizes=size)
    meta_file.write_bytes(pickle.dumps(metadata))


def test_a_chunk_is_the_leading_rows_of_a_longer_stored_tensor_as_torch_loads_it(tmp_path: Path) -> None:
    # A resize refers to a table's kept rows in the source's chunks, which hold the old padding rows too.
    import torch.distributed.checkpoint as dcp

    key, table = "emb", torch.arange(32, dtype=torch.int32).reshape(8, 4)
    write_torch_dist(tmp_path / "c", {key: table}, common=_saved({}))
    _declare_rows(tmp_path / "c", key, 6)
    ours = read_torch_dist(tmp_path / "c")[key]
    theirs = {key: torch.zeros(6, 4, dtype=torch.int32)}
    dcp.load(theirs, checkpoint_id=tmp_path / "c", no_dist=True)
    assert torch.equal(ours, table[:6]) and torch.equal(theirs[key], table[:6])


def test_a_chunk_longer_than_its_stored_tensor_is_refused(written: Path) -> None:
    _declare_rows(written, "model.embedding.word_embeddings.weight", 9)
    with pytest.raises(CheckpointFormatError, match=r"does not hold a torch.float32 tensor of shape \(9, 4\)"):
        read_torch_dist(written, ["model.embedding.word_embeddings.weight"])


def test_truncated_data_file_is_a_clear_error(written: Path) -> None:
    data_file = next(written.glob("*.distcp"))
    data_file.write_bytes(data_file.read_bytes()[:100])
    with pytest.raises(CheckpointFormatError, match="damaged"):
        read_torch_dist(written)


def test_writer_refuses_a_non_empty_folder(written: Path) -> None:
    with pytest.raises(OutputExistsError):
        write_torch_dist(written, {"x": torch.zeros(1)}, common=b"")


# --- nothing may execute ------------------------------------------------------------------------


class _Evil:
    """Unpickling this calls a function: os.system, or a method of an allow-listed class."""

    def __init__(self, marker: Path, how: str) -> None:
        self.marker, self.how = marker, how

    def __reduce__(self) -> tuple[Any, ...]:
        if self.how == "os.system":
            return (os.system, (f"touch {self.marker}",))
        return (pathlib.Path.touch, (self.marker,))  # pathlib.Path is allowed; its methods are not


def _read_lazily(path: Path, *, what: str) -> Any:
    return load_all(read_torch_file(FileRegion(path, 0, path.stat().st_size), what=what))


# torch.load with the allow-list (for in-memory blobs), and the torch-free reader every command uses.
LOADERS = pytest.mark.parametrize("load", [safe_torch_load, _read_lazily], ids=["torch.load", "read_torch_file"])


@LOADERS
@pytest.mark.parametrize("how", ["os.system", "Path.touch"])
def test_malicious_torch_file_runs_nothing(tmp_path: Path, how: str, load: Any) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "model_weights.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Evil(marker, how)}, evil)
    with pytest.raises(UnsafeCheckpointError, match="model_weights.ckpt.*would run code") as err:
        load(evil, what=str(evil))
    assert not marker.exists()
    assert "\n" not in str(err.value)
    # protocol 2 spells a method as getattr(pathlib.Path, "touch"): refused at getattr
    assert ("system" if how == "os.system" else "getattr") in str(err.value)


@pytest.mark.parametrize("how", ["os.system", "Path.touch"])
def test_malicious_metadata_runs_nothing(written: Path, how: str) -> None:
    marker = written.parent / "pwned"
    (written / ".metadata").write_bytes(pickle.dumps(_Evil(marker, how)))
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata.*would run code"):
        read_torch_dist(written)
    assert not marker.exists()


def test_byte_entries_are_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    blob = _saved(_Evil(marker, "os.system"))
    write_torch_dist(tmp_path / "c", {EXTRA: blob}, common=b"")
    assert read_torch_dist(tmp_path / "c") == {EXTRA: blob}
    assert not marker.exists()


def test_restricted_unpickle_refuses_other_globals() -> None:
    with pytest.raises(UnsafeCheckpointError, match="collections.OrderedDict"):
        restricted_unpickle(pickle.dumps(OrderedDict(a=1)), what="x/.metadata")


@pytest.mark.parametrize(
    "value", [torch.zeros(2, dtype=torch.complex64), torch.zeros(2, dtype=torch.uint32)], ids=["complex64", "uint32"]
)
def test_other_element_types_are_unsupported_not_unsafe(tmp_path: Path, value: torch.Tensor) -> None:
    # A typed storage torch names (ComplexFloatStorage), and a dtype saved untyped (uint32).
    path = tmp_path / "model_weights.ckpt"
    torch.save({"state_dict": {"w": value}}, path)
    with pytest.raises(
        UnsupportedError, match=r"model_weights.ckpt: holds torch\.\w+ tensors; this tool handles"
    ) as err:
        _read_lazily(path, what=str(path))
    assert "would run code" not in str(err.value) and "\n" not in str(err.value)


# --- what NeMo and Lightning files contain loads ------------------------------------------------


@LOADERS
def test_lightning_style_payload_loads(tmp_path: Path, load: Any) -> None:
    cfg = OmegaConf.create(
        {"cfg": {"hidden_size": 8, "lr": 1e-3, "flag": True, "none": None, "path": Path("/x"), "layers": [1, {"a": 2}]}}
    )
    typed = OmegaConf.structured({"n": 1})  # typed leaves as from a dataclass merge
    payload = {
        "epoch": 0,
        "global_step": 3,
        "state_dict": OrderedDict(w=torch.ones(2, 2).bfloat16(), extra=io.BytesIO(b"te-extra-state")),
        "optimizer_states": [
            {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-3, "params": [0]}]}
        ],
        "loops": {"fit_loop": {"state_dict": {}}},
        "hyper_parameters": cfg,
        "hparams_type": DictConfig,
        "typed": typed,
        "artifacts": {"abc_vocab.json": b"{}"},
        "sizes": torch.Size([2, 3]),
    }
    path = tmp_path / "last.ckpt"
    torch.save(payload, path)
    got = load(path, what=str(path))
    assert OmegaConf.to_container(got["hyper_parameters"]) == OmegaConf.to_container(cfg)
    assert got["hparams_type"] is DictConfig and got["typed"] == typed
    assert got["state_dict"]["extra"].getvalue() == b"te-extra-state"
    assert torch.equal(got["state_dict"]["w"], payload["state_dict"]["w"])
    assert got["state_dict"]["w"].dtype == torch.bfloat16 and got["sizes"] == (2, 3)
    assert torch.equal(got["optimizer_states"][0]["state"][0]["step"], torch.tensor(3.0))


@LOADERS
def test_unreadable_torch_file_is_a_format_error(tmp_path: Path, load: Any) -> None:
    path = tmp_path / "common.pt"
    path.write_bytes(_saved({"a": torch.zeros(3)})[:50])
    with pytest.raises(CheckpointFormatError, match="common.pt"):
        load(path, what=str(path))


# --- megatron-core on the other side ------------------------------------------------------------


@pytest.fixture(scope="module")
def process_group() -> Iterator[None]:
    """A 1-rank gloo group (file store), as megatron's dist_checkpointing needs one."""
    pytest.importorskip("megatron.core.dist_checkpointing")
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        with tempfile.TemporaryDirectory() as tmp:
            dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
            yield
            dist.destroy_process_group()
    else:
        yield


def test_megatron_loads_what_we_write(tmp_path: Path, process_group: None) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor

    emb = torch.randn(8, 4)
    qkv = torch.randn(2, 12, 4).bfloat16()
    # megatron stores a ShardedObject as torch.save([data]): a list of one.
    tensors = {
        "model.embedding.word_embeddings.weight": emb,
        "model.decoder.layers.self_attention.linear_qkv.weight": qkv,
        "scalar": torch.tensor(7),
        "ex/shard_0_2": _saved([None]),
        "ex/shard_1_2": _saved([{"amax": torch.ones(2)}]),
    }
    write_torch_dist(tmp_path / "c", tensors, common=_saved({}))
    # Ask for the embedding as two row blocks (a TP=2 split, both blocks on this one rank).
    sharded = {
        "emb0": ShardedTensor.from_rank_offsets("model.embedding.word_embeddings.weight", torch.empty(4, 4), (0, 0, 2)),
        "emb1": ShardedTensor.from_rank_offsets("model.embedding.word_embeddings.weight", torch.empty(4, 4), (0, 1, 2)),
        "qkv": ShardedTensor.from_rank_offsets(
            "model.decoder.layers.self_attention.linear_qkv.weight", torch.empty(2, 12, 4, dtype=torch.bfloat16)
        ),
        "scalar": ShardedTensor.from_rank_offsets("scalar", torch.empty((), dtype=torch.int64)),
        "ex0": ShardedObject("ex", None, (2,), (0,)),
        "ex1": ShardedObject("ex", None, (2,), (1,)),
    }
    got = dist_checkpointing.load(sharded, str(tmp_path / "c"), strict="raise_all")
    assert torch.equal(torch.cat([got["emb0"], got["emb1"]]), emb)
    assert got["qkv"].dtype == torch.bfloat16 and torch.equal(got["qkv"], qkv)
    assert torch.equal(got["scalar"], torch.tensor(7))
    assert got["ex0"] is None and torch.equal(got["ex1"]["amax"], torch.ones(2))


@pytest.fixture
def megatron_saved(tmp_path: Path, process_group: None, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A checkpoint written by megatron-core's own save: the embedding in two row chunks."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor

    # megatron's save path calls CUDA unconditionally: no-ops on a CPU-only torch.
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    emb = torch.arange(32.0).reshape(8, 4)
    sharded = {
        "a": ShardedTensor.from_rank_offsets("model.embedding.word_embeddings.weight", emb[:4].clone(), (0, 0, 2)),
        "b": ShardedTensor.from_rank_offsets("model.embedding.word_embeddings.weight", emb[4:].clone(), (0, 1, 2)),
        "ln": ShardedTensor.from_rank_offsets("model.decoder.final_layernorm.weight", torch.ones(4).bfloat16()),
        "x0": ShardedObject(EXTRA.split("/")[0], None, (2,), (0,)),
        "x1": ShardedObject(EXTRA.split("/")[0], b"state", (2,), (1,)),
    }
    (tmp_path / "mc").mkdir()
    dist_checkpointing.save(sharded, str(tmp_path / "mc"))
    return tmp_path / "mc"


def test_reads_megatron_saved_checkpoint_joined(megatron_saved: Path) -> None:
    assert b"MCoreSavePlan" in (megatron_saved / ".metadata").read_bytes()  # a megatron class, mapped
    infos = read_tensor_infos(megatron_saved)
    assert infos["model.embedding.word_embeddings.weight"] == TensorInfo((8, 4), BY_NAME["float32"])
    got = read_torch_dist(megatron_saved)
    emb = got["model.embedding.word_embeddings.weight"]
    assert isinstance(emb, torch.Tensor) and torch.equal(emb, torch.arange(32.0).reshape(8, 4))
    assert torch.equal(got["model.decoder.final_layernorm.weight"], torch.ones(4).bfloat16())
    blob = got[EXTRA.replace("shard_0_2", "shard_1_2")]
    assert isinstance(blob, bytes) and torch.load(io.BytesIO(blob), weights_only=True) == [b"state"]


def test_reads_megatron_checkpoint_where_megatron_cannot_be_imported(megatron_saved: Path) -> None:
    code = (
        "import sys; sys.modules['megatron'] = None\n"  # any megatron import now fails
        "from nemo_vocab_ext.formats.torch_dist import read_torch_dist\n"
        f"t = read_torch_dist({str(megatron_saved)!r})\n"
        "assert t['model.embedding.word_embeddings.weight'].shape == (8, 4)\n"
        "assert not any(m.startswith('megatron.') for m in sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# --- .metadata records without torch.distributed.checkpoint ------------------------------------


def _real_metadata() -> Any:
    from torch.distributed.checkpoint import metadata as dcp
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    props = dcp.TensorProperties(dtype=torch.bfloat16, requires_grad=True, memory_format=torch.channels_last)
    return dcp.Metadata(
        state_dict_metadata={
            "w": dcp.TensorStorageMetadata(
                props,
                torch.Size([4, 2]),
                [dcp.ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([2, 2])),
                 dcp.ChunkStorageMetadata(torch.Size([2, 0]), torch.Size([2, 2]))],
            ),
            "blob": dcp.BytesStorageMetadata(),
        },
        storage_data={
            dcp.MetadataIndex("w", torch.Size([0, 0])): _StorageInfo("__0_0.distcp", 0, 7),
            dcp.MetadataIndex("w", torch.Size([2, 0])): _StorageInfo("__0_0.distcp", 7, 7),
            dcp.MetadataIndex("blob"): _StorageInfo("__0_1.distcp", 0, 3, transform_descriptors=["zstd"]),
        },
        storage_meta=dcp.StorageMeta(checkpoint_id="/x", save_id="s"),
        version="1.0.0",
    )  # fmt: skip


def _records(real: Any) -> Any:
    """The same metadata, built from the stand-ins field by field."""
    from nemo_vocab_ext.formats import dcp_records as r

    def tensor(md: Any) -> Any:
        p = md.properties
        layout = Layout(str(p.layout))
        memory_format = r.MemoryFormat.TORCH_CHANNELS_LAST
        props = r.TensorProperties(dtype_of(p.dtype), layout, p.requires_grad, memory_format, p.pin_memory)
        return r.TensorStorageMetadata(props, md.size, [r.ChunkStorageMetadata(c.offsets, c.sizes) for c in md.chunks])

    return r.Metadata(
        state_dict_metadata={"w": tensor(real.state_dict_metadata["w"]), "blob": r.BytesStorageMetadata()},
        storage_data={r.MetadataIndex(i.fqn, i.offset): r.StorageInfo(**vars(f)) for i, f in real.storage_data.items()},
        storage_meta=r.StorageMeta(checkpoint_id="/x", save_id="s"),
        version="1.0.0",
    )


def test_metadata_records_read_what_torch_writes() -> None:
    real = _real_metadata()
    read = restricted_unpickle(pickle.dumps(real), what="x/.metadata")
    assert read == _records(real)
    props = read.state_dict_metadata["w"].properties
    assert props.requires_grad is True and props.dtype is BY_NAME["bfloat16"] and props.layout == "torch.strided"
    assert type(read.state_dict_metadata["w"].size) is Size


def test_metadata_records_write_what_torch_reads() -> None:
    from nemo_vocab_ext.formats.dcp_records import dumps

    real = _real_metadata()
    loaded = pickle.loads(dumps(_records(real)))  # torch's own classes come back
    assert type(loaded) is type(real) and loaded == real
    assert loaded.storage_data == real.storage_data
    assert loaded.state_dict_metadata["w"].properties.memory_format is torch.channels_last


def test_start_up_imports_neither_torch_nor_torch_distributed_checkpoint() -> None:
    # torch (about 3 s) waits for a command that computes on tensor values: the CLI and the whole
    # checkpoint library (every format, read and write) import none of it; torch.distributed.checkpoint
    # (1.3 s more: DTensor, sympy) is never needed, as the records above stand in for its classes.
    code = (
        "import sys, nemo_vocab_ext.cli, nemo_vocab_ext.io, nemo_vocab_ext.formats.nemo, "
        "nemo_vocab_ext.formats.lightning, nemo_vocab_ext.formats.safetensors_io; print('torch' in sys.modules); "
        "import nemo_vocab_ext.layout, nemo_vocab_ext.resize_job, nemo_vocab_ext.validate, "
        "nemo_vocab_ext.describe; print(any(m.startswith('torch.distributed.checkpoint') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
