"""Hugging Face ``tokenizer.json`` BPE tokenizers: merge a new language's tokenizer into a base one with
every base id kept, check a merge, and split new tokens into base pieces.

Two styles, both a ``BPE`` model:

* byte-level (GPT-2, Llama 3, Qwen2): a ``ByteLevel`` pre-tokenizer/decoder; tokens are strings in GPT-2's
  byte alphabet; special tokens are ``added_tokens``, usually with ids above the BPE vocabulary;
* SentencePiece-style (Llama 2, Mistral): spaces become ``▁`` (a ``Metaspace`` pre-tokenizer, or
  ``Replace`` and ``Prepend`` normalizers with a ``Replace`` decoder), unknown characters fall back to
  ``<0xNN>`` byte tokens, and ``<unk>``, ``<s>``, ``</s>`` sit at low ids.

Files are read and written as JSON with the standard library; ``tokenizers`` validates what is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nemo_vocab_ext.atomic import atomic_output, refuse_existing
from nemo_vocab_ext.errors import TokenizerError
from nemo_vocab_ext.tokenization.load import (
    _SP_SPACE,
    KIND_TOKENIZER_JSON,
    IdCheck,
    MergeResult,
    TokenizerInfo,
    _has_type,
    check_ids_preserved,
    load_tokenizer,
)

STYLE_BYTE_LEVEL = "byte-level"
STYLE_SENTENCEPIECE = "sentencepiece"
TOKENIZER_FILE = "tokenizer.json"
# transformers' companions of tokenizer.json; they name added tokens by id, and those ids do not move.
CARRIED_FILES = ("tokenizer_config.json", "special_tokens_map.json")


def tokenizer_style(data: dict[str, Any], where: Path) -> str:
    """The style of a parsed tokenizer.json: :data:`STYLE_BYTE_LEVEL` or :data:`STYLE_SENTENCEPIECE`."""
    model = data.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else None
        raise TokenizerError(f"{where}: a {kind or 'non-BPE'} model; merging needs a BPE tokenizer.json")
    if _has_type(data.get("pre_tokenizer"), "ByteLevel") or _has_type(data.get("decoder"), "ByteLevel"):
        return STYLE_BYTE_LEVEL
    # Spaces turned into "▁": a Metaspace step, or Replace/Prepend normalizers and a Replace decoder.
    pipeline = [data.get("normalizer"), data.get("pre_tokenizer"), data.get("decoder")]
    if _has_type(pipeline, "Metaspace") or _SP_SPACE in json.dumps(pipeline, ensure_ascii=False):
        return STYLE_SENTENCEPIECE
    raise TokenizerError(
        f"{where}: neither byte-level (ByteLevel) nor SentencePiece-style (spaces as '▁'); "
        "merging supports GPT-2/Llama 3 and Llama 2/Mistral style tokenizer.json files"
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read ({e})") from None


def _require_json_kind(tok: TokenizerInfo, role: str) -> dict[str, Any]:
    if tok.kind != KIND_TOKENIZER_JSON:
        raise TokenizerError(
            f"{tok.path}: the {role} tokenizer is {tok.kind}; merging into a tokenizer.json needs a "
            "tokenizer.json of the same style"
        )
    data: dict[str, Any] = _read_json(tok.path)
    return data


def _merge_pairs(model: dict[str, Any]) -> list[tuple[str, str]]:
    pairs = []
    for m in model.get("merges") or []:  # tokenizers >= 0.20 writes [a, b]; older files "a b"
        a, b = m if isinstance(m, list) else m.split(" ", 1)
        pairs.append((a, b))
    return pairs


def merge_tokenizer_json(
    base_path: str | Path, new_path: str | Path, out: str | Path, *, force: bool = False
) -> MergeResult:
    """Append a new-language tokenizer.json's tokens and merges to a base one of the same style; write ``out``.

    ``out`` is a folder with the merged ``tokenizer.json`` and the base's ``tokenizer_config.json`` and
    ``special_tokens_map.json`` where it has them. Every base token, added token and merge keeps its id
    and rank. The new tokenizer's model tokens the base lacks take ids after the highest base id (added
    tokens included), in the new tokenizer's id order; its merges the base lacks follow the base's merges
    where both parts and the result are in the merged vocabulary. The new tokenizer's own added tokens
    are not carried over (they are its training's special tokens). ``out`` appears only complete.
    """
    out = Path(out)
    refuse_existing(out, force=force)
    base, new = load_tokenizer(base_path), load_tokenizer(new_path)
    base_data, new_data = _require_json_kind(base, "base"), _require_json_kind(new, "new")
    base_style, new_style = tokenizer_style(base_data, base.path), tokenizer_style(new_data, new.path)
    if base_style != new_style:
        raise TokenizerError(
            f"{new.path}: a {new_style} tokenizer cannot be merged into the {base_style} base {base.path}; "
            f"train the new tokenizer in the base's style"
        )
    if out.resolve() in {base.path.parent.resolve(), new.path.parent.resolve()}:
        raise TokenizerError(f"{out}: holds an input tokenizer; write the merged one to another folder")
    _require_ids_as_loaded(base_data, base)
    companions = {name: base.path.parent / name for name in CARRIED_FILES if (base.path.parent / name).is_file()}
    _check_added_tokens_decoder(base, companions)

    model = base_data["model"]
    vocab: dict[str, int] = model["vocab"]  # extended in place: the base's JSON is the output's
    # tokenizers renumbers an added token the model lacks from the model's size on load, which would
    # move Llama 3's specials onto new tokens: the model vocabulary holds them at their ids (as GPT-2's
    # and Llama 2's files do), so it stays 0..n-1.
    vocab.update((t["content"], t["id"]) for t in base_data.get("added_tokens") or [] if t["content"] not in vocab)
    known = set(base.tokens)  # the model vocabulary and the added tokens
    new_added = {t["content"] for t in new_data.get("added_tokens") or []}
    new_tokens: list[str] = []
    skipped: list[str] = []
    for token in new.tokens:  # in the new tokenizer's id order
        if token in known:
            continue
        (skipped if token in new_added else new_tokens).append(token)
        known.add(token)
    vocab.update((token, base.vocab_size + k) for k, token in enumerate(new_tokens))  # base ids are 0..n-1

    base_merges = _merge_pairs(model)
    known_merges = set(base_merges)
    added_merges = [
        m
        for m in _merge_pairs(new_data["model"])
        if m not in known_merges and {m[0], m[1], m[0] + m[1]} <= vocab.keys()
    ]
    # In the base's format: "a b" strings (tokenizers < 0.20) unless a part holds a space, else [a, b].
    strings = isinstance((model.get("merges") or [None])[0], str) and not any(" " in a + b for a, b in added_merges)
    model["merges"] = [f"{a} {b}" if strings else [a, b] for a, b in [*base_merges, *added_merges]]

    text = json.dumps(base_data, ensure_ascii=False, indent=2)
    _validate(text, out)
    with atomic_output(out, force=force) as tmp:
        tmp.mkdir()
        (tmp / TOKENIZER_FILE).write_text(text, encoding="utf-8")
        for name, src in companions.items():
            (tmp / name).write_bytes(src.read_bytes())
        merged = load_tokenizer(tmp / TOKENIZER_FILE)
        check = check_tokenizer_json(base, merged)
        if not check.ok or merged.vocab_size != base.vocab_size + len(new_tokens):
            raise TokenizerError(f"{out}: internal error, merged tokenizer failed its own check: {check.summary()}")
    check.merged_path = str(out)
    return MergeResult(
        out=out,
        files=tuple(out / name for name in (TOKENIZER_FILE, *companions)),
        kind=KIND_TOKENIZER_JSON,
        base_vocab_size=base.vocab_size,
        vocab_size=merged.vocab_size,
        tokens_added=len(new_tokens),
        merges_added=len(added_merges),
        check=check,
        skipped=skipped,
    )


def _require_ids_as_loaded(data: dict[str, Any], tok: TokenizerInfo) -> None:
    """Refuse a file whose ids are not the ones tokenizers loads: it renumbers an added token the model
    lacks from the model's size (so an id past a gap moves), and new ids are counted from the loaded size."""
    written = {**data["model"]["vocab"], **{t["content"]: t["id"] for t in data.get("added_tokens") or []}}
    for i, token in enumerate(tok.tokens):
        if written.get(token) != i:
            raise TokenizerError(
                f"{tok.path}: gives {token!r} id {written.get(token)} but tokenizers loads it as id {i}; "
                f"ids must be 0..{tok.vocab_size - 1} without gaps"
            )


def _validate(text: str, out: Path) -> None:
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception
        raise TokenizerError(f"{out}: internal error, the merged tokenizer.json does not load ({e})") from None


def _check_added_tokens_decoder(base: TokenizerInfo, companions: dict[str, Path]) -> None:
    """Refuse a base whose tokenizer_config.json names added tokens at ids tokenizer.json gives others:
    carried over unchanged, it would keep contradicting the merged tokenizer."""
    config_path = companions.get("tokenizer_config.json")
    if config_path is None:
        return
    config = _read_json(config_path)
    decoder = config.get("added_tokens_decoder") if isinstance(config, dict) else None
    for key, entry in (decoder or {}).items():
        content = entry.get("content") if isinstance(entry, dict) else None
        i = int(key) if str(key).isdigit() else -1
        actual = base.tokens[i] if 0 <= i < base.vocab_size else None
        if content != actual:
            raise TokenizerError(
                f"{config_path}: added_tokens_decoder gives id {key} to {content!r} but {base.path} has "
                f"{actual!r} there; fix the base's files first"
            )


def _added_token_state(tok: TokenizerInfo) -> dict[int, tuple[Any, ...]]:
    return {
        i: (t.content, t.special, t.single_word, t.lstrip, t.rstrip, t.normalized)
        for i, t in tok.backend.get_added_tokens_decoder().items()
    }


def check_tokenizer_json(base: TokenizerInfo, merged: TokenizerInfo) -> IdCheck:
    """:func:`~nemo_vocab_ext.tokenizer.check_ids_preserved`, plus: every base added token is still an
    added token with the same flags (a special token turned into a plain one splits differently)."""
    check = check_ids_preserved(base, merged)
    moved = {m.token for m in check.moved}
    base_added, merged_added = _added_token_state(base), _added_token_state(merged)
    for i, state in sorted(base_added.items()):
        if merged_added.get(i) != state and state[0] not in moved:
            check.pieces_changed.append(state[0])
    return check


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
