"""Decoder-layer key layouts of an mcore GPT, as data.

A single-file state dict (``model_weights.ckpt``, Lightning ``.ckpt``) has one key per layer and
names the norms by module (local layer spec); a distributed checkpoint stacks the layers on a
leading axis, uses Transformer Engine's fused norm names, and stores each layer's ``_extra_state``
as a byte blob ``<key>/shard_<layer>_<layers>``. Converting between them is a renaming plus
stack/unbind; blobs are encoded and decoded by the caller (the core reads no pickles).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

LAYERS = "model.decoder.layers."
EXTRA_STATE = "_extra_state"
# module-named norms (single file) -> fused names (distributed), for the local layer spec
NORM_NAMES: dict[str, str] = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
}
FUSED_NAMES = {fused: local for local, fused in NORM_NAMES.items()}
# mcore models always have this entry in a plain state dict (None without Transformer Engine).
OUTPUT_EXTRA_STATE = "model.output_layer._extra_state"

_PER_LAYER = re.compile(r"^model\.decoder\.layers\.(\d+)\.(.+)$")
_SHARD = re.compile(r"^model\.decoder\.layers\.(.+)/shard_(\d+)_(\d+)$")


def to_distributed(state: Mapping[str, Any], encode_blob: Callable[[Any], bytes]) -> dict[str, Any]:
    """Per-layer keys -> stacked keys; per-layer ``_extra_state`` values -> blobs."""
    layers: dict[str, dict[int, Any]] = {}
    out: dict[str, Any] = {}
    for key, value in state.items():
        m = _PER_LAYER.match(key)
        if m is None:
            if not (key.endswith("." + EXTRA_STATE) and value is None):  # empty extra states are not stored
                out[key] = value
            continue
        layers.setdefault(m.group(2), {})[int(m.group(1))] = value
    for name, by_layer in layers.items():
        count = len(by_layer)
        if sorted(by_layer) != list(range(count)):
            raise ValueError(f"'{LAYERS}N.{name}' is missing for some layers: found {sorted(by_layer)}")
        if name.endswith("." + EXTRA_STATE):
            for i, value in by_layer.items():
                out[f"{LAYERS}{name}/shard_{i}_{count}"] = encode_blob(value)
        else:
            out[LAYERS + NORM_NAMES.get(name, name)] = torch.stack([by_layer[i] for i in range(count)])
    return out


def to_single(state: Mapping[str, Any], decode_blob: Callable[[bytes], Any]) -> dict[str, Any]:
    """Stacked keys -> per-layer keys; blobs -> their values."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        shard = _SHARD.match(key)
        if shard is not None:
            out[f"{LAYERS}{shard.group(2)}.{shard.group(1)}"] = decode_blob(value)
        elif key.startswith(LAYERS) and isinstance(value, torch.Tensor):
            name = key[len(LAYERS) :]
            for i, layer in enumerate(value.unbind(0)):
                out[f"{LAYERS}{i}.{FUSED_NAMES.get(name, name)}"] = layer.clone()
        else:
            out[key] = value
    out.setdefault(OUTPUT_EXTRA_STATE, None)
    return out
