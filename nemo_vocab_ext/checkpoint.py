"""The form every format adapter reads into and writes from: a config, artifacts, and entries by key.

Entries are read lazily (an :class:`~.entries.Entries` mapping) so that a command holds one
tensor at a time; a plain dict of in-memory values works the same everywhere.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

from .core.keys import VocabKeys, find_vocab_keys, hf_vocab_keys
from .entries import is_tensor, tensor_meta
from .errors import ConfigError

if TYPE_CHECKING:
    import torch

# bytes: opaque blobs (``_extra_state``) kept exactly as stored; None: an empty ``_extra_state``.
# (Named as a string: reading and writing files never imports torch.)
Value = Union["torch.Tensor", bytes, None]

# Layout names, shared by every adapter.
DISTRIBUTED = "distributed"  # torch_dist directory: stacked decoder layers, global tensors
SINGLE = "single"  # one state dict file: per-layer keys (model_weights.ckpt, Lightning .ckpt)
MP_RANK = "mp_rank"  # legacy per-TP-rank files
TP_PP_RANK = "tp_pp_rank"  # legacy per-(TP, PP)-rank files
HF_LAYOUT = "hf"  # a Hugging Face model folder: its own key names, config.json as the config


NEMO_REF = "nemo:"  # a config value naming one of the checkpoint's artifacts


def artifact_named(ref: object) -> str | None:
    """The artifact a config value names (``nemo:<member>``); None for anything else (a path, no value)."""
    if isinstance(ref, str) and ref.startswith(NEMO_REF):
        return ref[len(NEMO_REF) :]
    return None


def artifact_name(data: bytes, basename: str) -> str:
    """NeMo names artifacts ``<32 hex>_<basename>``; a content digest keeps it reproducible."""
    return f"{hashlib.md5(data).hexdigest()}_{basename}"


@dataclass
class Checkpoint:
    """Model weights plus what is needed to rebuild the model.

    ``tensors`` holds global tensors (shards joined) keyed as stored; for the legacy rank layouts it
    holds rank 0's view and ``rank_tensors`` every rank's own file. ``config`` is the model config
    as a plain container; ``artifacts`` maps archive member names (``<hash>_vocab.json``) to bytes;
    ``training_state`` carries what a training checkpoint holds besides weights (step, loops...).
    """

    tensors: MutableMapping[str, Value]
    config: dict[str, Any]
    layout: str
    artifacts: dict[str, bytes] = field(default_factory=dict)
    rank_tensors: dict[tuple[int, int], dict[str, Value]] | None = None
    training_state: dict[str, Any] = field(default_factory=dict)

    def tensor_keys(self) -> list[str]:
        """Keys of tensor entries (not byte blobs or empty entries), without reading any."""
        return [k for k in self.tensors if tensor_meta(self.tensors, k) is not None]

    def vocab_keys(self) -> VocabKeys:
        if self.layout == HF_LAYOUT:  # the architecture config.json names tells the keys
            return hf_vocab_keys(
                self.config.get("architectures"), self.config.get("tie_word_embeddings"), self.tensor_keys()
            )
        return find_vocab_keys(self.tensor_keys())

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor entry, read one at a time."""
        for key in self.tensor_keys():
            value = self.tensors[key]
            assert is_tensor(value)
            yield key, value  # type: ignore[misc]


def tokenizer_config(config: dict[str, Any]) -> dict[str, Any]:
    """The model config's ``tokenizer`` section ({} when it has none)."""
    tok = config.get("tokenizer")
    if tok is None:
        return {}
    if not isinstance(tok, dict) or not all(isinstance(k, str) for k in tok):
        raise ConfigError(f"model config: tokenizer is {type(tok).__name__} {tok!r:.60}, not a table of settings")
    return tok
