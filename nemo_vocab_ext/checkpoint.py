"""The in-memory form every format adapter reads into and writes from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .core.keys import VocabKeys, find_vocab_keys

# bytes: opaque blobs (``_extra_state``) kept exactly as stored; None: an empty ``_extra_state``.
Value = torch.Tensor | bytes | None

# Layout names, shared by every adapter.
DISTRIBUTED = "distributed"  # torch_dist directory: stacked decoder layers, global tensors
SINGLE = "single"  # one state dict file: per-layer keys (model_weights.ckpt, Lightning .ckpt)
MP_RANK = "mp_rank"  # legacy per-TP-rank files
TP_PP_RANK = "tp_pp_rank"  # legacy per-(TP, PP)-rank files


@dataclass
class Checkpoint:
    """Model weights plus what is needed to rebuild the model.

    ``tensors`` holds global tensors (shards joined) keyed as stored; for the legacy rank layouts it
    holds rank 0's view and ``rank_tensors`` every rank's own file. ``config`` is the model config
    as a plain container; ``artifacts`` maps archive member names (``<hash>_vocab.json``) to bytes;
    ``training_state`` carries what a training checkpoint holds besides weights (step, loops...).
    """

    tensors: dict[str, Value]
    config: dict[str, Any]
    layout: str
    artifacts: dict[str, bytes] = field(default_factory=dict)
    rank_tensors: dict[tuple[int, int], dict[str, Value]] | None = None
    training_state: dict[str, Any] = field(default_factory=dict)

    def vocab_keys(self) -> VocabKeys:
        return find_vocab_keys(k for k, v in self.tensors.items() if isinstance(v, torch.Tensor))

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.tensors.items() if isinstance(v, torch.Tensor)}


def stored_entries(tensors: dict[str, Value]) -> dict[str, torch.Tensor | bytes]:
    """Entries for a distributed checkpoint, which has no way to store None (single-file layouts do)."""
    empty = [k for k, v in tensors.items() if v is None]
    if empty:
        raise ValueError(f"'{empty[0]}' is None: only single-file layouts store empty _extra_state entries")
    return {k: v for k, v in tensors.items() if v is not None}
