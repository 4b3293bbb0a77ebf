"""Tokenizer files: training, loading and sizes as NeMo defines them."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

EOS_TOKEN = "<|endoftext|>"


def train_bpe(texts: Iterable[str], out_dir: str | Path, vocab_size: int, min_frequency: int = 2) -> Path:
    """Train a GPT-2 style byte-level BPE and write ``vocab.json`` and ``merges.txt`` into ``out_dir``.

    ``<|endoftext|>`` is id 0, as NeMo's GPT2BPETokenizer expects it in the vocabulary.
    """
    from tokenizers import ByteLevelBPETokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS_TOKEN], show_progress=False
    )
    bpe.save_model(str(out))
    return out


def read_vocab_json(path: str | Path) -> dict[str, int]:
    with open(path, encoding="utf-8") as f:
        vocab: dict[str, int] = json.load(f)
    return vocab
