"""``resize``: read, plan, resize, embed the new tokenizer, write a verified checkpoint."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

from .atomic import refuse_existing, refuse_overlap, scratch_dir
from .core.rows import Init
from .errors import ResizeError, TokenizerError
from .io import Format, Stage, load_checkpoint, no_stage, save_checkpoint, weights_for
from .vocab import (
    apply_resize_while_writing,
    check_tokenizer_fits,
    checkpoint_tokenizer_files,
    embed_tokenizer,
    plan_resize,
    tokenizer_config_files,
)


def run_resize(
    src: Path,
    dst: Path,
    *,
    fmt: Format = Format.NEMO,
    tokenizer: Path | None,
    vocab_size: int | None,
    init: Init,
    padding_init: Init,
    tensor_parallel: int | None = None,
    divisible_by: int | None = None,
    allow_shrink: bool = False,
    seed: int = 0,
    dry_run: bool = False,
    force: bool = False,
    verify: bool = False,
    stage: Stage = no_stage,
) -> list[str]:
    """Resize ``src`` into ``dst`` (written as ``fmt``) and return the report lines; ``dry_run`` writes nothing."""
    from .tokenizer import tokenizer_size

    if not dry_run:
        refuse_overlap(src, dst)
        refuse_existing(dst, force=force)
    stage("reading")
    ckpt = weights_for(load_checkpoint(src)[0], fmt)
    if fmt is Format.CKPT and ckpt.training_state.get("optimizer_states"):
        # A Lightning file keeps its optimizer's moments by parameter index, not by name: they would
        # keep the old table's shape and break the resumed run.
        raise ResizeError(
            f"{src}: a training checkpoint whose optimizer state cannot follow a resized table; "
            "write a .nemo or .safetensors DST (weights only)"
        )
    with scratch_dir() as tmp:
        own_files = checkpoint_tokenizer_files(ckpt, tmp)
        if init.needs_pieces and (own_files is None or tokenizer is None):
            raise TokenizerError(
                f"--init {init} needs the checkpoint's own tokenizer and --tokenizer (the new one); "
                "pass --init mean (or zeros) to resize without them"
            )
        # The plan needs only the two sizes. The tokenizers are then read whole and checked, and the
        # new rows computed, beside this process while it copies (a failed check stops the copy at
        # the next entry).
        new_vocab = tokenizer_size(tokenizer) if tokenizer else vocab_size
        assert new_vocab is not None
        plan = plan_resize(
            ckpt,
            tokenizer_size(own_files) if own_files else None,
            new_vocab,
            tensor_parallel=tensor_parallel,
            divisible_by=divisible_by,
            init=init,
            padding_init=padding_init,
            allow_shrink=allow_shrink,
        )
        checked_pieces: Callable[[], list[list[int]] | None] = (
            functools.partial(_checked_pieces, own_files, tokenizer, init.needs_pieces)
            if tokenizer is not None
            else lambda: None
        )
        if dry_run:
            checked_pieces()
            return ["plan (dry run, nothing written):", *plan.lines()]
        stage("resizing")
        resized, finished = apply_resize_while_writing(ckpt, plan, pieces=checked_pieces, seed=seed)
        if tokenizer is not None:
            resized = embed_tokenizer(resized, tokenizer_config_files(tokenizer))
        # Record what the rows were padded for, so NeMo builds the same table from this config.
        resized.config = dict(resized.config, make_vocab_size_divisible_by=plan.divisible_by)
        if tensor_parallel is not None and resized.rank_tensors is None:
            resized.config["tensor_model_parallel_size"] = tensor_parallel
        save_checkpoint(resized, dst, fmt, force=force, verify=verify, stage=stage)
    return [f"wrote {dst}", *plan.lines(finished())]


def _checked_pieces(own_files: Path | None, tokenizer: Path, needs_pieces: bool) -> list[list[int]] | None:
    """Read both tokenizers whole and check that the new one keeps the old one's ids; with
    ``needs_pieces``, fvt's pieces of each new token under the old tokenizer."""
    from .tokenizer import load_tokenizer, pieces_under

    new = load_tokenizer(tokenizer)
    if own_files is None:
        return None
    own = load_tokenizer(own_files)
    check_tokenizer_fits(own, new, str(tokenizer))
    if needs_pieces and new.vocab_size > own.vocab_size:
        return pieces_under(own, new, range(own.vocab_size, new.vocab_size))
    return None
