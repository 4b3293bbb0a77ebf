"""Row-class resize of vocabulary-sized tables: the arithmetic of the plan in :mod:`.rows`.

Statistics (mean, covariance) are always over the old real rows of the table being resized, so an
untied output layer uses its own rows, and a tensor-parallel table must be joined first.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .rows import Init, RowPlan

_BLOCK_ROWS = 1024  # float64 statistics are taken this many rows at a time: a whole-table copy would be 4x bf16


def _blocks(rows: torch.Tensor) -> Iterator[torch.Tensor]:
    for start in range(0, rows.shape[0], _BLOCK_ROWS):
        yield rows[start : start + _BLOCK_ROWS].double()


def _row_mean(rows: torch.Tensor) -> torch.Tensor:
    total = torch.zeros(rows.shape[1], dtype=torch.float64, device=rows.device)
    for block in _blocks(rows):
        total += block.sum(dim=0)
    return total / rows.shape[0]


def _normal_rows(rows: torch.Tensor, count: int, generator: torch.Generator | None, mean: torch.Tensor) -> torch.Tensor:
    """``count`` samples from N(mean, cov) of ``rows``; the mean alone when the covariance is degenerate."""
    if count == 0:
        return mean.new_empty((0, rows.shape[1]))
    cov = torch.zeros((rows.shape[1], rows.shape[1]), dtype=torch.float64, device=rows.device)
    for block in _blocks(rows):
        centred = block - mean
        cov += centred.T @ centred
    cov /= max(rows.shape[0] - 1, 1)
    # A little jitter keeps the Cholesky factor defined when rows are fewer than dimensions.
    jitter = 1e-6 * cov.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(cov.shape[0], dtype=cov.dtype)
    factor, info = torch.linalg.cholesky_ex(cov + jitter * eye)
    if int(info) != 0:
        return mean.expand(count, -1).clone()
    noise = torch.randn((count, rows.shape[1]), generator=generator, dtype=torch.float64)
    return mean + noise @ factor.T


def _fvt_rows(
    rows: torch.Tensor, pieces: Sequence[Sequence[int]], mean: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, int]:
    """Mean of each new token's piece rows; tokens with no usable pieces get ``mean``. Returns rows and fallbacks."""
    out = mean.to(dtype).expand(len(pieces), -1).clone()
    limit = rows.shape[0]
    usable = [i for i, ids in enumerate(pieces) if ids and all(0 <= t < limit for t in ids)]
    # One gather and one scatter-add per block of tokens, not one small op per token (7000 at 1.3B);
    # blocks hold about _BLOCK_ROWS piece rows, so the float64 gather stays small.
    blocks: list[list[int]] = [[]]
    held = 0
    for i in usable:
        if blocks[-1] and held + len(pieces[i]) > _BLOCK_ROWS:
            blocks.append([])
            held = 0
        blocks[-1].append(i)
        held += len(pieces[i])
    for tokens in blocks:
        if not tokens:
            continue
        ids = torch.tensor([t for i in tokens for t in pieces[i]], dtype=torch.long)
        owner = torch.tensor([j for j, i in enumerate(tokens) for _ in pieces[i]], dtype=torch.long)
        counts = torch.tensor([len(pieces[i]) for i in tokens], dtype=torch.float64)
        sums = torch.zeros((len(tokens), rows.shape[1]), dtype=torch.float64, device=rows.device)
        sums.index_add_(0, owner, rows[ids].double())
        out[tokens] = (sums / counts[:, None]).to(dtype)
    return out, len(pieces) - len(usable)


@dataclass
class ResizeStats:
    copied: int = 0
    initialised: int = 0
    padding: int = 0
    fvt_fallbacks: int = 0


def init_rows(
    old_real: torch.Tensor,
    count: int,
    init: Init,
    *,
    pieces: Sequence[Sequence[int]] | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    mean: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """``count`` new rows made from the old real rows by ``init``, computed in float64 and returned as
    ``dtype``; also the FVT fallback count. ``mean``: the old rows' float64 mean, if already taken."""
    width = old_real.shape[1]
    if count == 0:
        return torch.zeros((0, width), dtype=dtype, device=old_real.device), 0
    if init is Init.ZEROS:
        return torch.zeros((count, width), dtype=dtype, device=old_real.device), 0
    if old_real.shape[0] == 0:
        raise ValueError(f"init '{init}' needs old rows to take statistics from; the table has none")
    if mean is None:
        mean = _row_mean(old_real)
    if init is Init.MEAN:
        return mean.to(dtype).expand(count, -1).clone(), 0
    if init is Init.NORMAL:
        return _normal_rows(old_real, count, generator, mean).to(dtype), 0
    if init.needs_pieces:
        if pieces is None or len(pieces) != count:
            have = "none" if pieces is None else str(len(pieces))
            raise ValueError(f"{init} needs the old tokenizer's pieces of each of the {count} new tokens, got {have}")
        return _fvt_rows(old_real, pieces, mean, dtype)
    raise ValueError(f"unknown init {init!r}")


def resize_table(
    table: torch.Tensor,
    plan: RowPlan,
    init: Init = Init.ZEROS,
    *,
    padding_init: Init = Init.MEAN,
    pieces: Sequence[Sequence[int]] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, ResizeStats]:
    """Return the resized copy of a full (joined) vocabulary table and what was done to its rows.

    ``pieces[i]`` are the old tokenizer's ids for new token ``plan.old_vocab + i`` (inits that ``needs_pieces``).
    Statistics are computed in float64 and cast once to the table's dtype.
    """
    if table.dim() != 2 or table.shape[0] != plan.old_rows:
        raise ValueError(f"expected a table of {plan.old_rows} rows, got shape {tuple(table.shape)}")
    if padding_init.needs_pieces:
        raise ValueError(f"padding rows have no tokens: padding_init cannot be '{padding_init}'")
    old_real = table[: plan.old_vocab]
    new_count = max(plan.new_vocab - plan.old_vocab, 0)
    pad_count = plan.new_rows - plan.new_vocab
    # Filled in place (no torch.cat of converted copies): the table and its copy are the only large tensors.
    out = torch.empty((plan.new_rows, *table.shape[1:]), dtype=table.dtype, device=table.device)
    out[: plan.kept] = table[: plan.kept]
    # One pass over the old rows for their mean, which both row classes may use.
    wants_mean = any(i is not Init.ZEROS and n for i, n in ((init, new_count), (padding_init, pad_count)))
    mean = _row_mean(old_real) if wants_mean and old_real.shape[0] else None
    new_rows, fallbacks = init_rows(
        old_real, new_count, init, pieces=pieces, generator=generator, dtype=table.dtype, mean=mean
    )
    out[plan.kept : plan.kept + new_count] = new_rows
    del new_rows
    pad_rows, _ = init_rows(old_real, pad_count, padding_init, generator=generator, dtype=table.dtype, mean=mean)
    out[plan.kept + new_count :] = pad_rows
    return out, ResizeStats(plan.kept, new_count, pad_count, fallbacks)


def join_vocab_shards(shards: Sequence[torch.Tensor]) -> torch.Tensor:
    """Join the row blocks of a vocab-parallel table (rank order) into the global table."""
    widths = {tuple(s.shape[1:]) for s in shards}
    if len(widths) != 1:
        raise ValueError(f"vocab shards disagree on their trailing shape: {sorted(widths)}")
    return torch.cat(list(shards), dim=0)


def split_vocab_rows(table: torch.Tensor, tensor_parallel: int) -> list[torch.Tensor]:
    """Split a global vocab table into ``tensor_parallel`` contiguous row blocks (rank order)."""
    if table.shape[0] % tensor_parallel:
        raise ValueError(f"{table.shape[0]} rows cannot be split evenly over {tensor_parallel} ranks")
    return [c.clone() for c in torch.chunk(table, tensor_parallel, dim=0)]
