"""Row-class resize of vocabulary-sized tables: the arithmetic of the plan in :mod:`.rows`.

Tables are numpy arrays of their stored elements (:attr:`.dtypes.DType.numpy`: a bfloat16 table is
its uint16 bits), so a resize reads, computes and writes without importing torch (about 3 s).
Statistics are computed in float64 and rounded once to the table's type, as torch rounds.

Statistics (mean, covariance, median norm) are always over the old real rows of the table being
resized, so an untied output layer uses its own rows, and a tensor-parallel table must be joined first.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from .dtypes import DType
from .rows import Init, RowPlan

_BLOCK_ROWS = 1024  # float64 statistics are taken this many rows at a time: a whole-table copy would be 4x bf16
# fvt sums this many tokens at a time: their float64 sums (512 KB at width 2048) stay in cache while every
# piece position is added in. At 1.3B, blocks of 128 tokens took 1.2x (bf16) to 1.3x (fp32) the CPU time
# of blocks of 32, and blocks of 1024 1.9x the time of 128. The sums do not depend on it.
_FVT_BLOCK_TOKENS = 32
_FVT_DISTINCT_BYTES = 64 << 20  # at most this much float64 for fvt's distinct piece rows, widened once
_BF16_NAN = np.uint16(0x7FC0)  # the quiet NaN torch writes


def _not_floating(dtype: DType) -> ValueError:
    return ValueError(f"cannot compute new rows of a {dtype} table; only floating-point tables are resized")


def widen(values: np.ndarray, dtype: DType, scratch: np.ndarray | None = None) -> np.ndarray:
    """Stored elements of a floating-point ``dtype`` as numpy floats of at least 32 bits (exact).

    ``scratch`` (bytes, at least 4 per element) holds the result when given: a resize widens thousands
    of blocks, and fresh memory for each costs as much in page faults as the arithmetic.
    """
    if dtype.name in ("bfloat16", "float16"):
        wide = (
            np.empty(values.shape, dtype=np.float32)
            if scratch is None
            else scratch[: values.size * 4].view(np.float32).reshape(values.shape)
        )
        if dtype.name == "bfloat16":  # the high half of a float32
            np.left_shift(values, 16, out=wide.view(np.uint32), dtype=np.uint32)
        else:
            wide[...] = values
        return wide
    if dtype.name in ("float32", "float64"):
        return values
    raise _not_floating(dtype)


def from_float64(values: np.ndarray, dtype: DType) -> np.ndarray:
    """float64 ``values`` as ``dtype``'s stored elements, rounded as torch's ``.to(dtype)`` rounds them:
    to float32 first, then (16-bit types) to nearest, ties to even."""
    if dtype.name == "float64":
        return values.astype(np.float64)
    with np.errstate(over="ignore"):  # beyond the type's range is inf, as in torch
        single = values.astype(np.float32)
        if dtype.name == "float16":
            return single.astype(np.float16)
    if dtype.name == "float32":
        return single
    if dtype.name == "bfloat16":
        bits = single.view(np.uint32)
        rounded = ((bits + ((bits >> 16) & 1) + np.uint32(0x7FFF)) >> 16).astype(np.uint16)
        return np.where(np.isnan(single), _BF16_NAN, rounded)
    raise _not_floating(dtype)


def _blocks(rows: np.ndarray, dtype: DType) -> Iterator[np.ndarray]:
    """``rows`` widened, ``_BLOCK_ROWS`` at a time, into one reused buffer: use each block before the next."""
    scratch = np.empty(min(rows.shape[0], _BLOCK_ROWS) * rows[0].size * 4, dtype=np.uint8)
    for start in range(0, rows.shape[0], _BLOCK_ROWS):
        yield widen(rows[start : start + _BLOCK_ROWS], dtype, scratch)


def row_mean(rows: np.ndarray, dtype: DType) -> np.ndarray:
    """The float64 mean of ``rows`` (stored elements of ``dtype``)."""
    total = np.zeros(rows.shape[1], dtype=np.float64)
    for block in _blocks(rows, dtype):
        total += block.sum(axis=0, dtype=np.float64)  # summed in float64 without a float64 copy of the block
    return total / rows.shape[0]


def _scatter(rows: np.ndarray, dtype: DType, mean: np.ndarray) -> np.ndarray:
    """The float64 sum of the outer products of ``rows`` centred on ``mean`` (a covariance times its divisor)."""
    width = rows.shape[1]
    scatter = np.zeros((width, width), dtype=np.float64)
    for block in _blocks(rows, dtype):
        centred = block.astype(np.float64) - mean
        scatter += centred.T @ centred
    return scatter


def _normal_rows(rows: np.ndarray, dtype: DType, count: int, rng: np.random.Generator, mean: np.ndarray) -> np.ndarray:
    """``count`` float64 samples from N(mean, cov) of ``rows``; the mean alone when the covariance is degenerate."""
    width = rows.shape[1]
    cov = _scatter(rows, dtype, mean) / max(rows.shape[0] - 1, 1)
    # A little jitter keeps the Cholesky factor defined when rows are fewer than dimensions.
    jitter = 1e-6 * max(float(cov.diagonal().mean()), 1e-12)
    try:
        factor = np.linalg.cholesky(cov + jitter * np.eye(width))
    except np.linalg.LinAlgError:
        return np.broadcast_to(mean, (count, width))
    return mean + rng.standard_normal((count, width)) @ factor.T


_HF_COVARIANCE_SCALE = 1e-9  # transformers' mean_resizing: the new rows stay within a hair of the mean


def _hf_mean_rows(rows: np.ndarray, dtype: DType, count: int, rng: np.random.Generator, mean: np.ndarray) -> np.ndarray:
    """``count`` float64 samples as transformers' ``resize_token_embeddings(mean_resizing=True)`` draws them:
    N(mean, 1e-9 x the covariance divided by the row count), no jitter; the mean alone when that
    covariance is not positive definite."""
    width = rows.shape[1]
    if rows.shape[0] <= width:  # centred rows span at most rows - 1 dimensions: singular whatever the rounding
        return np.broadcast_to(mean, (count, width))
    try:
        factor = np.linalg.cholesky(_HF_COVARIANCE_SCALE * _scatter(rows, dtype, mean) / rows.shape[0])
    except np.linalg.LinAlgError:
        return np.broadcast_to(mean, (count, width))
    return mean + rng.standard_normal((count, width)) @ factor.T


_SAMPLERS = {Init.NORMAL: _normal_rows, Init.HF_MEAN_RESIZING: _hf_mean_rows}


def _median_norm(rows: np.ndarray, dtype: DType) -> float:
    """The median L2 norm of ``rows``. The median, not the mean: a trained table holds rows that were never
    trained (unused ids, reserved tokens, near zero) and a few frequent tokens' long rows, which move the
    mean of the norms but not their median."""
    norms = [np.sqrt(np.square(block, dtype=np.float64).sum(axis=1)) for block in _blocks(rows, dtype)]
    return float(np.median(np.concatenate(norms)))


def _rescale(rows: np.ndarray, norm: float) -> np.ndarray:
    """Scale each float64 row of ``rows`` in place to L2 norm ``norm``; a zero row has no direction and stays zero."""
    lengths = np.sqrt(np.einsum("ij,ij->i", rows, rows))
    rows *= np.divide(norm, lengths, out=np.ones_like(lengths), where=lengths > 0)[:, None]
    return rows


def _fvt_rows(
    rows: np.ndarray,
    dtype: DType,
    pieces: Sequence[Sequence[int]],
    mean: Callable[[], np.ndarray],
    out: np.ndarray,
    norm: float | None = None,
    workers: int = 1,
) -> int:
    """Fill ``out`` with the mean of each new token's piece rows, stored as ``dtype``; tokens with no
    usable pieces get ``mean()`` (taken only for them: a pass over the whole table). With ``norm``,
    every row is first rescaled to that L2 norm. ``workers`` threads share the blocks of tokens
    (numpy releases the GIL while it gathers and adds). Returns the fallbacks."""
    lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
    ids = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int64, count=int(lengths.sum()))
    starts = np.cumsum(lengths) - lengths  # token i's pieces are ids[starts[i] : starts[i] + lengths[i]]
    owner = np.repeat(np.arange(len(pieces)), lengths)
    out_of_range = np.bincount(owner[(ids < 0) | (ids >= rows.shape[0])], minlength=len(pieces)) > 0
    usable = (lengths > 0) & ~out_of_range
    if not usable.all():
        fallback = mean() if norm is None else _rescale(mean()[None].copy(), norm)[0]
        out[~usable] = from_float64(fallback, dtype)
    tokens = np.flatnonzero(usable)
    # Longest first, so that the tokens with a k-th piece are a prefix for every k: each block of
    # tokens then takes one gather and one add per piece position, not one small op per token.
    tokens = tokens[np.argsort(-lengths[tokens], kind="stable")]
    blocks = [tokens[start : start + _FVT_BLOCK_TOKENS] for start in range(0, len(tokens), _FVT_BLOCK_TOKENS)]
    width = rows.shape[1]
    # A table mapped at an odd offset (an fp32 table in a Megatron run's .distcp) is gathered from as bytes:
    # numpy's take would copy it whole, to align it, on every call (bytes are always aligned).
    source = rows if rows.flags.aligned else rows.view(np.uint8)
    # Few distinct pieces (a new script's tokens split into its bytes and characters: 34 distinct ids in
    # 64,695 pieces at 1.3B) are widened to float64 once, not at every use: fvt then takes 0.75x (bf16)
    # to 0.85x (fp32) the time.
    distinct, where = np.unique(ids, return_inverse=True)
    wide = None
    if distinct.size * 4 <= ids.size and distinct.size * width * 8 <= _FVT_DISTINCT_BYTES:
        picked = np.empty((distinct.size, width), dtype=rows.dtype)
        # Ids out of range (their tokens fall back to the mean) are clipped, and their rows never used.
        np.take(source, distinct, axis=0, out=picked if rows.flags.aligned else picked.view(np.uint8), mode="clip")
        wide = widen(picked, dtype).astype(np.float64)
        ids = where.reshape(-1)

    gather_from = source if wide is None else wide

    def sum_blocks(mine: Sequence[np.ndarray]) -> None:
        # Buffers reused by every block (fresh memory for each would cost page faults).
        block_sums = np.empty((_FVT_BLOCK_TOKENS, width), dtype=np.float64)
        gathered = np.empty((_FVT_BLOCK_TOKENS, width), dtype=rows.dtype if wide is None else np.float64)
        target = gathered if wide is not None or rows.flags.aligned else gathered.view(np.uint8)
        scratch = np.empty(block_sums.size * 4, dtype=np.uint8)
        for chunk in mine:
            counts, first = lengths[chunk], starts[chunk]
            sums = block_sums[: len(chunk)]
            sums.fill(0.0)
            for k in range(int(counts[0])):
                have = int(np.count_nonzero(counts > k))
                # mode="clip": ids are in range (checked above), and "raise" would buffer every gather.
                np.take(gather_from, ids[first[:have] + k], axis=0, out=target[:have], mode="clip")
                # Pieces added in order, in float64.
                sums[:have] += gathered[:have] if wide is not None else widen(gathered[:have], dtype, scratch)
            sums /= counts[:, None]
            if norm is not None:
                _rescale(sums, norm)
            out[chunk] = from_float64(sums, dtype)

    workers = max(1, min(workers, len(blocks)))
    if workers == 1:
        sum_blocks(blocks)
    else:
        with ThreadPoolExecutor(workers) as pool:  # every other block each: the longest tokens come first
            list(pool.map(sum_blocks, [blocks[i::workers] for i in range(workers)]))
    return len(pieces) - len(tokens)


@dataclass
class ResizeStats:
    copied: int = 0
    initialised: int = 0
    padding: int = 0
    fvt_fallbacks: int = 0


def init_rows(
    old_real: np.ndarray,
    out: np.ndarray,
    init: Init,
    *,
    dtype: DType,
    pieces: Sequence[Sequence[int]] | None = None,
    rng: np.random.Generator | None = None,
    mean: Callable[[], np.ndarray] | None = None,
    workers: int = 1,
) -> int:
    """Fill ``out`` (new rows) from the old real rows by ``init``, computed in float64; both hold
    ``dtype``'s stored elements. Returns the FVT fallback count. ``mean``: gives the old rows' float64
    mean (shared with the padding rows, taken once); ``rng``: the sampling inits' draws; ``workers``:
    fvt's threads."""
    count = out.shape[0]
    if count == 0 or init is Init.ZEROS:
        out.fill(0)
        return 0
    if old_real.shape[0] == 0:
        raise ValueError(f"init '{init}' needs old rows to take statistics from; the table has none")
    if mean is None:
        mean = functools.cache(functools.partial(row_mean, old_real, dtype))
    if init is Init.MEAN:
        out[...] = from_float64(mean(), dtype)
        return 0
    if init in _SAMPLERS:
        drawn = _SAMPLERS[init](old_real, dtype, count, rng or np.random.default_rng(0), mean())
        out[...] = from_float64(drawn, dtype)
        return 0
    if init.needs_pieces:
        if pieces is None or len(pieces) != count:
            have = "none" if pieces is None else str(len(pieces))
            raise ValueError(f"{init} needs the old tokenizer's pieces of each of the {count} new tokens, got {have}")
        norm = _median_norm(old_real, dtype) if init is Init.FVT_NORM else None
        return _fvt_rows(old_real, dtype, pieces, mean, out, norm, workers)
    raise ValueError(f"unknown init {init!r}")


def resize_table(table: np.ndarray, plan: RowPlan, init: Init, **options: Any) -> tuple[np.ndarray, ResizeStats]:
    """The resized copy of a full (joined) vocabulary table and what was done to its rows
    (``options``: those of :func:`rows_after_kept`)."""
    tail, stats = rows_after_kept(table, plan, init, **options)
    return np.concatenate([table[: plan.kept], tail]), stats


def rows_after_kept(
    old: np.ndarray,
    plan: RowPlan,
    init: Init,
    *,
    dtype: DType,
    padding_init: Init,
    pieces: Sequence[Sequence[int]] | None = None,
    rng: np.random.Generator | None = None,
    mean: Callable[[], np.ndarray] | None = None,
    workers: int = 1,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, ResizeStats]:
    """Rows ``[plan.kept, plan.new_rows)`` of the resized table (in ``out`` where given), and what was
    done to its rows.

    The resized table is ``old[: plan.kept]`` followed by these rows, so the kept rows need never be
    copied in memory: a writer copies their stored bytes as they lie. ``old`` is the full (joined) old
    table of ``dtype``'s stored elements, only read. ``pieces[i]`` are the old tokenizer's ids for new
    token ``plan.old_vocab + i`` (inits that ``needs_pieces``). ``mean``: gives the old real rows'
    float64 mean where it is already being taken (:func:`mean_is_used`); ``workers``: fvt's threads;
    ``out``: where the rows go (a writer's buffer: the rows are then neither allocated nor copied).
    """
    _check_table(old, plan)
    if padding_init.needs_pieces:
        raise ValueError(f"padding rows have no tokens: padding_init cannot be '{padding_init}'")
    old_real = old[: plan.old_vocab]
    new_count = max(plan.new_vocab - plan.old_vocab, 0)
    pad_count = plan.new_rows - plan.new_vocab
    # At most one pass over the old rows for their mean, which both row classes may use (fvt only
    # for tokens without pieces).
    mean = functools.cache(mean or functools.partial(row_mean, old_real, dtype))
    shape = (plan.new_rows - plan.kept, *old.shape[1:])
    if out is not None and (out.shape != shape or out.dtype != old.dtype):
        raise ValueError(f"expected an output of shape {shape} and dtype {old.dtype}, got {out.shape} {out.dtype}")
    tail = np.empty(shape, dtype=old.dtype) if out is None else out
    fallbacks = init_rows(
        old_real, tail[:new_count], init, dtype=dtype, pieces=pieces, rng=rng, mean=mean, workers=workers
    )
    init_rows(old_real, tail[new_count:], padding_init, dtype=dtype, rng=rng, mean=mean)
    return tail, ResizeStats(plan.kept, new_count, pad_count, fallbacks)


def mean_is_used(plan: RowPlan, init: Init, padding_init: Init) -> bool:
    """Whether :func:`rows_after_kept` takes the old real rows' mean whatever the pieces (fvt takes it
    only for tokens without pieces)."""
    with_mean = (Init.MEAN, *_SAMPLERS)
    return (plan.new_vocab > plan.old_vocab and init in with_mean) or (
        plan.new_rows > plan.new_vocab and padding_init in with_mean
    )


def _check_table(table: np.ndarray, plan: RowPlan) -> None:
    if table.ndim != 2 or table.shape[0] != plan.old_rows:
        raise ValueError(f"expected a table of {plan.old_rows} rows, got shape {tuple(table.shape)}")


def join_vocab_shards(shards: Sequence[np.ndarray]) -> np.ndarray:
    """Join the row blocks of a vocab-parallel table (rank order) into the global table."""
    widths = {tuple(s.shape[1:]) for s in shards}
    if len(widths) != 1:
        raise ValueError(f"vocab shards disagree on their trailing shape: {sorted(widths)}")
    return np.concatenate(list(shards), axis=0)


def split_vocab_rows(table: np.ndarray, tensor_parallel: int) -> list[np.ndarray]:
    """Split a global vocab table into ``tensor_parallel`` contiguous row blocks (rank order), each a copy."""
    if table.shape[0] % tensor_parallel:
        raise ValueError(f"{table.shape[0]} rows cannot be split evenly over {tensor_parallel} ranks")
    return [block.copy() for block in np.split(table, tensor_parallel, axis=0)]
