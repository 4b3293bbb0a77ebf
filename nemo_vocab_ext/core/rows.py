"""Row classes of a vocabulary resize, and the inits that fill new rows: pure planning, no torch.

A table of ``old_rows`` rows that served a tokenizer of ``old_vocab`` tokens becomes a table of
``new_rows`` rows for ``new_vocab`` tokens. Rows fall in four classes:

- ``[0, min(old_vocab, new_vocab))`` old real tokens: copied bit-exact;
- ``[old_vocab, old_rows)`` old padding: trained to mean "never predict me", so never handed to a
  new token; dropped;
- ``[old_vocab, new_vocab)`` new real tokens: filled by the chosen init;
- ``[new_vocab, new_rows)`` new padding: filled by ``padding_init`` (the mean: a zero row gives
  logit 0, which can outweigh real tokens).

:mod:`.resize` does the arithmetic.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Init(str, enum.Enum):
    ZEROS = "zeros"
    MEAN = "mean"
    NORMAL = "normal"
    FVT = "fvt"
    FVT_NORM = "fvt-norm"
    HF_MEAN_RESIZING = "hf-mean"

    def __str__(self) -> str:
        return self.value

    @property
    def needs_pieces(self) -> bool:
        """Whether the init reads each new token's pieces under the old tokenizer."""
        return self in (Init.FVT, Init.FVT_NORM)


INIT_DESCRIPTIONS: dict[Init, str] = {
    Init.ZEROS: "zero rows (the seed's behaviour): logit 0 for every new token",
    Init.MEAN: "mean of the old real rows",
    Init.NORMAL: "sample from a normal with the old real rows' mean and covariance",
    Init.FVT: "mean of the rows of the token's pieces under the old tokenizer (fallback: mean)",
    Init.FVT_NORM: "fvt's row rescaled to the median L2 norm of the old real rows (fallback: the mean, rescaled)",
    Init.HF_MEAN_RESIZING: "transformers' mean_resizing: sample from a normal with the old real rows' mean and "
    "1e-9 x their covariance (the mean when that is not positive definite)",
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
