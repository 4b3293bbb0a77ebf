"""Padded vocabulary arithmetic, in one place."""

from __future__ import annotations

import math


def padded_vocab_size(vocab_size: int, divisible_by: int = 128, tensor_parallel: int = 1) -> int:
    """Rows of the embedding table Megatron builds for ``vocab_size`` tokens.

    Megatron pads to a multiple of ``divisible_by * tensor_parallel`` so that every tensor-parallel
    rank holds the same number of rows; the padded size therefore changes with TP.
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if divisible_by < 1 or tensor_parallel < 1:
        raise ValueError(
            f"make_vocab_size_divisible_by and tensor parallel size must be positive, "
            f"got {divisible_by} and {tensor_parallel}"
        )
    multiple = divisible_by * tensor_parallel
    return math.ceil(vocab_size / multiple) * multiple


def tp_row_range(padded_rows: int, tensor_parallel: int, rank: int) -> tuple[int, int]:
    """Global rows ``[start, stop)`` that tensor-parallel ``rank`` holds of a vocab-parallel table."""
    if padded_rows % tensor_parallel:
        raise ValueError(f"{padded_rows} rows cannot be split evenly over {tensor_parallel} ranks")
    if not 0 <= rank < tensor_parallel:
        raise ValueError(f"rank {rank} out of range for tensor parallel size {tensor_parallel}")
    per_rank = padded_rows // tensor_parallel
    return rank * per_rank, (rank + 1) * per_rank
