"""How a resize fills and pads the table: the product's defaults, in one place.

The CLI's option defaults, the NeMo plugin's ``model.vocab_extension`` keys and the presets in
``conf_overrides`` all take their defaults from :class:`ResizeOptions`; nothing below them has one.
"""

from __future__ import annotations

from dataclasses import dataclass

from .core.rows import Init

# Padding rows have no tokens, so no pieces: every init but those that need them.
PADDING_INITS: tuple[Init, ...] = tuple(i for i in Init if not i.needs_pieces)


@dataclass(frozen=True)
class ResizeOptions:
    """A resize's choices. ``tensor_parallel`` and ``divisible_by`` are what the new table is padded
    for when neither the command nor the model config says (NeMo's own defaults)."""

    init: Init = Init.FVT  # new tokens' rows (fvt measured best: README, "Which init")
    padding_init: Init = Init.MEAN  # rows past the tokenizer: a zero row gives logit 0
    seed: int = 0  # the 'normal' init's draws
    allow_shrink: bool = False  # allow a table smaller than the trained one (drops rows)
    tensor_parallel: int = 1
    divisible_by: int = 128

    def __post_init__(self) -> None:
        if self.padding_init not in PADDING_INITS:
            raise ValueError(f"padding rows have no tokens: padding_init cannot be '{self.padding_init}'")


DEFAULTS = ResizeOptions()
