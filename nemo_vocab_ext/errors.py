"""Error classes. Each names the file, the key or shapes involved and what to do; the CLI maps them to
one line and an exit code."""

from __future__ import annotations


class VocabExtError(Exception):
    """Base class: a problem with the user's input, reported without a traceback."""

    exit_code = 1


class CheckpointFormatError(VocabExtError):
    """A file is not a checkpoint this tool reads (truncated, unknown layout, missing member)."""


class UnsafeCheckpointError(VocabExtError):
    """A file would run code or write outside its folder if loaded the usual way."""


class ConfigError(VocabExtError):
    """The model config is missing or contradicts the weights."""


class TokenizerError(VocabExtError):
    """A tokenizer cannot be read, or does not fit the checkpoint."""


class ResizeError(VocabExtError):
    """A resize was asked for that would lose trained rows or cannot be done."""


class OutputExistsError(VocabExtError):
    """The destination exists and --force was not given."""


class UnsupportedError(VocabExtError):
    """A valid input this tool deliberately does not handle; the message names the tool that does."""


class DataError(VocabExtError):
    """A Megatron .bin/.idx dataset is unreadable, or does not match its index."""
