"""Merging a new language's tokenizer into a base one with every base id kept, for each kind: GPT-2 BPE
(``vocab.json`` + ``merges.txt``), SentencePiece ``.model`` and Hugging Face ``tokenizer.json``.

tokenizer.json merges take two styles, both a ``BPE`` model:

* byte-level (GPT-2, Llama 3, Qwen2): a ``ByteLevel`` pre-tokenizer/decoder; tokens are strings in GPT-2's
  byte alphabet; special tokens are ``added_tokens``, usually with ids above the BPE vocabulary;
* SentencePiece-style (Llama 2, Mistral): spaces become ``▁`` (a ``Metaspace`` pre-tokenizer, or
  ``Replace`` and ``Prepend`` normalizers with a ``Replace`` decoder), unknown characters fall back to
  ``<0xNN>`` byte tokens, and ``<unk>``, ``<s>``, ``</s>`` sit at low ids.

tokenizer.json files are read and written as JSON with the standard library; ``tokenizers`` validates what
is written.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemo_vocab_ext.atomic import atomic_output, refuse_existing
from nemo_vocab_ext.errors import TokenizerError
from nemo_vocab_ext.tokenization.bytelevel import byte_level_bytes
from nemo_vocab_ext.tokenization.check import IdCheck, check_ids_preserved, check_tokenizer_json
from nemo_vocab_ext.tokenization.load import (
    EOS_TOKEN,
    KIND_GPT2_BPE,
    KIND_SENTENCEPIECE,
    KIND_TOKENIZER_JSON,
    MERGES_HEADER,
    SP_SPACE,
    TokenizerInfo,
    has_type,
    load_sp_proto,
    load_tokenizer,
    merge_pairs,
)

STYLE_BYTE_LEVEL = "byte-level"
STYLE_SENTENCEPIECE = "sentencepiece"
TOKENIZER_FILE = "tokenizer.json"
# transformers' companions of tokenizer.json; they name added tokens by id, and those ids do not move.
CARRIED_FILES = ("tokenizer_config.json", "special_tokens_map.json")


@dataclass
class MergeResult:
    """What a merge wrote and how it relates to the base."""

    out: Path
    files: tuple[Path, ...]
    kind: str
    base_vocab_size: int
    vocab_size: int
    tokens_added: int
    merges_added: int
    check: IdCheck
    skipped: list[str] = field(default_factory=list)  # new tokens not carried over (special/control)

    def padded_sizes(self, divisible_by: int, tensor_parallel: Sequence[int] = (1, 2, 4, 8)) -> dict[int, int]:
        from nemo_vocab_ext.core.sizes import padded_vocab_size

        return {tp: padded_vocab_size(self.vocab_size, divisible_by, tp) for tp in tensor_parallel}


def write_gpt2_bpe(out_dir: str | Path, tokens: Sequence[str], merges: Sequence[tuple[str, str]]) -> tuple[Path, Path]:
    """Write ``vocab.json`` + ``merges.txt`` in the layout NeMo's GPT2BPETokenizer reads (header line,
    final newline: it drops the first and last line of merges.txt)."""
    out = Path(out_dir)
    vocab_path, merges_path = out / "vocab.json", out / "merges.txt"
    vocab = json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False)
    body = "".join(f"{a} {b}\n" for a, b in merges)
    for path, text in ((vocab_path, vocab), (merges_path, f"{MERGES_HEADER}\n{body}")):
        with atomic_output(path, force=True) as tmp:  # a crash never leaves a half-written file
            tmp.write_bytes(text.encode("utf-8"))
    return vocab_path, merges_path


def _require_byte_level_bpe(tok: TokenizerInfo, role: str) -> None:
    if tok.kind == KIND_GPT2_BPE:
        return
    if tok.kind == KIND_TOKENIZER_JSON and tok.byte_level and tok.merges:
        return
    hint = "; use merge_sentencepiece for SentencePiece models" if tok.kind == KIND_SENTENCEPIECE else ""
    raise TokenizerError(
        f"{tok.path}: the {role} tokenizer is {tok.kind} ({'byte-level' if tok.byte_level else 'not byte-level'}); "
        f"merging needs GPT-2 byte-level BPE (vocab.json + merges.txt or a byte-level BPE tokenizer.json){hint}"
    )


def merge_bpe(base_dir: str | Path, new_dir: str | Path, out_dir: str | Path) -> MergeResult:
    """Merge a new-language byte-level BPE into the base one, base ids and merge ranks untouched.

    The output (``vocab.json`` + ``merges.txt`` in ``out_dir``) holds every base token at its id and
    every base merge at its rank, then the new tokenizer's tokens the base lacks (in the new tokenizer's
    id order) and its merges the base lacks (in the new tokenizer's rank order). Appended merges rank
    after all base merges, so they act only where no base merge applies any more.
    """
    base = load_tokenizer(base_dir)
    new = load_tokenizer(new_dir)
    out = Path(out_dir)
    for given in (base, new):
        if out.resolve() in {f.parent.resolve() for f in given.files}:
            raise TokenizerError(f"{out}: holds an input tokenizer; write the merged one to another folder")
    _require_byte_level_bpe(base, "base")
    _require_byte_level_bpe(new, "new")
    extra_special = sorted(base.special_tokens - {EOS_TOKEN})
    if extra_special:
        raise TokenizerError(
            f"{base.path}: special tokens {extra_special[:5]} cannot be kept special in vocab.json + merges.txt; "
            "merging such a tokenizer.json is not supported yet"
        )

    # Base tokens as NeMo numbers them, including a <|endoftext|> NeMo would add: writing it into
    # vocab.json at that same id keeps it there once new tokens follow.
    tokens = list(base.tokens)
    index = {t: i for i, t in enumerate(tokens)}
    skipped: list[str] = []
    for tok in new.tokens:
        if tok in index:
            continue
        if tok in new.special_tokens or tok in new.nemo_added:
            skipped.append(tok)  # special tokens would become plain vocab entries here, not special
            continue
        if byte_level_bytes(tok) is None:
            raise TokenizerError(f"{new.path}: token {tok!r} is not a byte-level string; is this a GPT-2 style BPE?")
        index[tok] = len(tokens)
        tokens.append(tok)

    merges = list(base.merges)
    known = set(merges)
    added_merges = 0
    for m in new.merges:
        if m in known:
            continue
        for needed in (m[0], m[1], m[0] + m[1]):
            if needed not in index:  # a merge without its parts or result would break NeMo's tokenizer
                raise TokenizerError(
                    f"{new.path}: merge '{m[0]} {m[1]}' needs token {needed!r}, which is in neither vocabulary"
                )
        known.add(m)
        merges.append(m)
        added_merges += 1

    files = write_gpt2_bpe(out, tokens, merges)
    merged = load_tokenizer(out)
    check = check_ids_preserved(base, merged)
    if not check.ok or merged.vocab_size != len(tokens):  # cannot happen by construction; never ship it if it does
        raise TokenizerError(f"{out}: internal error, merged tokenizer failed its own check: {check.summary()}")
    return MergeResult(
        out=out,
        files=files,
        kind=KIND_GPT2_BPE,
        base_vocab_size=base.vocab_size,
        vocab_size=merged.vocab_size,
        tokens_added=merged.vocab_size - base.vocab_size,
        merges_added=added_merges,
        check=check,
        skipped=skipped,
    )


def merge_sentencepiece(base_model: str | Path, new_model: str | Path, out_model: str | Path) -> MergeResult:
    """Append the new SentencePiece model's normal and user-defined pieces the base lacks.

    Both models must be of the same type. Unigram pieces keep the new model's log-probability scores;
    BPE pieces get scores below every base piece (SentencePiece BPE merges by score), keeping the new
    model's order, so base merges still win. The base normalizer and special pieces are kept.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    base_path, new_path, out = Path(base_model), Path(new_model), Path(out_model)
    base, new = load_tokenizer(base_path), load_tokenizer(new_path)
    for tok, role in ((base, "base"), (new, "new")):
        if tok.kind != KIND_SENTENCEPIECE:
            raise TokenizerError(
                f"{tok.path}: the {role} tokenizer is {tok.kind}, not SentencePiece; use merge_bpe for BPE"
            )
    base_proto, new_proto = load_sp_proto(base.path), load_sp_proto(new_path)
    base_type, new_type = base_proto.trainer_spec.model_type, new_proto.trainer_spec.model_type
    type_name = pb.TrainerSpec.ModelType.Name
    if base_type != new_type:
        raise TokenizerError(
            f"{new_path}: a {type_name(new_type)} model cannot be merged into the {type_name(base_type)} base "
            f"{base_path}; train the new model with --model_type={type_name(base_type).lower()}"
        )
    if base_type not in (pb.TrainerSpec.UNIGRAM, pb.TrainerSpec.BPE):
        raise TokenizerError(f"{base_path}: merging {type_name(base_type)} SentencePiece models is not supported yet")

    piece_type = pb.ModelProto.SentencePiece
    existing = {p.piece for p in base_proto.pieces}
    lowest = min((p.score for p in base_proto.pieces if p.type == piece_type.NORMAL), default=0.0)
    added, skipped = 0, []
    for p in new_proto.pieces:
        if p.piece in existing:
            continue
        if p.type not in (piece_type.NORMAL, piece_type.USER_DEFINED):
            skipped.append(p.piece)  # control, unknown, byte and unused pieces belong to the base's setup
            continue
        added += 1
        piece = base_proto.pieces.add()
        piece.piece, piece.type = p.piece, p.type
        piece.score = lowest - added if base_type == pb.TrainerSpec.BPE else p.score
        existing.add(p.piece)
    base_proto.trainer_spec.vocab_size = len(base_proto.pieces)

    if out.is_dir():
        out = out / base_path.name
    if out.resolve() in (base_path.resolve(), new_path.resolve()):
        raise TokenizerError(f"{out}: is an input model; write the merged model to another path")
    with atomic_output(out, force=True) as tmp:
        tmp.write_bytes(base_proto.SerializeToString())
    merged = load_tokenizer(out)
    check = check_ids_preserved(base, merged)
    if not check.ok:
        raise TokenizerError(f"{out}: internal error, merged model failed its own check: {check.summary()}")
    return MergeResult(
        out=out,
        files=(out,),
        kind=KIND_SENTENCEPIECE,
        base_vocab_size=base.vocab_size,
        vocab_size=merged.vocab_size,
        tokens_added=added,
        merges_added=0,
        check=check,
        skipped=skipped,
    )


# ------------------------------------------------------------------------------------------ tokenizer.json


def tokenizer_style(data: dict[str, Any], where: Path) -> str:
    """The style of a parsed tokenizer.json: :data:`STYLE_BYTE_LEVEL` or :data:`STYLE_SENTENCEPIECE`."""
    model = data.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else None
        raise TokenizerError(f"{where}: a {kind or 'non-BPE'} model; merging needs a BPE tokenizer.json")
    if has_type(data.get("pre_tokenizer"), "ByteLevel") or has_type(data.get("decoder"), "ByteLevel"):
        return STYLE_BYTE_LEVEL
    # Spaces turned into "▁": a Metaspace step, or Replace/Prepend normalizers and a Replace decoder.
    pipeline = [data.get("normalizer"), data.get("pre_tokenizer"), data.get("decoder")]
    if has_type(pipeline, "Metaspace") or SP_SPACE in json.dumps(pipeline, ensure_ascii=False):
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

    base_merges = merge_pairs(model, base.path)
    known_merges = set(base_merges)
    added_merges = [
        m
        for m in merge_pairs(new_data["model"], new.path)
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
