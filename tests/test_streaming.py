"""Entries read lazily and written one at a time: torch.save files, safetensors, tar streams, bounded memory."""

from __future__ import annotations

import collections
import io
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nemo_vocab_ext.beside import Beside
from nemo_vocab_ext.checkpoint import DISTRIBUTED, SINGLE, Checkpoint
from nemo_vocab_ext.core.dtypes import dtype_of
from nemo_vocab_ext.entries import Deferred, Entries, Stored, torch_as_array
from nemo_vocab_ext.errors import CheckpointFormatError, ResizeError
from nemo_vocab_ext.formats import byteio, torch_zip
from nemo_vocab_ext.formats.byteio import FileRegion, OutFile
from nemo_vocab_ext.formats.folder import tar_out
from nemo_vocab_ext.formats.safetensors_io import read_safetensors
from nemo_vocab_ext.formats.torch_zip import StoredTensor, load_all, read_torch_file, write_torch_file
from nemo_vocab_ext.io import Format, load_checkpoint, save_checkpoint
from nemo_vocab_ext.pipeline import StopOnFailure


def whole(path: Path) -> FileRegion:
    return FileRegion(path, 0, path.stat().st_size)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def tricky_state() -> collections.OrderedDict:
    """Every kind of leaf a NeMo state dict holds, plus views whose storage is larger than they are."""
    state = collections.OrderedDict(
        bf16=torch.arange(6, dtype=torch.bfloat16).reshape(2, 3),
        empty=None,
        extra=io.BytesIO(b"\x80\x04N."),
        transposed=torch.arange(12.0).reshape(3, 4).t(),
        narrowed=torch.arange(10)[3:7],
        scalar=torch.tensor(3.0),
        float8=torch.tensor([0.5, -2.0, 448.0]).to(torch.float8_e4m3fn),  # saved untyped (no typed storage)
    )
    state["tied"] = state["bf16"]
    return state


def test_lazy_reader_reads_torch_save_files(tmp_path: Path) -> None:
    state = tricky_state()
    torch.save({"state_dict": state, "step": 7}, tmp_path / "t.pt")
    lazy = read_torch_file(whole(tmp_path / "t.pt"), what="t.pt")
    assert lazy["step"] == 7
    stored = lazy["state_dict"]
    assert isinstance(stored["bf16"], StoredTensor) and stored["bf16"].shape == (2, 3)
    assert stored["bf16"].identity() == stored["tied"].identity()  # one storage, two names
    assert stored["transposed"].raw() is None  # not C-ordered: must be decoded
    assert stored["narrowed"].raw() is not None  # contiguous at an offset: bytes usable as they lie
    loaded = load_all(lazy)["state_dict"]
    for key in ("bf16", "transposed", "narrowed", "scalar", "tied", "float8"):
        assert same_bits(loaded[key], state[key]), key
    assert loaded["empty"] is None and loaded["extra"].getvalue() == b"\x80\x04N."


@pytest.mark.parametrize("zip64_limit", [None, 100])
def test_written_torch_files_load_with_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, zip64_limit: int) -> None:
    if zip64_limit:  # exercise the zip64 records real >4 GB files need, on small ones
        monkeypatch.setattr(torch_zip, "_ZIP64_LIMIT", zip64_limit)
    torch.save(tricky_state(), tmp_path / "src.pt")
    lazy = read_torch_file(whole(tmp_path / "src.pt"), what="src.pt")
    lazy["in_memory"] = torch.ones(2, 2, dtype=torch.float16)
    with open(tmp_path / "out.pt", "wb") as f:
        f.write(b"x" * 7)  # not at the start of the file, as inside a tar or a .distcp file
        write_torch_file(lazy, OutFile(f, base=7))
    data = (tmp_path / "out.pt").read_bytes()[7:]
    with torch.serialization.safe_globals([io.BytesIO]):  # torch's own names: its safe loader takes them
        back = torch.load(io.BytesIO(data), weights_only=True)
    expected = tricky_state()
    for key in ("bf16", "transposed", "narrowed", "scalar", "tied", "float8"):
        assert same_bits(back[key], expected[key]), key
    assert back["bf16"].data_ptr() == back["tied"].data_ptr()  # tied weights written once, as torch does
    assert torch.equal(back["in_memory"], torch.ones(2, 2, dtype=torch.float16))
    assert back["empty"] is None and back["extra"].getvalue() == b"\x80\x04N."
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    assert names[0] == "archive/data.pkl" and "archive/version" in names
    # Record data 64-byte aligned, as torch writes it (what torch.load(mmap=True) needs).
    (tmp_path / "aligned.pt").write_bytes(data)
    mapped = torch.load(tmp_path / "aligned.pt", mmap=True, weights_only=False)
    assert torch.equal(mapped["bf16"], expected["bf16"])


def test_safetensors_files_agree_with_the_reference_library(tmp_path: Path) -> None:
    tensors = {"a": torch.arange(12, dtype=torch.bfloat16).reshape(3, 4), "b": torch.tensor([1, 2], dtype=torch.int32)}
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"nemo_vocab_ext.config": "{}"})
    ours = read_safetensors(tmp_path / "ref.safetensors")
    assert all(torch.equal(ours.tensors[k], tensors[k]) for k in tensors)

    ckpt = Checkpoint(dict(tensors), {"hidden_size": 4}, DISTRIBUTED)
    save_checkpoint(ckpt, tmp_path / "ours.safetensors", Format.SAFETENSORS)
    with safe_open(str(tmp_path / "ours.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == ["a", "b"]
        assert all(torch.equal(f.get_tensor(k), tensors[k]) for k in tensors)


MB = 2**20
# Every writer of computed (Deferred) entries: torch_dist, the torch.save zip (.nemo and .ckpt), safetensors.
WRITERS = [
    (Format.NEMO, DISTRIBUTED, "out.nemo"),
    (Format.NEMO, SINGLE, "out.nemo"),
    (Format.SAFETENSORS, DISTRIBUTED, "out.safetensors"),
    (Format.CKPT, SINGLE, "out.ckpt"),
]


@pytest.mark.parametrize(("fmt", "layout", "name"), WRITERS)
def test_deferred_entries_are_written_after_everything_else(
    tmp_path: Path, fmt: Format, layout: str, name: str
) -> None:
    """A table still being computed (a resize's) is written last, so its computation overlaps the copy of the
    rest; the entries keep their order. Its rows kept where they lie in another file are copied before
    the computed rows are asked for, and both are written end to end."""
    table = torch.arange(MB // 2, dtype=torch.bfloat16).reshape(-1, 256)
    kept = tmp_path / "source" / "kept.bin"  # a resize's kept rows, as stored in its source
    kept.parent.mkdir()
    kept.write_bytes(b"header" + torch_as_array(table[:100]).tobytes())
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    size_when_asked: list[int] = []

    def compute() -> list[np.ndarray]:
        size_when_asked.append(sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file()))
        return [torch_as_array(table[100:])]  # a resize computes in numpy

    kept_rows = FileRegion(kept, 6, 100 * 256 * 2)
    tensors = {
        "model.embedding.word_embeddings.weight": Deferred(
            tuple(table.shape), dtype_of(table.dtype), compute, ready=[kept_rows]
        ),
        "model.decoder.final_layernorm.weight": torch.ones(MB // 4),
        "model.decoder.layers.0.mlp.linear_fc1.weight": torch.full((MB // 4,), 2.0),
    }
    save_checkpoint(Checkpoint(tensors, {"hidden_size": 256}, layout), out_dir / name, fmt)
    # Both 1 MB entries and the kept rows were already on disk.
    assert size_when_asked and size_when_asked[0] >= 2 * MB + kept_rows.length
    back, _ = load_checkpoint(out_dir / name)
    assert list(back.tensors) == list(tensors)
    assert torch.equal(back.tensors["model.embedding.word_embeddings.weight"], table)
    assert torch.equal(back.tensors["model.decoder.layers.0.mlp.linear_fc1.weight"], torch.full((MB // 4,), 2.0))


def test_a_failed_computation_leaves_no_output(tmp_path: Path) -> None:
    def compute() -> list[np.ndarray]:
        raise ResizeError("the computation failed")

    tensors = {"a": torch.ones(4), "b": Deferred((4,), dtype_of(torch.float32), compute)}
    with pytest.raises(ResizeError, match="the computation failed"):
        save_checkpoint(Checkpoint(tensors, {}, DISTRIBUTED), tmp_path / "out.nemo", Format.NEMO)
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary


@pytest.mark.parametrize(("fmt", "layout", "name"), WRITERS)
def test_a_computation_that_has_failed_stops_the_copy(tmp_path: Path, fmt: Format, layout: str, name: str) -> None:
    """A resize whose work beside the copy has failed (a tokenizer that moves ids) stops the writer at the
    next entry it takes: no waiting for the rest of the copy to learn of the error."""
    read: list[str] = []

    class Watched(Stored):  # an entry that records when a writer reads it
        def __init__(self, key: str):
            self.key, self.shape, self.dtype = key, (4,), dtype_of(torch.float32)

        def load(self) -> torch.Tensor:
            read.append(self.key)
            return torch.ones(4)

    def check() -> None:
        raise ResizeError("the new tokenizer moves base ids")

    work = Beside.start(check)
    while work.failed() is None:
        time.sleep(0.01)
    tensors = {
        "model.embedding.word_embeddings.weight": Deferred(
            (4,), dtype_of(torch.float32), lambda: pytest.fail("values asked of a failed computation")
        ),
        "model.decoder.final_layernorm.weight": Watched("a"),
        "model.decoder.layers.0.mlp.linear_fc1.weight": Watched("b"),
    }
    entries = StopOnFailure(Entries(tensors), work)
    with pytest.raises(ResizeError, match="moves base ids"):
        save_checkpoint(Checkpoint(entries, {"hidden_size": 4}, layout), tmp_path / name, fmt)
    assert read == [] and list(tmp_path.iterdir()) == []


def test_a_computed_tensor_must_match_its_plan(tmp_path: Path) -> None:
    source = tmp_path / "kept.bin"
    source.write_bytes(bytes(8))
    wrong_parts = (
        [np.ones(5, dtype=np.float32)],  # a row too many
        [FileRegion(source, 0, 8), np.ones(3, dtype=np.float32)],  # kept and computed rows overlap
        [np.ones(4, dtype=np.float64)],  # the wrong element type
    )
    for wrong in wrong_parts:
        tensors = {"b": Deferred((4,), dtype_of(torch.float32), lambda w=wrong: w)}
        with pytest.raises(CheckpointFormatError, match=r"^computed (\d+ bytes|float64 values) for a torch.float32"):
            save_checkpoint(Checkpoint(tensors, {}, DISTRIBUTED), tmp_path / "out.safetensors", Format.SAFETENSORS)
    assert list(tmp_path.iterdir()) == [source]


def test_tables_are_mapped_where_they_lie_read_only(tmp_path: Path) -> None:
    """A resize reads a table stored as one region through a read-only mapping of its file (offsets need
    not fall on a page); entries stored otherwise, and regions the file does not hold, are not mapped."""
    table = torch.arange(5000 * 3, dtype=torch.int16).reshape(5000, 3)  # 30,000 bytes: past one page
    stored = Checkpoint({"odd": torch.ones(3, dtype=torch.int8), "t": table}, {}, DISTRIBUTED)
    save_checkpoint(stored, tmp_path / "m.safetensors", Format.SAFETENSORS)
    entry = read_safetensors(tmp_path / "m.safetensors").tensors.stored("t")
    assert entry.raw()[0].offset % 4096  # the header and the 3-byte entry put the table off a page boundary
    mapped = byteio.mapped_array(entry)
    assert mapped is not None and not mapped.flags.writeable and np.array_equal(mapped, table.numpy())

    class TwoRegions(Stored):
        shape, dtype = (2,), dtype_of(torch.int16)

        def raw(self) -> list[FileRegion]:
            return [FileRegion(tmp_path / "m.safetensors", 0, 2), FileRegion(tmp_path / "m.safetensors", 8, 2)]

        def load(self) -> torch.Tensor:
            raise AssertionError("not read")

    assert byteio.mapped_array(TwoRegions()) is None
    with open(tmp_path / "m.safetensors", "r+b") as f:
        f.truncate(entry.raw()[0].offset + 10)
    assert byteio.mapped_array(entry) is None  # read_array then names the truncation


def test_byte_prefix_takes_whole_regions_then_part_of_the_last() -> None:
    a, b = FileRegion(Path("a"), 100, 10), FileRegion(Path("b"), 0, 10)
    assert byteio.byte_prefix([a, b], 15) == [a, FileRegion(Path("b"), 0, 5)]
    assert byteio.byte_prefix([a, b], 10) == [a] and byteio.byte_prefix([a, b], 0) == []
    with pytest.raises(ValueError, match="5 bytes short"):
        byteio.byte_prefix([a, b], 25)


def test_tar_stream_is_a_plain_tar(tmp_path: Path) -> None:
    big = os.urandom(3000)
    with tar_out(tmp_path / "a.tar") as out:
        out.write_bytes("model_config.yaml", b"a: 1\n")
        with out.folder("model_weights").file("data.bin") as f:
            f.write(big[:1000])
            f.write(big[1000:])
    with tarfile.open(tmp_path / "a.tar") as tar:
        names = tar.getnames()
        assert names == [".", "./model_config.yaml", "./model_weights", "./model_weights/data.bin"]
        member = tar.extractfile("./model_weights/data.bin")
        assert member is not None and member.read() == big
    listed = subprocess.run(["tar", "-tvf", str(tmp_path / "a.tar")], capture_output=True, text=True, check=True)
    assert "./model_weights/data.bin" in listed.stdout


@pytest.mark.nemo
def test_dist_tensor_raw_bytes_are_its_c_order_bytes(nemo_models: dict[str, Path]) -> None:
    """NeMo stores stacked decoder layers one chunk per layer: copied back to back, they are the global tensor."""
    from nemo_vocab_ext.formats.torch_dist import DistTensor

    ckpt, _ = load_checkpoint(nemo_models["untied_dist"])
    chunked = [held for key in ckpt.tensors if isinstance(held := ckpt.tensors.stored(key), DistTensor)]
    assert any(len(t.chunks) > 1 for t in chunked)
    for entry in chunked:
        raw = entry.raw()
        assert raw is not None
        assert b"".join(r.read() for r in raw) == entry.load().contiguous().view(torch.uint8).numpy().tobytes()


LARGEST_MB = 32
CONVERT_SCRIPT = """
import resource, sys
from nemo_vocab_ext.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"PEAK_MB {peak:.0f}", file=sys.stderr)
    raise
"""


def peak_mb(args: list[str]) -> float:
    proc = subprocess.run([sys.executable, "-c", CONVERT_SCRIPT, *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return float(proc.stderr.split("PEAK_MB ")[-1].split()[0])


def test_convert_holds_one_tensor_at_a_time(tmp_path: Path) -> None:
    """Eight 32 MB tensors convert .nemo -> safetensors -> .nemo -> .ckpt with well under two of them in memory."""
    rows = LARGEST_MB * 2**20 // (1024 * 4)
    tensors = {f"model.decoder.layers.{i}.mlp.linear_fc1.weight": torch.full((rows, 1024), float(i)) for i in range(8)}
    tensors["model.embedding.word_embeddings.weight"] = torch.zeros(256, 1024)
    save_checkpoint(Checkpoint(tensors, {"hidden_size": 1024}, DISTRIBUTED), tmp_path / "a.nemo", Format.NEMO)
    del tensors
    baseline = peak_mb(["--help"])
    for src, dst in [("a.nemo", "b.safetensors"), ("b.safetensors", "c.nemo"), ("c.nemo", "d.ckpt")]:
        growth = peak_mb(["convert", "--verify", str(tmp_path / src), str(tmp_path / dst)]) - baseline
        assert growth < 2 * LARGEST_MB + 64, f"{src} -> {dst}: peak grew by {growth:.0f} MB"
    back, _ = load_checkpoint(tmp_path / "d.ckpt")
    assert float(back.tensors["model.decoder.layers.7.mlp.linear_fc1.weight"][0, 0]) == 7.0


def test_linked_folder_writes_only_what_changed(tmp_path: Path) -> None:
    """The plugin's resized folder: unchanged tensors are read from the source archive where they lie."""
    from nemo_vocab_ext.formats.nemo import read_nemo, write_nemo_dir

    tensors = {f"model.decoder.layers.{i}.weight": torch.full((256, 256), float(i)) for i in range(4)}
    tensors["model.embedding.word_embeddings.weight"] = torch.zeros(8, 256)
    save_checkpoint(Checkpoint(tensors, {"hidden_size": 256}, DISTRIBUTED), tmp_path / "a.nemo", Format.NEMO)
    source = read_nemo(tmp_path / "a.nemo")
    source.tensors["model.embedding.word_embeddings.weight"] = torch.ones(16, 256)
    write_nemo_dir(source, tmp_path / "out", link_unchanged=True)

    weights = tmp_path / "out" / "model_weights"
    links = [p for p in weights.iterdir() if p.is_symlink()]
    assert [p.resolve() for p in links] == [(tmp_path / "a.nemo").resolve()]
    assert (weights / "__0_0.distcp").stat().st_size < 16 * 256 * 4 + 4096  # the changed table only
    copied = tmp_path / "copied"  # the reader refuses links: read what they point at, copied in their place
    shutil.copytree(tmp_path / "out", copied)
    back = read_nemo(copied)
    assert torch.equal(back.tensors["model.embedding.word_embeddings.weight"], torch.ones(16, 256))
    for i in range(4):
        assert torch.equal(back.tensors[f"model.decoder.layers.{i}.weight"], torch.full((256, 256), float(i)))


@pytest.mark.parametrize("fallocate", ["missing", "refused"])
def test_outputs_are_whole_where_blocks_cannot_be_reserved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fallocate: str
) -> None:
    """Writers reserve a file's blocks before large writes and copies; without fallocate(2), or on a file
    system that refuses it, they write the same bytes."""
    tensors = {"big": torch.arange(MB // 2, dtype=torch.float32), "small": torch.ones(3)}
    save_file(tensors, tmp_path / "src.safetensors", metadata={"nemo_vocab_ext.config": "{}"})
    src, _ = load_checkpoint(tmp_path / "src.safetensors")
    save_checkpoint(src, tmp_path / "reserved.safetensors", Format.SAFETENSORS)
    monkeypatch.setattr(byteio, "_fallocate", lambda: None if fallocate == "missing" else (lambda *_: -1))
    save_checkpoint(src, tmp_path / "plain.safetensors", Format.SAFETENSORS)
    save_checkpoint(src, tmp_path / "plain.nemo", Format.NEMO)
    reserved, plain = ((tmp_path / f"{n}.safetensors").read_bytes() for n in ("reserved", "plain"))
    assert plain == reserved
    back, _ = load_checkpoint(tmp_path / "plain.nemo")
    assert all(torch.equal(back.tensors[k], v) for k, v in tensors.items())
