"""One resize, whichever entry point runs it: the CLI (``resize_job``) and the NeMo plugin.

Both prepare it the same way: the fvt precondition, the plan, then once per resize (whatever the
number of tables) the check that the new tokenizer keeps the old one's ids and fvt's pieces of each
new token. They differ only in how they obtain the tokenizers and where they write.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .beside import Beside
from .checkpoint import Checkpoint
from .core.dtypes import DType
from .entries import Deferred, Entries, Region, Stored, held
from .errors import ResizeError, TokenizerError
from .formats.byteio import byte_prefix
from .options import ResizeOptions
from .vocab import (
    OPTIMIZER_MASTER,
    OPTIMIZER_MOMENTS,
    ResizePlan,
    TensorResize,
    apply_resize,
    check_tokenizer_fits,
    divisible_by_of,
    plan_resize,
    resize_report,
    resized_tables,
    same_table,
    start_row_means,
    tensor_parallel_of,
    vocab_table_shapes,
    vocab_tables,
    with_tables,
)

if TYPE_CHECKING:
    import torch

    from .tokenization.load import TokenizerInfo


@dataclass(frozen=True)
class Wording:
    """How an entry point names its settings in the errors of a resize."""

    init_setting: str  # followed by the init's name: '--init ' or 'vocab_extension.init='
    new_tokenizer: str  # the new tokenizer, as fvt needs it
    without_pieces: str  # how to resize without both tokenizers
    shrink_hint: str  # how to allow dropping trained rows
    tokenizer_name: str  # the new tokenizer in the id check's error


def with_padding_of(
    options: ResizeOptions, config: dict[str, Any], *, tensor_parallel: int | None, divisible_by: int | None
) -> ResizeOptions:
    """``options`` padding for ``tensor_parallel`` and ``divisible_by`` where given, else for the model
    config's (else the defaults)."""
    return replace(
        options,
        tensor_parallel=tensor_parallel or tensor_parallel_of(config),
        divisible_by=divisible_by or divisible_by_of(config),
    )


def prepare_resize(
    ckpt: Checkpoint,
    old_vocab: int | None,
    new_vocab: int,
    *,
    has_new_tokenizer: bool,
    options: ResizeOptions,
    wording: Wording,
) -> ResizePlan:
    """The plan of a resize to a tokenizer of ``new_vocab`` tokens from one of ``old_vocab`` (None: the
    checkpoint carries none), once fvt's precondition holds. Nothing is read but sizes: the
    tokenizers are checked, and the pieces taken, by :func:`checked_pieces`."""
    init = options.init
    if init.needs_pieces and (old_vocab is None or not has_new_tokenizer):
        raise TokenizerError(
            f"{wording.init_setting}{init} needs the checkpoint's own tokenizer and {wording.new_tokenizer}; "
            f"{wording.without_pieces}"
        )
    return plan_resize(
        ckpt,
        old_vocab,
        new_vocab,
        tensor_parallel=options.tensor_parallel,
        divisible_by=options.divisible_by,
        init=init,
        padding_init=options.padding_init,
        allow_shrink=options.allow_shrink,
        shrink_hint=wording.shrink_hint,
    )


def checked_pieces(
    plan: ResizePlan, own: TokenizerInfo | None, new: TokenizerInfo | None, wording: Wording
) -> list[list[int]] | None:
    """Check, once per resize, that the new tokenizer keeps the old one's ids; with an init that needs
    them, fvt's pieces of each new token under the old tokenizer (None otherwise)."""
    from .tokenization.pieces import pieces_under

    if own is None or new is None:
        return None
    check_tokenizer_fits(own, new, wording.tokenizer_name)
    if plan.init.needs_pieces and plan.new_vocab > plan.rows.old_vocab:
        return pieces_under(own, new, range(plan.rows.old_vocab, plan.new_vocab))
    return None


def read_tokenizers(own: Path | None, new: Path | None) -> tuple[TokenizerInfo | None, TokenizerInfo | None]:
    """The checkpoint's own tokenizer (its files, written out) and the new one, read whole; the new one
    is read even alone: that checks it."""
    from .tokenization.load import load_tokenizer

    if new is None:
        return None, None
    new_tokenizer = load_tokenizer(new)  # first: the user's file, named first when both are broken
    return (load_tokenizer(own) if own is not None else None), new_tokenizer


def resize_while_writing(
    ckpt: Checkpoint,
    plan: ResizePlan,
    tokenizers: tuple[Path | None, Path | None],
    wording: Wording,
    seed: int,
    workers: int = 1,
) -> tuple[Checkpoint, Callable[[], list[TensorResize]]]:
    """:func:`~.vocab.apply_resize` with the tokenizers (files ``tokenizers``: own, new) read and checked
    and the new rows computed beside the caller (:class:`~.beside.Beside`) while it writes the result.
    The tables are :class:`~.entries.Deferred` entries, which writers take last, so the
    computation overlaps the copy of everything else; their kept rows are copied from the file where
    they lie, the computed rows come back through the work's output buffer, each table's as soon as it
    is computed (an untied folder's first shard, with the embedding, is written while the output
    layer's rows are computed and its shard copied). A writer that takes an
    entry once the work has failed gets its error (the copy stops there); the tables raise it when
    awaited. The second value waits for the work and returns what was done (or raises its error).

    Checkpoints whose resize touches more than the tables (optimizer state, per-rank files) are resized
    before returning, as by :func:`~.vocab.apply_resize`.
    """
    follows = any(
        p + k in ckpt.tensors for k in ckpt.vocab_keys().all() for p in (*OPTIMIZER_MOMENTS, OPTIMIZER_MASTER)
    )
    if ckpt.rank_tensors is not None or follows:
        pieces = checked_pieces(plan, *read_tokenizers(*tokenizers), wording)
        resized, done = apply_resize(ckpt, plan, pieces=pieces, seed=seed)
        return resized, lambda: done
    jobs: dict[Hashable, _TableJob] = {}  # tied copies: one job, one entry written once
    offset = 0  # where the next table's computed rows go in the work's output buffer
    for key, (shape, dtype) in vocab_table_shapes(ckpt).items():
        if (identity := same_table(ckpt, key)) in jobs:
            continue
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        stored = held(ckpt.tensors, key)
        raw = stored.raw() if isinstance(stored, Stored) else None
        # Kept rows are a prefix of the stored bytes; where they are not stored as read, the whole
        # new table is computed.
        kept = None if raw is None else byte_prefix(raw, plan.rows.kept * row_bytes)
        computed = (plan.rows.new_rows - (plan.rows.kept if kept is not None else 0)) * row_bytes
        jobs[identity] = _TableJob(key, (plan.rows.new_rows, *shape[1:]), dtype, kept, offset, computed)
        offset += computed
    try:
        work = Beside.start(
            _resize_tables_into, ckpt, plan, tokenizers, wording, seed, list(jobs.values()), workers, out_bytes=offset
        )
    except (MemoryError, OverflowError, OSError):  # a size no machine holds, from the config (override_vocab_size...)
        raise ResizeError(
            f"the new rows ({plan.rows.new_rows:,} rows in all) need {offset / 2**30:,.1f} GiB of memory, more "
            "than this machine gives; check the new vocabulary size and the config's padding settings"
        ) from None

    def computed_rows(job: _TableJob) -> list[memoryview]:
        # Waits for this table's rows only (or raises the work's error): the first table is written
        # while the next is computed.
        return [work.out_until(job.offset + job.nbytes)[job.offset :]]

    entries = {  # kept rows: the leading rows of the old table, where it stores them
        identity: Deferred(
            job.shape,
            job.dtype,
            functools.partial(computed_rows, job),
            job.kept or (),
            held(ckpt.tensors, job.key) if job.kept is not None else None,
        )
        for identity, job in jobs.items()
    }
    tables = {key: entries[same_table(ckpt, key)] for key in vocab_table_shapes(ckpt)}
    resized = with_tables(ckpt, plan, tables)
    return replace(resized, tensors=StopOnFailure(resized.tensors, work)), work.result


@dataclass(frozen=True)
class _TableJob:
    """One table a resize computes beside the writer, and where its computed rows go in the work's output buffer."""

    key: str
    shape: tuple[int, ...]
    dtype: DType
    kept: list[Region] | None  # the kept rows where they lie; None: every row is computed
    offset: int
    nbytes: int


def _resize_tables_into(
    work: Beside[list[TensorResize]],
    ckpt: Checkpoint,
    plan: ResizePlan,
    tokenizers: tuple[Path | None, Path | None],
    wording: Wording,
    seed: int,
    jobs: list[_TableJob],
    workers: int,
) -> list[TensorResize]:
    """The work beside the copy: the tokenizers read and checked, fvt's pieces taken, and the tables
    resized in the order of ``jobs`` (their order in ``work.out``), each one's computed rows put in
    ``work.out`` and said filled before the next one is computed, so that the writer takes them while
    the rest is computed; what was done."""
    import numpy as np

    tables = vocab_tables(ckpt)
    means = start_row_means(ckpt, plan, tables)  # beside the tokenizer work, which holds the GIL
    pieces = checked_pieces(plan, *read_tokenizers(*tokenizers), wording)
    fallbacks: dict[str, int] = {}
    tails = {}  # each table's computed rows, straight into the output buffer
    for job in jobs:
        rows = np.frombuffer(work.out, job.dtype.numpy, job.nbytes // job.dtype.itemsize, job.offset)
        rows = rows.reshape(-1, *job.shape[1:])
        if job.kept is None:  # the whole table is written from here: its kept rows too
            rows[: plan.rows.kept] = tables[job.key][: plan.rows.kept]
            rows = rows[plan.rows.kept :]
        tails[job.key] = rows
    resized = resized_tables(ckpt, plan, tables, pieces=pieces, seed=seed, means=means, workers=workers, tails=tails)
    for job, (key, table, fallback_count) in zip(jobs, resized, strict=True):  # one order: vocab_table_shapes'
        if table.tail is not tails[job.key]:  # the rows would not reach the writer
            raise AssertionError(f"{key}: resized out of order (expected {job.key})")
        fallbacks[key] = fallback_count
        if job is not jobs[-1]:
            # The last table is filled when the work has succeeded: a writer cannot finish the
            # checkpoint before the whole work has.
            work.filled(job.offset + job.nbytes)
    return resize_report(plan, tables, fallbacks)


class StopOnFailure(Entries):
    """A resize's entries while its work runs beside the writer: taking one that is copied (not the
    computed tables, which raise the error when awaited) raises the work's error once it has failed,
    so that a failed check stops the copy instead of finishing it first."""

    def __init__(self, entries: Any, work: Beside[Any]):
        super().__init__({key: held(entries, key) for key in entries})
        self._work = work

    def stored(self, key: str) -> Stored | torch.Tensor | bytes | None:
        value = super().stored(key)
        if not isinstance(value, Deferred) and (error := self._work.failed()) is not None:
            raise error
        return value

    def __getitem__(self, key: str) -> torch.Tensor | bytes | None:
        value = self.stored(key)
        return value.load() if isinstance(value, Stored) else value
