"""Write a synthetic Megatron indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``, the "mmap" format)
of a requested size, for benchmarking and testing ``nemo_vocab_ext.data_check``.

Everything is streamed in bounded chunks (the token data, and the index arrays, which are
regenerated from a seed on each pass rather than held), so ``--gb 50`` needs no more memory than
``--gb 0.01``. Needs only numpy: no megatron-core or NeMo.

Example::

    python tools/make_indexed_data.py --gb 1 --vocab 57344 --out /tmp/x
    python tools/make_indexed_data.py --gb 0.2 --vocab 50300 --bad 17 --out /tmp/bad
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from nemo_vocab_ext.data_check import DTYPE_CODES, INDEX_MAGIC, INDEX_VERSION

_CODE_BY_NAME = {dt.name: code for code, dt in DTYPE_CODES.items()}
_LENGTH_BATCH = 1 << 18  # document lengths are drawn this many at a time


@dataclass(frozen=True)
class Written:
    prefix: str
    dtype: np.dtype[Any]
    num_tokens: int
    num_documents: int
    bad_positions: tuple[int, ...]  # token offsets of the planted out-of-range ids, sorted


def auto_dtype(vocab_size: int) -> np.dtype[Any]:
    """The dtype megatron's preprocessing picks for this vocab (``DType.optimal_dtype``)."""
    return np.dtype("<u2") if vocab_size < 65500 else np.dtype("<i4")


def _doc_lengths(num_tokens: int, mean_doc_tokens: int, seed: int) -> Iterator[npt.NDArray[np.int64]]:
    """Document lengths summing to exactly ``num_tokens``, deterministic for a seed, so the index
    writer can walk them twice (lengths, then pointers) without holding them."""
    rng = np.random.default_rng([seed, 1])
    high = max(2, 2 * mean_doc_tokens)  # uniform on [1, 2*mean) has mean ~= mean_doc_tokens
    left = num_tokens
    while left > 0:
        lengths = rng.integers(1, high, size=_LENGTH_BATCH, dtype=np.int64)
        ends = np.cumsum(lengths)
        if ends[-1] >= left:
            cut = int(np.searchsorted(ends, left))  # first doc that reaches the end
            lengths = lengths[: cut + 1].copy()
            lengths[-1] -= int(ends[cut]) - left
        left -= int(lengths.sum())
        yield lengths


def write_dataset(
    prefix: str,
    num_tokens: int,
    vocab_size: int,
    *,
    dtype: np.dtype[Any] | None = None,
    mean_doc_tokens: int = 2048,
    bad: int = 0,
    seed: int = 0,
    chunk_bytes: int = 64 * 1024 * 1024,
) -> Written:
    """Write ``num_tokens`` uniform random ids in ``[0, vocab_size)``, one sequence per document (as
    ``preprocess_data_for_megatron.py`` writes without ``--split-sentences``), and plant ``bad``
    ids in ``[vocab_size, vocab_size + 100)`` at random positions."""
    dt = np.dtype(dtype) if dtype is not None else auto_dtype(vocab_size)
    dt = dt.newbyteorder("<")
    if dt.name not in _CODE_BY_NAME:
        raise ValueError(f"dtype {dt.name} is not a Megatron token dtype ({sorted(_CODE_BY_NAME)})")
    if num_tokens < 0 or vocab_size < 1 or mean_doc_tokens < 1 or not 0 <= bad <= num_tokens:
        raise ValueError("need num_tokens >= 0, vocab_size >= 1, mean_doc_tokens >= 1, 0 <= bad <= num_tokens")
    dmax = int(np.iinfo(dt).max)
    if vocab_size - 1 > dmax:
        raise ValueError(f"vocab size {vocab_size} does not fit {dt.name}")
    if bad and vocab_size > dmax:
        raise ValueError(f"cannot plant ids >= {vocab_size} in {dt.name} (max {dmax}); pass a wider dtype")

    rng = np.random.default_rng([seed, 0])
    positions = np.sort(rng.choice(num_tokens, size=bad, replace=False)) if bad else np.empty(0, np.int64)
    planted = rng.integers(vocab_size, min(vocab_size + 100, dmax + 1), size=bad) if bad else positions

    chunk_items = max(1, chunk_bytes // dt.itemsize)
    with open(prefix + ".bin", "wb") as f:
        for start in range(0, num_tokens, chunk_items):
            n = min(chunk_items, num_tokens - start)
            chunk = rng.integers(0, vocab_size, size=n, dtype=dt.newbyteorder("="))
            lo, hi = np.searchsorted(positions, [start, start + n])
            chunk[positions[lo:hi] - start] = planted[lo:hi]
            f.write(chunk.astype(dt, copy=False).tobytes())

    num_docs = sum(int(lengths.size) for lengths in _doc_lengths(num_tokens, mean_doc_tokens, seed))
    with open(prefix + ".idx", "wb") as f:
        f.write(INDEX_MAGIC)
        f.write(INDEX_VERSION.to_bytes(8, "little"))
        f.write(bytes([_CODE_BY_NAME[dt.name]]))
        f.write(num_docs.to_bytes(8, "little"))  # sequences
        f.write((num_docs + 1).to_bytes(8, "little"))  # document boundaries, incl. the leading 0
        f.writelines(lengths.astype("<i4").tobytes() for lengths in _doc_lengths(num_tokens, mean_doc_tokens, seed))
        offset = 0
        for lengths in _doc_lengths(num_tokens, mean_doc_tokens, seed):
            starts = offset + np.cumsum(lengths) - lengths
            f.write((starts * dt.itemsize).astype("<i8").tobytes())
            offset += int(lengths.sum())
        for start in range(0, num_docs + 1, _LENGTH_BATCH):
            f.write(np.arange(start, min(start + _LENGTH_BATCH, num_docs + 1), dtype="<i8").tobytes())
    return Written(prefix, dt, num_tokens, num_docs, tuple(int(p) for p in positions))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--out", required=True, help="output prefix; writes OUT.bin and OUT.idx")
    p.add_argument("--vocab", type=int, required=True, help="ids are drawn from [0, VOCAB)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--gb", type=float, default=1.0, help="size of the .bin in GB of 10**9 bytes (default 1)")
    size.add_argument("--tokens", type=int, help="exact token count instead of --gb")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *sorted(_CODE_BY_NAME)],
        help="token dtype; auto = uint16 below 65500 ids else int32, as megatron picks",
    )
    p.add_argument("--mean-doc-tokens", type=int, default=2048, help="mean document length (default 2048)")
    p.add_argument("--bad", type=int, default=0, help="plant this many ids >= VOCAB at random positions")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    dt = auto_dtype(args.vocab) if args.dtype == "auto" else np.dtype(args.dtype)
    num_tokens = args.tokens if args.tokens is not None else int(args.gb * 1e9) // dt.itemsize
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    try:
        w = write_dataset(
            args.out,
            num_tokens,
            args.vocab,
            dtype=dt,
            mean_doc_tokens=args.mean_doc_tokens,
            bad=args.bad,
            seed=args.seed,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    first = ", ".join(str(x) for x in w.bad_positions[:5])
    print(
        f"wrote {w.prefix}.bin ({w.num_tokens * w.dtype.itemsize:,} bytes, {w.num_tokens:,} {w.dtype.name} tokens, "
        f"{w.num_documents:,} documents) and {w.prefix}.idx; planted {len(w.bad_positions)} ids >= {args.vocab}"
        + (f" (first at tokens {first})" if first else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
