"""Llama 2 / Mistral style tokenizers built with the ``tokenizers`` library: ``<unk> <s> </s>``, the 256
byte pieces ``<0xNN>`` (byte fallback), then BPE pieces with ``▁`` for spaces, as SentencePiece lays out
its BPE vocabularies when such a model is converted to a ``tokenizer.json``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from nemo_vocab_ext.tokenization.load import SP_SPACE

SP_SPECIALS = ["<unk>", "<s>", "</s>"]  # at ids 0..2
SP_BYTES = [f"<0x{b:02X}>" for b in range(256)]


def sentencepiece_style(texts: Sequence[str], vocab_size: int, *, llama2_normalizer: bool = True) -> Tokenizer:
    """A tokenizer of ``vocab_size`` tokens trained on ``texts``. Llama 2's files prepend and replace ``▁``
    in the normalizer (``llama2_normalizer``); Mistral's later conversions use a Metaspace pre-tokenizer."""
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")  # no pieces across words
    learner.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=vocab_size - len(SP_SPECIALS) - len(SP_BYTES), show_progress=False)
    )
    learnt = json.loads(learner.to_str())["model"]
    pieces = sorted(learnt["vocab"], key=learnt["vocab"].__getitem__)  # in the order they were made
    vocab = {t: i for i, t in enumerate([*SP_SPECIALS, *SP_BYTES, *pieces])}
    merges = [tuple(m) for m in learnt["merges"]]
    tk = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if llama2_normalizer:
        tk.normalizer = normalizers.Sequence([normalizers.Prepend(SP_SPACE), normalizers.Replace(" ", SP_SPACE)])
    else:
        tk.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    tk.decoder = decoders.Sequence(
        [decoders.Replace(SP_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tk.add_special_tokens(SP_SPECIALS)
    return tk


def sentencepiece_model(lines: Sequence[str], prefix: Path, vocab_size: int) -> Path:
    """A SentencePiece BPE ``.model`` with byte fallback, as Llama 2 and Mistral ship theirs, trained on
    ``lines`` by the sentencepiece library: ``prefix``.model."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")
