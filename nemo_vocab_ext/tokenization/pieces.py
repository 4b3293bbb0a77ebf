"""The sub-tokens FVT averages: each new token of a larger tokenizer split into the ids of the old one."""

from __future__ import annotations

from nemo_vocab_ext.errors import TokenizerError
from nemo_vocab_ext.tokenization.load import KIND_TOKENIZER_JSON, TokenizerInfo


def pieces_under(old: TokenizerInfo, new: TokenizerInfo, new_ids: range) -> list[list[int]]:
    """For each id in ``new_ids`` of ``new``, the ids ``old`` splits that token's text into.

    Used by the sub-token mean (FVT) init: the new row is the mean of these old rows. The token is
    turned back into its bytes and encoded with ``old`` (between two tokenizer.json files, split by
    ``old``'s BPE model: :func:`pieces_under_json`); an empty list means no usable sub-tokens (a control
    piece, an empty token) and the caller should fall back to another init.
    """
    if old.kind == new.kind == KIND_TOKENIZER_JSON:
        # Text would go through the normalizer, which gives a SentencePiece-style token a second "▁".
        return pieces_under_json(old, new, new_ids)
    if new_ids.start < 0 or new_ids.stop > new.vocab_size:
        raise TokenizerError(f"{new.path}: ids {new_ids.start}..{new_ids.stop - 1} outside 0..{new.vocab_size - 1}")
    return old.encode_bytes_batch([new.token_bytes(i) for i in new_ids])


def pieces_under_json(base: TokenizerInfo, merged: TokenizerInfo, new_ids: range) -> list[list[int]]:
    """For each id in ``new_ids`` of ``merged``, the base ids the base's BPE model splits that token into.

    The token string goes through the base model as stored: GPT-2 byte-alphabet characters for a
    byte-level tokenizer, ``▁`` for spaces (and ``<0xNN>`` byte fallback) for a SentencePiece-style one,
    so no normalizer or pre-tokenizer adds a second prefix space. Added tokens of ``merged``: special
    ones have no pieces (an empty list: the caller falls back to another init), others are encoded
    as text. The base's unknown token is left out of the pieces.
    """
    for tok in (base, merged):
        if tok.kind != KIND_TOKENIZER_JSON:
            raise TokenizerError(f"{tok.path}: is {tok.kind}, not a tokenizer.json; use pieces_under")
    if new_ids.start < 0 or new_ids.stop > merged.vocab_size:
        raise TokenizerError(
            f"{merged.path}: ids {new_ids.start}..{new_ids.stop - 1} outside 0..{merged.vocab_size - 1}"
        )
    model = base.backend.model
    unk = base.token_to_id(model.unk_token) if getattr(model, "unk_token", None) else None
    added = merged.backend.get_added_tokens_decoder()
    pieces = []
    for i in new_ids:
        if i in added:
            ids = [] if added[i].special else base.encode(added[i].content)
        else:
            ids = [t.id for t in model.tokenize(merged.tokens[i])]
        pieces.append([j for j in ids if j != unk])
    return pieces
