"""Padded vocabulary arithmetic, in one place."""

from __future__ import annotations

import numbers


def positive_count(value: object, what: str) -> int:
    """``value`` as a count of tokens, rows or ranks: a positive whole number.

    A bool, a float (NaN and infinities included) or a string is refused, not converted: NeMo would
    compute with it as given, or fail later.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{what} must be a positive whole number, got {value!r}")
    return int(value)


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """Rows of the embedding table Megatron builds for ``vocab_size`` tokens.

    Megatron pads to a multiple of ``divisible_by * tensor_parallel`` so that every tensor-parallel
    rank holds the same number of rows; the padded size therefore changes with TP.
    """
    vocab_size = positive_count(vocab_size, "vocab_size")
    multiple = positive_count(divisible_by, "make_vocab_size_divisible_by") * positive_count(
        tensor_parallel, "tensor parallel size"
    )
    return -(-vocab_size // multiple) * multiple  # whole numbers: exact at any size


def tp_row_range(padded_rows: int, tensor_parallel: int, rank: int) -> tuple[int, int]:
    """Global rows ``[start, stop)`` that tensor-parallel ``rank`` holds of a vocab-parallel table."""
    if padded_rows % tensor_parallel:
        raise ValueError(f"{padded_rows} rows cannot be split evenly over {tensor_parallel} ranks")
    if not 0 <= rank < tensor_parallel:
        raise ValueError(f"rank {rank} out of range for tensor parallel size {tensor_parallel}")
    per_rank = padded_rows // tensor_parallel
    return rank * per_rank, (rank + 1) * per_rank
