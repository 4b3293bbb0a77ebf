"""Check Megatron indexed datasets (``.bin``/``.idx``, the "mmap" format) for token ids a tokenizer
does not have.

Continual pretraining with a merged tokenizer fails late and opaquely when the data holds an id
>= the embedding size (a CUDA device-side assert, or silently wrong rows). This module streams the
``.bin`` in bounded chunks and reports every such id up front. Pure numpy: no NeMo or megatron
import, so it runs on a login node.

The ``.idx`` layout (as megatron-core's ``_IndexWriter`` and NeMo's ``MMapIndexedDataset`` write it,
all little-endian)::

    9 bytes   magic  b"MMIDIDX\\x00\\x00"
    u64       version (1)
    u8        dtype code of the token ids in the .bin
    u64       sequence count  N
    u64       document index count  D  (= documents + 1; the first entry is 0)
    i32[N]    sequence lengths, in tokens
    i64[N]    sequence byte offsets into the .bin
    i64[D]    document boundaries, as sequence indices
    i8[N]     sequence modes (multimodal datasets only)
"""

from __future__ import annotations

import contextlib
import mmap
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, Union

import numpy as np
import numpy.typing as npt

from nemo_vocab_ext.errors import DataError

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DTYPE_CODES",
    "HEADER_BYTES",
    "INDEX_MAGIC",
    "INDEX_VERSION",
    "BadToken",
    "DataScan",
    "IndexInfo",
    "read_index",
    "scan_token_ids",
]

PathLike = Union[str, "os.PathLike[str]"]
Progress = Callable[[int, int], None]

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_BYTES = len(INDEX_MAGIC) + 8 + 1 + 8 + 8
DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024

# megatron-core's DType codes for the integer types. Explicit little-endian: the writers use the
# host order, and every host they run on is little-endian.
DTYPE_CODES: dict[int, np.dtype[Any]] = {
    1: np.dtype("<u1"),
    2: np.dtype("<i1"),
    3: np.dtype("<i2"),
    4: np.dtype("<i4"),
    5: np.dtype("<i8"),
    8: np.dtype("<u2"),
}
# Codes 6 and 7 are floats (and megatron-core reads 7 as float32 where NeMo's legacy reader says
# float64), so their itemsize is not even agreed on; neither holds token ids.
_FLOAT_CODES = {6: "float64", 7: "float32/float64"}

_INDEX_CHUNK_ITEMS = 1 << 20  # index arrays are read this many entries at a time
_SLOW_BLOCK_ITEMS = 1 << 20  # a chunk with bad ids is re-examined in blocks this size (bounded temps)


@dataclass(frozen=True)
class IndexInfo:
    """What an ``.idx`` header and arrays say about its ``.bin``. Validated against the ``.bin`` size."""

    prefix: str
    idx_path: str
    bin_path: str
    dtype: np.dtype[Any]
    num_sequences: int
    num_documents: int
    num_tokens: int
    multimodal: bool

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def bin_bytes(self) -> int:
        return self.num_tokens * self.dtype.itemsize

    @property
    def pointers_offset(self) -> int:
        """Byte offset of the i64 sequence pointers inside the ``.idx``."""
        return HEADER_BYTES + 4 * self.num_sequences

    @property
    def document_index_offset(self) -> int:
        """Byte offset of the i64 document boundaries inside the ``.idx``."""
        return HEADER_BYTES + 12 * self.num_sequences


@dataclass(frozen=True)
class BadToken:
    """One out-of-range id. All indices are 0-based; ``token_index`` counts tokens from the start of
    the ``.bin``, ``offset_in_document`` from the start of its document."""

    token_index: int
    token_id: int
    document: int
    sequence: int
    offset_in_document: int


@dataclass(frozen=True)
class DataScan:
    """Result of :func:`scan_token_ids`."""

    index: IndexInfo
    vocab_size: int
    tokens_scanned: int
    max_id: int | None  # None for an empty dataset
    num_out_of_range: int  # ids >= vocab_size
    num_negative: int  # ids < 0 (signed dtypes only); they crash the embedding lookup just the same
    examples: tuple[BadToken, ...]  # the first few offending positions, in file order
    seconds: float

    @property
    def ok(self) -> bool:
        return self.num_out_of_range == 0 and self.num_negative == 0

    @property
    def num_bad(self) -> int:
        return self.num_out_of_range + self.num_negative

    @property
    def bytes_per_second(self) -> float:
        return self.tokens_scanned * self.index.itemsize / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        """One line, e.g. ``data/en: 1,234,567 tokens, max id 50311 >= vocab size 50300 at 17
        positions (first: token 123 in document 4)``."""
        head = f"{self.index.prefix}: {self.tokens_scanned:,} tokens"
        if self.max_id is None:
            return f"{head}, nothing to check"
        if self.ok:
            return (
                f"{head} in {self.index.num_documents:,} documents, "
                f"max id {self.max_id} < vocab size {self.vocab_size}, ok "
                f"({_size(self.index.bin_bytes)} scanned at {self.bytes_per_second / 1e9:.1f} GB/s)"
            )
        parts = []
        if self.num_out_of_range:
            parts.append(
                f"max id {self.max_id} >= vocab size {self.vocab_size} at {_plural(self.num_out_of_range, 'position')}"
            )
        if self.num_negative:
            parts.append(_plural(self.num_negative, "negative id"))
        what = " and ".join(parts)
        first = self.examples[0] if self.examples else None
        where = f" (first: token {first.token_index} in document {first.document})" if first else ""
        return f"{head}, {what}{where}"


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 100_000_000 else f"{nbytes / 1e6:.1f} MB"


def _plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _normalize_prefix(prefix: PathLike) -> str:
    text = os.fspath(prefix)
    # Users often pass one file of the pair; megatron wants the prefix.
    if text.endswith((".bin", ".idx")) and not os.path.exists(text + ".idx"):
        return text[:-4]
    return text


def _read_exact(f: BinaryIO, offset: int, nbytes: int, path: str) -> bytes:
    f.seek(offset)
    data = f.read(nbytes)
    if len(data) != nbytes:
        raise DataError(f"{path}: ends at byte {offset + len(data)}, expected at least {offset + nbytes}")
    return data


def _index_chunks(
    f: BinaryIO, path: str, offset: int, dtype: str, count: int
) -> Iterator[tuple[int, npt.NDArray[Any]]]:
    """Yield (first item, array) over an on-disk array, a bounded number of items at a time."""
    itemsize = np.dtype(dtype).itemsize
    for start in range(0, count, _INDEX_CHUNK_ITEMS):
        n = min(_INDEX_CHUNK_ITEMS, count - start)
        raw = _read_exact(f, offset + start * itemsize, n * itemsize, path)
        yield start, np.frombuffer(raw, dtype=dtype)


def read_index(prefix: PathLike) -> IndexInfo:
    """Read and validate ``prefix.idx`` against ``prefix.bin``.

    Besides the header this makes one bounded-memory pass over the index arrays (about 20 bytes per
    sequence, small next to the ``.bin``) so that the lengths, pointers and document boundaries are
    known to agree before anything is reported in terms of them.

    Raises :class:`~nemo_vocab_ext.errors.DataError` with a one-line message for a missing file,
    bad magic or version, an unknown or non-integer dtype code, an index whose size or arrays are
    inconsistent, or a ``.bin`` whose size does not match the index.
    """
    prefix_s = _normalize_prefix(prefix)
    idx_path, bin_path = prefix_s + ".idx", prefix_s + ".bin"
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise DataError(
                f"{path} not found: expected the .bin/.idx pair that preprocess_data_for_megatron.py "
                f"writes for prefix {prefix_s!r}"
            )
    try:
        with open(idx_path, "rb") as f:
            return _read_index(f, prefix_s, idx_path, bin_path)
    except OSError as e:
        raise DataError(f"cannot read {e.filename or idx_path}: {e.strerror or e}") from e


def _read_index(f: BinaryIO, prefix: str, idx_path: str, bin_path: str) -> IndexInfo:
    idx_bytes = os.fstat(f.fileno()).st_size
    if idx_bytes < HEADER_BYTES:
        raise DataError(f"{idx_path}: {idx_bytes} bytes, too short for a Megatron index header ({HEADER_BYTES})")
    header = _read_exact(f, 0, HEADER_BYTES, idx_path)
    magic = header[: len(INDEX_MAGIC)]
    if magic != INDEX_MAGIC:
        raise DataError(
            f"{idx_path}: bad magic {magic!r} (expected {INDEX_MAGIC!r}); not a Megatron mmap index "
            "(the legacy 'cached'/'lazy' formats are not supported)"
        )
    pos = len(INDEX_MAGIC)
    version = int.from_bytes(header[pos : pos + 8], "little")
    code = header[pos + 8]
    num_seq = int.from_bytes(header[pos + 9 : pos + 17], "little")
    doc_count = int.from_bytes(header[pos + 17 : pos + 25], "little")
    if version != INDEX_VERSION:
        raise DataError(f"{idx_path}: index version {version}, only version {INDEX_VERSION} is known")
    if code in _FLOAT_CODES:
        raise DataError(f"{idx_path}: dtype code {code} ({_FLOAT_CODES[code]}) holds floats, not token ids")
    if code not in DTYPE_CODES:
        raise DataError(f"{idx_path}: unknown dtype code {code} (known: {sorted(DTYPE_CODES)})")
    dtype = DTYPE_CODES[code]

    expected = HEADER_BYTES + 12 * num_seq + 8 * doc_count
    if idx_bytes not in (expected, expected + num_seq):
        raise DataError(
            f"{idx_path}: {idx_bytes:,} bytes, but its header describes {num_seq:,} sequences and "
            f"{doc_count:,} document boundaries ({expected:,} bytes); truncated or corrupt"
        )
    multimodal = num_seq > 0 and idx_bytes == expected + num_seq
    if doc_count < 1:
        raise DataError(f"{idx_path}: no document boundaries (expected at least the leading 0)")

    # Lengths and pointers in lockstep: pointers must be the running byte offset of the lengths.
    sizes_at, ptrs_at = HEADER_BYTES, HEADER_BYTES + 4 * num_seq
    num_tokens = 0
    pointer_error: str | None = None  # raised after the .bin size check, whose message is clearer
    for start, sizes in _index_chunks(f, idx_path, sizes_at, "<i4", num_seq):
        if sizes.size and int(sizes.min()) < 0:
            bad = start + int(np.argmax(sizes < 0))
            raise DataError(f"{idx_path}: sequence {bad} has negative length {int(sizes[bad - start])}")
        ptrs = np.frombuffer(_read_exact(f, ptrs_at + 8 * start, 8 * sizes.size, idx_path), dtype="<i8")
        lengths = sizes.astype(np.int64)
        want = (num_tokens + np.cumsum(lengths) - lengths) * dtype.itemsize
        if pointer_error is None and not np.array_equal(ptrs, want):
            bad = start + int(np.argmax(ptrs != want))
            pointer_error = (
                f"{idx_path}: sequence {bad} points at byte {int(ptrs[bad - start])}, but the lengths "
                f"before it put it at {int(want[bad - start])}; corrupt index"
            )
        num_tokens += int(lengths.sum())

    # Document boundaries: start at 0, never decrease, end at the sequence count (megatron asserts it).
    docs_at, prev = HEADER_BYTES + 12 * num_seq, 0
    for start, bounds in _index_chunks(f, idx_path, docs_at, "<i8", doc_count):
        if start == 0 and int(bounds[0]) != 0:
            raise DataError(f"{idx_path}: document boundaries start at {int(bounds[0])}, not 0; corrupt index")
        steps = np.diff(bounds, prepend=prev)
        if steps.size and int(steps.min()) < 0:
            bad = start + int(np.argmax(steps < 0))
            raise DataError(f"{idx_path}: document boundary {bad} goes backwards; corrupt index")
        prev = int(bounds[-1])
    if prev != num_seq:
        raise DataError(
            f"{idx_path}: last document boundary is {prev:,}, but there are {num_seq:,} sequences; corrupt index"
        )

    bin_bytes = os.path.getsize(bin_path)
    want_bytes = num_tokens * dtype.itemsize
    if bin_bytes != want_bytes:
        raise DataError(
            f"{bin_path}: {bin_bytes:,} bytes, but {idx_path} describes {num_tokens:,} {dtype.name} tokens "
            f"({want_bytes:,} bytes); the pair is mismatched or truncated, re-run preprocessing"
        )
    if pointer_error is not None:
        raise DataError(pointer_error)
    return IndexInfo(
        prefix=prefix,
        idx_path=idx_path,
        bin_path=bin_path,
        dtype=dtype,
        num_sequences=num_seq,
        num_documents=doc_count - 1,
        num_tokens=num_tokens,
        multimodal=multimodal,
    )


class _Tally:
    """Running totals for one scan; the slow path only runs on chunks that hold a bad id."""

    def __init__(self, info: IndexInfo, vocab_size: int, max_examples: int) -> None:
        self.dtype = info.dtype
        self.udtype = np.dtype(f"<u{info.itemsize}")
        bits = 8 * info.itemsize
        # Viewed as unsigned, a negative id becomes >= 2**(bits-1); so one unsigned max() per chunk
        # catches both too-large and negative ids. Capping at 2**(bits-1) keeps that true when the
        # vocab is larger than the dtype's positive range.
        limit = vocab_size if self.dtype.kind == "u" else min(vocab_size, 1 << (bits - 1))
        self.threshold = int(limit)
        self.max_examples = max_examples
        self.max_id: int | None = None
        self.num_out_of_range = 0
        self.num_negative = 0
        self.positions: list[int] = []
        self.values: list[int] = []

    def _seen_max(self, value: int) -> None:
        self.max_id = value if self.max_id is None else max(self.max_id, value)

    def add(self, raw: npt.NDArray[np.uint8], first_token: int) -> None:
        unsigned = raw.view(self.udtype)
        top = int(unsigned.max())
        if top < self.threshold:  # the common case: one vectorised pass, no temporaries
            self._seen_max(top)
            return
        for s in range(0, unsigned.size, _SLOW_BLOCK_ITEMS):
            ublock = unsigned[s : s + _SLOW_BLOCK_ITEMS]
            top = int(ublock.max())
            if top < self.threshold:
                self._seen_max(top)
                continue
            block = ublock.view(self.dtype)
            self._seen_max(int(block.max()))
            bad = np.flatnonzero(ublock >= self.udtype.type(self.threshold))
            negative = int(np.count_nonzero(block < 0)) if self.dtype.kind == "i" else 0
            self.num_negative += negative
            self.num_out_of_range += bad.size - negative
            room = self.max_examples - len(self.positions)
            if room > 0:
                take = bad[:room]
                self.positions.extend((first_token + s + take).tolist())
                self.values.extend(block[take].tolist())


def _advise_sequential(fd: int) -> None:
    # Larger kernel readahead for a cold file; a hint only, so any failure is ignored.
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)


def _scan_windows(info: IndexInfo, window_bytes: int, tally: _Tally, progress: Progress | None) -> int:
    """Map the .bin one window at a time and feed each to the tally; returns bytes scanned.

    Each window is unmapped before the next is mapped: mapping the whole file would leave every
    touched page resident (RSS grows to the file size), and reading into a buffer would add a copy
    (measured ~1.5x-6x slower from page cache). The file size is re-checked per window so a file
    truncated mid-scan gives a DataError rather than a SIGBUS.
    """
    total, itemsize, done = info.bin_bytes, info.itemsize, 0
    granularity = mmap.ALLOCATIONGRANULARITY
    with open(info.bin_path, "rb") as f:
        fd = f.fileno()
        _advise_sequential(fd)
        while done < total:
            nbytes = min(window_bytes, total - done)
            if os.fstat(fd).st_size < total:
                raise DataError(f"{info.bin_path}: shrank below {total:,} bytes during the scan")
            lead = done % granularity  # mmap offsets must be page-aligned; slice the lead off
            with mmap.mmap(fd, lead + nbytes, access=mmap.ACCESS_READ, offset=done - lead) as mm:
                window = np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=lead)
                try:
                    tally.add(window, done // itemsize)
                finally:
                    del window  # release the buffer export, or closing the map raises BufferError
            done += nbytes
            if progress is not None:
                progress(done, total)
    return done


def scan_token_ids(
    prefix: PathLike,
    vocab_size: int,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: Progress | None = None,
    max_examples: int = 5,
) -> DataScan:
    """Stream ``prefix.bin`` and count token ids outside ``[0, vocab_size)``.

    The ``.bin`` is memory-mapped one window of ``chunk_bytes`` (rounded down to whole tokens, so
    no id straddles two windows) at a time and each window is unmapped before the next, so peak
    memory is about one chunk whatever the file size. Each window costs one vectorised ``max()``;
    only windows holding a bad id are examined further.

    ``progress(bytes_done, bytes_total)`` is called after each chunk. ``max_examples`` bounds how
    many offending positions are located (token offset, sequence and document, all 0-based).
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes!r}")
    vocab_size = int(vocab_size)
    info = read_index(prefix)
    window_bytes = max(1, chunk_bytes // info.itemsize) * info.itemsize
    tally = _Tally(info, vocab_size, max_examples)

    started = time.perf_counter()
    try:
        done = _scan_windows(info, window_bytes, tally, progress)
    except OSError as e:
        raise DataError(f"cannot read {info.bin_path}: {e.strerror or e}") from e
    seconds = time.perf_counter() - started

    return DataScan(
        index=info,
        vocab_size=vocab_size,
        tokens_scanned=done // info.itemsize,
        max_id=tally.max_id,
        num_out_of_range=tally.num_out_of_range,
        num_negative=tally.num_negative,
        examples=_locate(info, tally.positions, tally.values),
        seconds=seconds,
    )


def _locate(info: IndexInfo, positions: list[int], values: list[int]) -> tuple[BadToken, ...]:
    """Map token offsets to (sequence, document) by binary search on the on-disk index arrays; only
    the few pages the searches touch are read."""
    if not positions:
        return ()
    pointers = np.memmap(info.idx_path, dtype="<i8", mode="r", offset=info.pointers_offset, shape=(info.num_sequences,))
    bounds = np.memmap(
        info.idx_path, dtype="<i8", mode="r", offset=info.document_index_offset, shape=(info.num_documents + 1,)
    )
    try:
        byte_pos = np.asarray(positions, dtype=np.int64) * info.itemsize
        # side="right" then -1: with empty sequences/documents sharing a start, pick the last one,
        # which is the one that actually holds the token.
        seqs = np.searchsorted(pointers, byte_pos, side="right") - 1
        docs = np.searchsorted(bounds, seqs, side="right") - 1
        doc_starts = pointers[bounds[docs]] // info.itemsize
        return tuple(
            BadToken(
                token_index=int(p),
                token_id=int(v),
                document=int(d),
                sequence=int(s),
                offset_in_document=int(p - start),
            )
            for p, v, d, s, start in zip(positions, values, docs, seqs, doc_starts, strict=True)
        )
    finally:
        del pointers, bounds
