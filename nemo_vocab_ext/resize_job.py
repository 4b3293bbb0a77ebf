"""``resize``: read, plan, resize, embed the new tokenizer, write a verified checkpoint."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from .atomic import refuse_existing, refuse_overlap, scratch_dir
from .checkpoint import Checkpoint
from .errors import ResizeError, UnsupportedError
from .io import Format, Stage, load_checkpoint, no_stage, save_checkpoint, select, weights_for
from .options import ResizeOptions
from .pipeline import Wording, checked_pieces, prepare_resize, read_tokenizers, resize_while_writing, with_padding_of
from .vocab import (
    PER_TP_LINE,
    ResizePlan,
    TensorResize,
    checkpoint_tokenizer_files,
)

WORDING = Wording(
    init_setting="--init ",
    new_tokenizer="--tokenizer (the new one)",
    without_pieces="pass --init mean (or zeros) to resize without them",
    shrink_hint="pass --allow-shrink to drop them",
    tokenizer_name="",  # named per run: the --tokenizer path
)


def run_resize(
    src: Path,
    dst: Path,
    *,
    fmt: Format = Format.NEMO,
    tokenizer: Path | None,
    vocab_size: int | None,
    options: ResizeOptions,
    tensor_parallel: int | None = None,
    divisible_by: int | None = None,
    pad_to_multiple_of: int | None = None,
    dry_run: bool = False,
    force: bool = False,
    verify: bool = False,
    drop_optimizer: bool = False,
    stage: Stage = no_stage,
) -> list[str]:
    """Resize ``src`` into ``dst`` (written as ``fmt``) and return the report lines; ``dry_run`` writes
    nothing. ``tensor_parallel`` and ``divisible_by`` override the model config's; a Hugging Face model
    folder takes ``pad_to_multiple_of`` instead (no padding by default, as transformers). A Megatron run
    with optimizer state is refused unless ``drop_optimizer`` (the model alone is written)."""
    from .tokenization.load import tokenizer_size

    if not dry_run:
        refuse_overlap(src, dst)
        refuse_existing(dst, force=force)
    stage("reading")
    loaded, src_fmt = load_checkpoint(src)
    hf = src_fmt is Format.HF
    if hf != (fmt is Format.HF):
        raise UnsupportedError(
            f"{dst}: a Hugging Face model folder is resized only into a Hugging Face model folder; "
            "use NeMo's Hugging Face importers and exporters to convert"
        )
    if hf:
        if tensor_parallel is not None or divisible_by is not None:
            raise ResizeError(
                f"{src}: a Hugging Face model folder is not padded for tensor parallelism; "
                "pass --pad-to-multiple-of N instead of --tp/--divisible-by"
            )
        tensor_parallel, divisible_by = 1, pad_to_multiple_of or 1
    elif pad_to_multiple_of is not None:
        raise ResizeError(f"{src}: --pad-to-multiple-of is for Hugging Face model folders; pass --divisible-by")
    ckpt = weights_for(loaded, fmt)
    if fmt is Format.CKPT and ckpt.training_state.get("optimizer_states"):
        # A Lightning file keeps its optimizer's moments by parameter index, not by name: they would
        # keep the old table's shape and break the resumed run.
        raise ResizeError(
            f"{src}: a training checkpoint whose optimizer state cannot follow a resized table; "
            "write a .nemo or .safetensors DST (weights only)"
        )
    if fmt is Format.MEGATRON:
        ckpt = _run_model(ckpt, src, drop_optimizer)
    wording = replace(WORDING, tokenizer_name=str(tokenizer))
    with scratch_dir() as tmp:
        own_files = checkpoint_tokenizer_files(ckpt, tmp)
        # The plan needs only the two sizes. The tokenizers are then read whole and checked, and the
        # new rows computed, on a thread beside the copy (a failed check stops the copy at
        # the next entry).
        new_vocab = tokenizer_size(tokenizer) if tokenizer else vocab_size
        assert new_vocab is not None
        plan = prepare_resize(
            ckpt,
            tokenizer_size(own_files) if own_files else None,
            new_vocab,
            has_new_tokenizer=tokenizer is not None,
            options=with_padding_of(options, ckpt.config, tensor_parallel=tensor_parallel, divisible_by=divisible_by),
            wording=wording,
        )
        if dry_run:
            checked_pieces(plan, *read_tokenizers(own_files, tokenizer), wording)
            return ["plan (dry run, nothing written):", *_lines(plan, hf, pad_to_multiple_of)]
        stage("resizing")
        resized, finished = resize_while_writing(
            ckpt, plan, (own_files, tokenizer), wording, options.seed, _compute_threads(fmt)
        )
        if hf:
            from .formats.hf_folder import left_behind, with_new_rows, with_tokenizer

            notes: list[str] = []
            if tokenizer is not None:
                resized, notes = with_tokenizer(resized, tokenizer)
            if stale := left_behind(src):
                notes.append(f"not carried over (weights in other forms, with the old vocabulary): {', '.join(stale)}")
            save_checkpoint(
                with_new_rows(resized, plan.rows.new_rows), dst, fmt, force=force, verify=verify, stage=stage
            )
            return [f"wrote {dst}", *_lines(plan, hf, pad_to_multiple_of, finished()), *notes]
        # Imported here: a Hugging Face resize starts copying sooner without these formats' modules.
        from .formats.megatron_run import canonical_tokenizer_files
        from .formats.nemo import embed_tokenizer, tokenizer_config_files

        if tokenizer is not None:
            files = tokenizer_config_files(tokenizer)
            if fmt is Format.MEGATRON:  # read back from tokenizer/ under megatron's names
                files = canonical_tokenizer_files(files, tmp)
            resized = embed_tokenizer(resized, files)
        # Record what the rows were padded for, so NeMo builds the same table from this config.
        resized.config = dict(resized.config, make_vocab_size_divisible_by=plan.divisible_by)
        # Sizes recorded beside the tables (a Megatron run's args, Bridge's run config) follow them.
        if resized.config.get("padded_vocab_size") is not None:
            resized.config["padded_vocab_size"] = plan.rows.new_rows
        if resized.config.get("vocab_size") is not None:
            resized.config["vocab_size"] = plan.new_vocab
        if tensor_parallel is not None and resized.rank_tensors is None:
            resized.config["tensor_model_parallel_size"] = tensor_parallel
        save_checkpoint(resized, dst, fmt, force=force, verify=verify, stage=stage)
    return [f"wrote {dst}", *plan.lines(finished())]


def _compute_threads(fmt: Format) -> int:
    """Threads for fvt's new rows beside the writer: a Megatron run's writer links the model instead of
    copying it and leaves every core to them; the other writers' kernel copy keeps one busy. (At most
    8: the arithmetic waits on memory beyond that.)"""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cores if fmt is Format.MEGATRON else cores - 1))


def _lines(plan: ResizePlan, hf: bool, pad_to_multiple_of: int | None, done: Sequence[TensorResize] = ()) -> list[str]:
    """The plan's report; a Hugging Face folder's rows are padded as transformers pads them, not for
    tensor parallelism."""
    lines = plan.lines(done)
    if not hf:
        return lines
    rows = f"rows: {plan.rows.old_rows:,} -> {plan.rows.new_rows:,} (pad_to_multiple_of={pad_to_multiple_of or 'none'})"
    return [rows if line.startswith("rows: ") else line for line in lines if not line.startswith(PER_TP_LINE)]


def _run_model(ckpt: Checkpoint, src: Path, drop_optimizer: bool) -> Checkpoint:
    """A Megatron run's model to resize: its optimizer state would keep the old tables' shapes (or hold
    their rows inside flat buffers), so it is refused, or dropped when asked."""
    from .formats.megatron_run import OPTIMIZER_PREFIX, has_optimizer_state, optimizer_keys, state_without_optimizer

    if not has_optimizer_state(ckpt):
        return ckpt
    if not drop_optimizer:
        held = optimizer_keys(ckpt)
        what = f"{len(held)} optimizer entries, e.g. '{held[0]}'" if held else "the optimizer's state in common.pt"
        raise ResizeError(
            f"{src}: holds optimizer state ({what}) that cannot follow the resized tables; pass --drop-optimizer "
            "to write the model only, then start Megatron-LM with --no-load-optim --no-load-rng "
            "(Megatron-Bridge: checkpoint.load_optim=false checkpoint.load_rng=false)"
        )
    model = select(ckpt, lambda key: not key.startswith(OPTIMIZER_PREFIX))
    return replace(model, training_state=state_without_optimizer(ckpt.training_state))
