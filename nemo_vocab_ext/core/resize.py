"""Row-class resize of vocabulary-sized tables.

A table of ``old_rows`` rows that served a tokenizer of ``old_vocab`` tokens becomes a table of
``new_rows`` rows for ``new_vocab`` tokens. Rows fall in four classes:

- ``[0, min(old_vocab, new_vocab))`` old real tokens: copied bit-exact;
- ``[old_vocab, old_rows)`` old padding: trained to mean "never predict me", so never handed to a
  new token; dropped;
- ``[old_vocab, new_vocab)`` new real tokens: filled by the chosen init;
- ``[new_vocab, new_rows)`` new padding: filled by ``padding_init`` (the mean: a zero row gives
  logit 0, which can outweigh real tokens).

Statistics (mean, covariance) are always over the old real rows of the table being resized, so an
untied output layer uses its own rows, and a tensor-parallel table must be joined first.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch


class Init(str, enum.Enum):
    ZEROS = "zeros"
    MEAN = "mean"
    NORMAL = "normal"
    FVT = "fvt"

    def __str__(self) -> str:
        return self.value

    @property
    def needs_pieces(self) -> bool:
        """Whether the init reads each new token's pieces under the old tokenizer."""
        return self is Init.FVT


INIT_DESCRIPTIONS: dict[Init, str] = {
    Init.ZEROS: "zero rows (the seed's behaviour): logit 0 for every new token",
    Init.MEAN: "mean of the old real rows",
    Init.NORMAL: "sample from a normal with the old real rows' mean and covariance",
    Init.FVT: "mean of the rows of the token's pieces under the old tokenizer (fallback: mean)",
}

# What each init costs and gains, measured by tools/quality.py (README, "Which init"): a 4-layer,
# hidden-128 GPT trained on English (2000-token BPE) extended by 1743 Thai tokens; held-out loss
# before training and after 120 steps of English+Thai continual pretraining, mean of two seeds.
INIT_COSTS: dict[Init, str] = {
    Init.ZEROS: "about +0.47 nats of base-language loss at step 0 (37% of probability on new ids); after 120 "
    "mixed steps +0.19 on the base language and 0.26 nats behind fvt on the new one",
    Init.MEAN: "about +0.16 nats of base-language loss at step 0 (14% of probability on new ids); after 120 "
    "mixed steps +0.10 on the base language and 0.08 nats behind fvt on the new one",
    Init.NORMAL: "about +0.60 nats of base-language loss at step 0 (44% of probability on new ids); after 120 "
    "mixed steps +0.18 on the base language and 0.10 nats behind fvt on the new one",
    Init.FVT: "about +0.02 nats of base-language loss at step 0 (1% of probability on new ids); after 120 mixed "
    "steps +0.05 on the base language and the best on the new one (0.26 nats ahead of zeros)",
}


class ShrinkRefusedError(ValueError):
    """The new table would drop trained rows."""


@dataclass(frozen=True)
class RowClass:
    name: str
    start: int
    stop: int
    action: str

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class RowPlan:
    """How each row of the new table is made. ``old_vocab`` is None when the old tokenizer is unknown."""

    old_vocab: int
    old_rows: int
    new_vocab: int
    new_rows: int

    @property
    def kept(self) -> int:
        return min(self.old_vocab, self.new_vocab)

    def classes(self, init: Init = Init.ZEROS, padding_init: Init = Init.MEAN) -> list[RowClass]:
        out = [RowClass("old tokens", 0, self.kept, "copied bit-exact")]
        if self.old_rows > self.old_vocab:
            out.append(RowClass("old padding (dropped)", self.old_vocab, self.old_rows, "not carried over"))
        if self.old_vocab > self.new_vocab:
            out.append(RowClass("old tokens dropped", self.new_vocab, self.old_vocab, "removed (shrink)"))
        if self.new_vocab > self.old_vocab:
            out.append(RowClass("new tokens", self.old_vocab, self.new_vocab, str(init)))
        if self.new_rows > self.new_vocab:
            out.append(RowClass("new padding", self.new_vocab, self.new_rows, str(padding_init)))
        return out


def plan_rows(
    old_vocab: int | None, old_rows: int, new_vocab: int, new_rows: int, *, allow_shrink: bool = False
) -> RowPlan:
    """Validate sizes and return the row plan. An unknown old tokenizer treats every stored row as real."""
    if old_vocab is None:
        old_vocab = old_rows
    if old_vocab > old_rows:
        raise ValueError(f"the old tokenizer has {old_vocab} tokens but the table only {old_rows} rows")
    if new_vocab > new_rows:
        raise ValueError(f"{new_vocab} tokens do not fit in {new_rows} rows")
    if new_vocab < old_vocab and not allow_shrink:
        raise ShrinkRefusedError(
            f"the new vocabulary ({new_vocab} tokens) is smaller than the trained one ({old_vocab}): "
            f"{old_vocab - new_vocab} trained rows would be dropped"
        )
    return RowPlan(old_vocab, old_rows, new_vocab, new_rows)


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
