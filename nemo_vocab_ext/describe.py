"""What ``inspect`` reports about a checkpoint."""

from __future__ import annotations

import math
from typing import Any

from .atomic import scratch_dir
from .checkpoint import HF_LAYOUT, Checkpoint
from .entries import tensor_meta
from .errors import VocabExtError
from .vocab import (
    divisible_by_of,
    expected_rows,
    load_checkpoint_tokenizer,
    pipeline_parallel_of,
    tensor_parallel_of,
    vocab_table_shapes,
)


def describe(ckpt: Checkpoint, fmt: str) -> dict[str, Any]:
    keys = ckpt.vocab_keys()
    embedding_shape, embedding_dtype = vocab_table_shapes(ckpt)[keys.embedding]
    with scratch_dir() as tmp:
        try:
            tok = load_checkpoint_tokenizer(ckpt, tmp)
        except VocabExtError:
            tok = None
    vocab = tok.vocab_size if tok is not None else None
    states = list(ckpt.rank_tensors.values()) if ckpt.rank_tensors else [ckpt.tensors]
    # Parameters only: a training checkpoint also stores optimizer moments under "optimizer.".
    # Shapes come from the stored metadata: nothing is read.
    shapes = [
        meta[0] for s in states for k in s if not k.startswith("optimizer.") and (meta := tensor_meta(s, k)) is not None
    ]
    info = {
        "format": fmt,
        "layout": ckpt.layout,
        "embedding_key": keys.embedding,
        "embedding_rows": int(embedding_shape[0]),
        "hidden_size": int(embedding_shape[1]),
        "dtype": embedding_dtype.name,
        "tied": keys.tied,
        "has_output_layer": keys.output_layer is not None,
        "tokenizer_vocab_size": vocab,
        "padded_vocab_size": expected_rows(vocab, ckpt.config) if vocab is not None else None,
        "make_vocab_size_divisible_by": divisible_by_of(ckpt.config),
        "tensor_model_parallel_size": tensor_parallel_of(ckpt.config),
        "pipeline_model_parallel_size": pipeline_parallel_of(ckpt.config),
        "num_tensors": len(shapes),
        "num_parameters": sum(math.prod(shape) for shape in shapes),
    }
    if ckpt.layout == HF_LAYOUT:  # padded_vocab_size: what Megatron would build (its defaults: 128, TP1)
        info["architecture"] = ", ".join(ckpt.config.get("architectures") or [])
        info["config_vocab_size"] = ckpt.config.get("vocab_size")
    return info
