"""``resize``: read, plan, resize, embed the new tokenizer, write a verified .nemo."""

from __future__ import annotations

import tempfile
from pathlib import Path

from .atomic import refuse_existing
from .core.rows import Init
from .errors import TokenizerError
from .io import Format, Stage, load_checkpoint, no_stage, save_checkpoint
from .vocab import (
    apply_resize_while_writing,
    check_tokenizer_fits,
    embed_tokenizer,
    load_checkpoint_tokenizer,
    plan_resize,
    tokenizer_config_files,
)


def run_resize(
    src: Path,
    dst: Path,
    *,
    tokenizer: Path | None,
    vocab_size: int | None,
    init: Init = Init.ZEROS,
    padding_init: Init = Init.MEAN,
    tensor_parallel: int | None = None,
    divisible_by: int | None = None,
    allow_shrink: bool = False,
    seed: int = 0,
    dry_run: bool = False,
    force: bool = False,
    verify: bool = False,
    stage: Stage = no_stage,
) -> list[str]:
    """Resize ``src`` into ``dst`` (a .nemo) and return the report lines; ``dry_run`` writes nothing."""
    from .tokenizer import load_tokenizer, pieces_under

    if not dry_run:
        refuse_existing(dst, force=force)
    stage("reading")
    ckpt, _ = load_checkpoint(src)
    with tempfile.TemporaryDirectory(prefix="nemo_vocab_ext.") as tmp:
        own = load_checkpoint_tokenizer(ckpt, Path(tmp))
        new = load_tokenizer(tokenizer) if tokenizer else None
        new_vocab = new.vocab_size if new is not None else vocab_size
        assert new_vocab is not None
        old_vocab = own.vocab_size if own is not None else None
        if init.needs_pieces and (own is None or new is None):
            raise TokenizerError(
                f"--init {init} needs the checkpoint's own tokenizer and --tokenizer (the new one); "
                "pass --init mean (or zeros) to resize without them"
            )
        plan = plan_resize(
            ckpt,
            old_vocab,
            new_vocab,
            tensor_parallel=tensor_parallel,
            divisible_by=divisible_by,
            init=init,
            padding_init=padding_init,
            allow_shrink=allow_shrink,
        )
        if new is not None and own is not None:
            check_tokenizer_fits(own, new, str(tokenizer))
        if dry_run:
            return ["plan (dry run, nothing written):", *plan.lines()]

        def pieces() -> list[list[int]] | None:
            if init.needs_pieces and own is not None and new is not None and plan.rows.new_vocab > plan.rows.old_vocab:
                return pieces_under(own, new, range(plan.rows.old_vocab, plan.rows.new_vocab))
            return None

        stage("resizing")
        # The new tables (and the pieces fvt reads) are computed while everything else is copied;
        # writers take them last.
        resized, finished = apply_resize_while_writing(ckpt, plan, pieces=pieces, seed=seed)
        if tokenizer is not None:
            resized = embed_tokenizer(resized, tokenizer_config_files(tokenizer))
        # Record what the rows were padded for, so NeMo builds the same table from this config.
        resized.config = dict(resized.config, make_vocab_size_divisible_by=plan.divisible_by)
        if tensor_parallel is not None and resized.rank_tensors is None:
            resized.config["tensor_model_parallel_size"] = tensor_parallel
        save_checkpoint(resized, dst, Format.NEMO, force=force, verify=verify, stage=stage)
    return [f"wrote {dst}", *plan.lines(finished())]
