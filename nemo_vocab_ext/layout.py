"""Switch an mcore checkpoint between the distributed and the single-file weight layouts."""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import torch

from .checkpoint import DISTRIBUTED, SINGLE, Checkpoint
from .core.layers import to_distributed, to_single
from .errors import UnsupportedError
from .formats.safe_pickle import safe_torch_load


def _encode_blob(value: Any) -> bytes:
    buf = io.BytesIO()
    torch.save([value], buf)  # megatron stores each extra state as a one-element list
    return buf.getvalue()


def _decode_blob(blob: bytes) -> Any:
    value = safe_torch_load(io.BytesIO(blob), what="an _extra_state entry")
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def change_layout(ckpt: Checkpoint, layout: str) -> Checkpoint:
    """The same weights in ``layout`` (``distributed`` or ``single``); mcore models only."""
    if layout == ckpt.layout:
        return ckpt
    if ckpt.vocab_keys().family != "mcore" or {layout, ckpt.layout} != {DISTRIBUTED, SINGLE}:
        raise UnsupportedError(
            f"only mcore checkpoints move between the distributed and single-file layouts; "
            f"this one is {ckpt.vocab_keys().family}, layout {ckpt.layout}"
        )
    weights = {k: v for k, v in ckpt.tensors.items() if not k.startswith("optimizer.")}
    try:
        tensors = to_distributed(weights, _encode_blob) if layout == DISTRIBUTED else to_single(weights, _decode_blob)
    except ValueError as e:
        raise UnsupportedError(f"cannot change the layout: {e}") from e
    # The distributed layout's common.pt and metadata.json describe the old files: NeMo's defaults replace them.
    state = {k: v for k, v in ckpt.training_state.items() if not k.startswith("dist_")}
    return dataclasses.replace(ckpt, tensors=tensors, layout=layout, training_state=state)
