"""One resize, whichever entry point runs it: the CLI (``resize_job``) and the NeMo plugin.

Both prepare it the same way: the fvt precondition, the plan, then once per resize (whatever the
number of tables) the check that the new tokenizer keeps the old one's ids and fvt's pieces of each
new token. They differ only in how they obtain the tokenizers and where they write.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .checkpoint import Checkpoint
from .errors import TokenizerError
from .options import ResizeOptions
from .vocab import ResizePlan, check_tokenizer_fits, divisible_by_of, plan_resize, tensor_parallel_of

if TYPE_CHECKING:
    from .tokenizer import TokenizerInfo


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
    from .tokenizer import pieces_under

    if own is None or new is None:
        return None
    check_tokenizer_fits(own, new, wording.tokenizer_name)
    if plan.init.needs_pieces and plan.new_vocab > plan.rows.old_vocab:
        return pieces_under(own, new, range(plan.rows.old_vocab, plan.new_vocab))
    return None
