"""Tests for nemo_vocab_ext.data_check against datasets written by megatron-core's own builder, and
for tools/make_indexed_data.py against megatron-core's own reader."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from nemo_vocab_ext.data_check import (
    HEADER_BYTES,
    BadToken,
    DataScan,
    read_index,
    scan_token_ids,
)
from nemo_vocab_ext.errors import DataError, VocabExtError

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "make_indexed_data.py"


@pytest.fixture(scope="module")
def mcore() -> ModuleType:
    # Importing megatron-core takes a while; once per module.
    return pytest.importorskip("megatron.core.datasets.indexed_dataset")


@pytest.fixture(scope="module")
def tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_indexed_data", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while the class is created
    spec.loader.exec_module(module)
    return module


def build(mcore: ModuleType, prefix: Path, docs: list[list[list[int]]], dtype: Any, multimodal: bool = False) -> str:
    """Write docs (each a list of sequences of ids) with megatron-core's IndexedDatasetBuilder."""
    import torch

    builder = mcore.IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype, multimodal=multimodal)
    for doc in docs:
        for seq in doc:
            builder.add_item(torch.tensor(seq, dtype=torch.int64))
        builder.end_document()
    builder.finalize(str(prefix) + ".idx")
    return str(prefix)


def random_docs(rng: np.random.Generator, n_docs: int, vocab: int, max_len: int = 300) -> list[list[list[int]]]:
    docs = []
    for _ in range(n_docs):
        n_seq = int(rng.integers(1, 4))
        docs.append([rng.integers(0, vocab, size=int(rng.integers(1, max_len))).tolist() for _ in range(n_seq)])
    return docs


def flat(docs: list[list[list[int]]]) -> np.ndarray:
    return np.array([t for doc in docs for seq in doc for t in seq], dtype=np.int64)


def where_is(docs: list[list[list[int]]], token: int) -> tuple[int, int, int]:
    """(document, sequence, offset in document) of a flat token offset, the slow obvious way."""
    seen, seq_no = 0, 0
    for d, doc in enumerate(docs):
        doc_start = seen
        for seq in doc:
            if token < seen + len(seq):
                return d, seq_no, token - doc_start
            seen += len(seq)
            seq_no += 1
    raise AssertionError(token)


# --- clean data, planted ids ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_clean_dataset_is_ok(mcore: ModuleType, tmp_path: Path, dtype: Any) -> None:
    rng = np.random.default_rng(0)
    docs = random_docs(rng, 20, 50300)
    prefix = build(mcore, tmp_path / "clean", docs, dtype)
    tokens = flat(docs)

    info = read_index(prefix)
    assert info.dtype == np.dtype(dtype)
    assert info.num_documents == 20
    assert info.num_sequences == sum(len(d) for d in docs)
    assert info.num_tokens == tokens.size
    assert not info.multimodal

    scan = scan_token_ids(prefix, 50300)
    assert scan.ok and scan.num_bad == 0 and scan.examples == ()
    assert scan.max_id == int(tokens.max())
    assert scan.tokens_scanned == tokens.size
    assert scan.summary().startswith(
        f"{prefix}: {tokens.size:,} tokens in 20 documents, max id {int(tokens.max())} < vocab size 50300, ok ("
    )
    # The same data against a tokenizer one id too small is not ok.
    tight = scan_token_ids(prefix, int(tokens.max()))
    assert not tight.ok and tight.num_out_of_range == int(np.count_nonzero(tokens == tokens.max()))


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_planted_ids_exact_counts_and_positions(mcore: ModuleType, tmp_path: Path, dtype: Any) -> None:
    rng = np.random.default_rng(1)
    vocab = 50300
    docs = random_docs(rng, 30, vocab)
    tokens = flat(docs)
    planted = sorted(rng.choice(tokens.size, size=17, replace=False).tolist())
    values = {p: vocab + int(rng.integers(0, 12)) for p in planted}
    # Write the planted ids into the nested docs.
    cursor = 0
    for doc in docs:
        for seq in doc:
            for i in range(len(seq)):
                if cursor in values:
                    seq[i] = values[cursor]
                cursor += 1
    prefix = build(mcore, tmp_path / "bad", docs, dtype)

    scan = scan_token_ids(prefix, vocab, max_examples=100)
    assert not scan.ok
    assert scan.num_out_of_range == 17 and scan.num_negative == 0
    assert scan.max_id == max(values.values())
    expected = tuple(BadToken(p, values[p], *where_is(docs, p)) for p in planted)
    assert scan.examples == expected

    few = scan_token_ids(prefix, vocab)  # default keeps the first 5
    assert few.examples == expected[:5] and few.num_out_of_range == 17
    first = expected[0]
    assert few.summary() == (
        f"{prefix}: {tokens.size:,} tokens, max id {max(values.values())} >= vocab size {vocab} "
        f"at 17 positions (first: token {first.token_index} in document {first.document})"
    )


def test_negative_ids_are_reported(mcore: ModuleType, tmp_path: Path) -> None:
    docs = [[[1, 2, 3]], [[4, -1, 5], [60000, 7]], [[-7]]]
    prefix = build(mcore, tmp_path / "neg", docs, np.int32)
    scan = scan_token_ids(prefix, 50000)
    assert (scan.num_negative, scan.num_out_of_range, scan.max_id) == (2, 1, 60000)
    assert [(b.token_index, b.token_id, b.document, b.sequence, b.offset_in_document) for b in scan.examples] == [
        (4, -1, 1, 1, 1),
        (6, 60000, 1, 2, 3),
        (8, -7, 2, 3, 0),
    ]
    assert scan.summary().endswith(
        "9 tokens, max id 60000 >= vocab size 50000 at 1 position and 2 negative ids (first: token 4 in document 1)"
    )


def test_negative_ids_when_vocab_exceeds_signed_range(mcore: ModuleType, tmp_path: Path) -> None:
    # int16 viewed as uint16: -30000 -> 35536, below a 40000 vocab; must still be caught.
    prefix = build(mcore, tmp_path / "i16", [[[1, -30000, 32767]]], np.int16)
    scan = scan_token_ids(prefix, 40000)
    assert (scan.num_negative, scan.num_out_of_range, scan.max_id) == (1, 0, 32767)
    assert scan.examples[0].token_id == -30000


def test_empty_documents_and_sequences_map_to_the_right_document(mcore: ModuleType, tmp_path: Path) -> None:
    docs: list[list[list[int]]] = [[], [[], [5, 99]], [], [[]], [[99]]]
    prefix = build(mcore, tmp_path / "empty_parts", docs, np.uint16)
    scan = scan_token_ids(prefix, 10)
    assert [(b.token_index, b.document, b.sequence, b.offset_in_document) for b in scan.examples] == [
        (1, 1, 1, 1),
        (2, 4, 3, 0),
    ]


def test_empty_dataset(mcore: ModuleType, tmp_path: Path) -> None:
    prefix = build(mcore, tmp_path / "nothing", [], np.uint16)
    scan = scan_token_ids(prefix, 10)
    assert scan.ok and scan.max_id is None and scan.tokens_scanned == 0
    assert scan.summary() == f"{prefix}: 0 tokens, nothing to check"


def test_multimodal_index_is_read(mcore: ModuleType, tmp_path: Path) -> None:
    prefix = build(mcore, tmp_path / "mm", [[[1, 2], [3]], [[4]]], np.int32, multimodal=True)
    info = read_index(prefix)
    assert info.multimodal and info.num_tokens == 4 and info.num_documents == 2
    assert scan_token_ids(prefix, 4).examples[0].token_index == 3


def test_prefix_may_name_either_file(mcore: ModuleType, tmp_path: Path) -> None:
    prefix = build(mcore, tmp_path / "named", [[[1, 2, 3]]], np.uint16)
    assert read_index(prefix + ".bin").prefix == prefix
    assert read_index(Path(prefix + ".idx")).prefix == prefix


# --- chunking ---------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_bytes", [1, 3, 4, 6, 7, 13, 4096 + 2, 1 << 30])
@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_chunk_boundaries(mcore: ModuleType, tmp_path: Path, chunk_bytes: int, dtype: Any) -> None:
    """Bad ids at and around every boundary of tiny, odd-sized chunks give the same answer."""
    vocab = 1000
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, vocab, size=997)
    itemsize = np.dtype(dtype).itemsize
    per_chunk = max(1, chunk_bytes // itemsize)
    planted = sorted({p for k in range(1, 6) for p in (k * per_chunk - 1, k * per_chunk) if p < tokens.size} | {996})
    tokens[planted] = vocab + np.arange(len(planted))
    docs = [[tokens[i : i + 100].tolist()] for i in range(0, tokens.size, 100)]
    prefix = build(mcore, tmp_path / "chunks", docs, dtype)

    calls: list[tuple[int, int]] = []
    scan = scan_token_ids(
        prefix, vocab, chunk_bytes=chunk_bytes, max_examples=1000, progress=lambda d, t: calls.append((d, t))
    )
    assert scan.num_out_of_range == len(planted)
    assert [b.token_index for b in scan.examples] == planted
    assert [b.token_id for b in scan.examples] == tokens[planted].tolist()
    assert [b.document for b in scan.examples] == [p // 100 for p in planted]
    assert scan.max_id == int(tokens.max()) and scan.tokens_scanned == tokens.size
    total = tokens.size * itemsize
    assert calls[-1] == (total, total)
    assert len(calls) == -(-tokens.size // per_chunk)
    assert all(a[0] < b[0] for a, b in itertools.pairwise(calls))


# --- corrupt input ----------------------------------------------------------------------------


@pytest.fixture()
def good(mcore: ModuleType, tmp_path: Path) -> str:
    return build(mcore, tmp_path / "good", [[[1, 2, 3], [4]], [[5, 6]]], np.int32)


def _patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_missing_files(good: str) -> None:
    os.remove(good + ".bin")
    with pytest.raises(DataError, match=r"good\.bin not found"):
        read_index(good)
    os.remove(good + ".idx")
    with pytest.raises(DataError, match=r"good\.idx not found"):
        scan_token_ids(good, 10)


def test_bad_magic(good: str) -> None:
    _patch(good + ".idx", 0, b"TNTIDX\x00\x00\x00")
    with pytest.raises(DataError, match="bad magic"):
        read_index(good)


def test_bad_version(good: str) -> None:
    _patch(good + ".idx", 9, (2).to_bytes(8, "little"))
    with pytest.raises(DataError, match="index version 2"):
        read_index(good)


@pytest.mark.parametrize("code, message", [(0, "unknown dtype code 0"), (9, "unknown dtype code 9"), (7, "floats")])
def test_bad_dtype_code(good: str, code: int, message: str) -> None:
    _patch(good + ".idx", 17, bytes([code]))
    with pytest.raises(DataError, match=message):
        read_index(good)


def test_bin_size_mismatch(good: str) -> None:
    with open(good + ".bin", "ab") as f:
        f.write(b"\0" * 4)
    with pytest.raises(DataError, match=r"good\.bin: 28 bytes, but .* describes 6 int32 tokens \(24 bytes\)"):
        read_index(good)
    os.truncate(good + ".bin", 10)
    with pytest.raises(DataError, match="mismatched or truncated"):
        scan_token_ids(good, 10)


def test_index_wrong_dtype_for_bin(good: str) -> None:
    # An int32 .bin described as uint16 is the classic mismatched pair.
    _patch(good + ".idx", 17, bytes([8]))
    with pytest.raises(DataError, match="describes 6 uint16 tokens"):
        read_index(good)


def test_truncated_index(good: str) -> None:
    size = os.path.getsize(good + ".idx")
    os.truncate(good + ".idx", size - 3)
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_index(good)
    os.truncate(good + ".idx", 20)
    with pytest.raises(DataError, match="too short"):
        read_index(good)


def test_inconsistent_index_arrays(good: str) -> None:
    n = 3  # sequences
    _patch(good + ".idx", HEADER_BYTES + 4 * n + 8 * 2, (99).to_bytes(8, "little"))  # pointer of sequence 2
    with pytest.raises(DataError, match="sequence 2 points at byte 99"):
        read_index(good)


def test_document_boundaries_checked(good: str) -> None:
    n = 3
    _patch(good + ".idx", HEADER_BYTES + 12 * n + 8 * 2, (2).to_bytes(8, "little"))  # last boundary 3 -> 2
    with pytest.raises(DataError, match="last document boundary is 2"):
        read_index(good)


def test_errors_are_vocab_ext_errors() -> None:
    assert issubclass(DataError, VocabExtError)


def test_bad_arguments(good: str) -> None:
    with pytest.raises(ValueError):
        scan_token_ids(good, 0)
    with pytest.raises(ValueError):
        scan_token_ids(good, 10, chunk_bytes=0)


# --- the synthetic-data tool ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_tool_output_reads_back_in_megatron(mcore: ModuleType, tool: ModuleType, tmp_path: Path, dtype: Any) -> None:
    prefix = str(tmp_path / "synth")
    w = tool.write_dataset(
        prefix, 100_003, 57344, dtype=np.dtype(dtype), mean_doc_tokens=300, bad=9, seed=3, chunk_bytes=4096 + 2
    )
    ds = mcore.IndexedDataset(prefix)
    assert ds.index.dtype == dtype
    assert len(ds) == w.num_documents and ds.document_indices.tolist() == list(range(w.num_documents + 1))
    data = np.concatenate([ds[i] for i in range(len(ds))]).astype(np.int64)
    assert data.size == 100_003
    bad = np.flatnonzero(data >= 57344)
    assert bad.tolist() == list(w.bad_positions) and len(bad) == 9
    assert data.min() >= 0 and data.max() < 57344 + 100

    scan = scan_token_ids(prefix, 57344, max_examples=9)
    assert scan.num_out_of_range == 9 and [b.token_index for b in scan.examples] == list(w.bad_positions)
    assert scan.index.num_documents == w.num_documents
    lengths = ds.sequence_lengths
    for b in scan.examples:
        assert int(np.searchsorted(np.cumsum(lengths), b.token_index, side="right")) == b.document


def test_tool_index_spans_several_length_batches(mcore: ModuleType, tool: ModuleType, tmp_path: Path) -> None:
    # More documents than one batch of drawn lengths, so the index is written across batches.
    prefix = str(tmp_path / "many_docs")
    w = tool.write_dataset(prefix, 700_001, 100, mean_doc_tokens=1, seed=5)  # every doc 1 token
    assert w.num_documents > 2 * tool._LENGTH_BATCH
    ds = mcore.IndexedDataset(prefix)
    assert len(ds) == w.num_documents and int(ds.sequence_lengths.sum()) == 700_001
    assert np.array_equal(ds.document_indices, np.arange(w.num_documents + 1))
    assert read_index(prefix).num_documents == w.num_documents


def test_tool_cli(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "cli"
    run = subprocess.run(
        [sys.executable, str(TOOL), "--tokens", "5000", "--vocab", "70000", "--out", str(out), "--bad", "2"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "5,000 int32 tokens" in run.stdout and "planted 2 ids >= 70000" in run.stdout
    info = read_index(out)
    assert info.dtype == np.int32 and info.num_tokens == 5000
    assert scan_token_ids(out, 70000).num_out_of_range == 2

    refused = subprocess.run(
        [
            sys.executable,
            str(TOOL),
            "--tokens",
            "10",
            "--vocab",
            "65536",
            "--dtype",
            "uint16",
            "--bad",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert refused.returncode == 2 and "cannot plant" in refused.stderr


# --- memory -----------------------------------------------------------------------------------

# ru_maxrss survives execve: a subprocess of pytest starts with pytest's own peak (hundreds of MB
# after importing megatron), which would hide any growth. A child forked inside the probe starts a
# fresh count from the probe's small footprint, so the probe measures there.
_RSS_PROBE = """
import json, os, resource, sys
import numpy as np
from nemo_vocab_ext.data_check import read_index, scan_token_ids

def peak_kb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

prefix, vocab, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
read_index(prefix)  # warm up imports and code paths before the baseline
pid = os.fork()
if pid == 0:
    before = peak_kb()
    result = {}
    if mode == "scan":
        scan = scan_token_ids(prefix, vocab)
        result = {"bad": scan.num_out_of_range, "tokens": scan.tokens_scanned}
    else:  # control: what mapping the whole file costs
        np.memmap(prefix + ".bin", dtype=np.uint16, mode="r").max()
    result["growth_kb"] = peak_kb() - before
    print(json.dumps(result), flush=True)
    os._exit(0)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _rss_growth_mb(prefix: str, vocab: int, mode: str) -> tuple[float, dict[str, int]]:
    run = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, prefix, str(vocab), mode], capture_output=True, text=True, check=True
    )
    result = json.loads(run.stdout)
    return result["growth_kb"] / 1024, result


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux; needs os.fork")
def test_scan_memory_is_bounded_by_the_chunk(tool: ModuleType, tmp_path: Path) -> None:
    """A 200 MB scan at the default 64 MiB chunk grows peak RSS by well under the file size."""
    prefix = str(tmp_path / "big")
    num_tokens = 100_000_000  # 200 MB of uint16
    w = tool.write_dataset(prefix, num_tokens, 50000, bad=3, seed=4)
    assert os.path.getsize(prefix + ".bin") == 200_000_000

    growth_mb, result = _rss_growth_mb(prefix, 50000, "scan")
    assert result["tokens"] == num_tokens and result["bad"] == len(w.bad_positions) == 3
    assert growth_mb < 100, f"peak RSS grew {growth_mb:.0f} MB scanning a 200 MB file"
    # The measurement can see a whole-file mapping, so the bound above means something.
    control_mb, _ = _rss_growth_mb(prefix, 50000, "control")
    assert control_mb > 150, f"control mapping grew peak RSS by only {control_mb:.0f} MB"


def test_datascan_is_plain_data(good: str) -> None:
    scan = scan_token_ids(good, 10)
    assert isinstance(scan, DataScan) and scan.bytes_per_second >= 0
