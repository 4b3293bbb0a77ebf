"""Whether a merged tokenizer extends its base: every base token keeps its id, every base merge its rank
(and, between tokenizer.json files, every added token its flags); and tokens per character on a text."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from nemo_vocab_ext.errors import TokenizerError
from nemo_vocab_ext.tokenization.load import KIND_SENTENCEPIECE, KIND_TOKENIZER_JSON, TokenizerInfo


@dataclass(frozen=True)
class MovedId:
    token: str
    base_id: int
    merged_id: int | None  # None: the token is missing from the merged tokenizer

    def __str__(self) -> str:
        where = "missing" if self.merged_id is None else str(self.merged_id)
        return f"{self.token!r}: {self.base_id} \u2192 {where}"


@dataclass(frozen=True)
class MovedMerge:
    merge: tuple[str, str]
    base_rank: int
    merged_rank: int | None

    def __str__(self) -> str:
        where = "missing" if self.merged_rank is None else str(self.merged_rank)
        return f"'{self.merge[0]} {self.merge[1]}': rank {self.base_rank} \u2192 {where}"


@dataclass
class IdCheck:
    """Whether every base token keeps its id (and every base merge its rank) in the merged tokenizer."""

    base_path: str
    merged_path: str
    base_tokens: int
    merged_tokens: int
    base_merges: int
    moved: list[MovedId] = field(default_factory=list)
    merges_changed: list[MovedMerge] = field(default_factory=list)
    # SentencePiece: base pieces whose score or type changed (the scores play the merge ranks' part).
    pieces_changed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.moved and not self.merges_changed and not self.pieces_changed

    def summary(self, examples: int = 3) -> str:
        """One line: what was checked and, on failure, how much moved with a few examples."""
        if self.ok:
            merges = f" and all {self.base_merges} base merges their ranks" if self.base_merges else ""
            return (
                f"all {self.base_tokens} base tokens keep their ids{merges} "
                f"({self.merged_tokens} tokens in {self.merged_path})"
            )
        parts = []
        if self.moved:
            eg = ", ".join(str(m) for m in self.moved[:examples])
            parts.append(f"{len(self.moved)} of {self.base_tokens} base token ids moved (e.g. {eg})")
        if self.merges_changed:
            eg = ", ".join(str(m) for m in self.merges_changed[:examples])
            parts.append(f"{len(self.merges_changed)} of {self.base_merges} base merge ranks changed (e.g. {eg})")
        if self.pieces_changed:
            eg = ", ".join(repr(p) for p in self.pieces_changed[:examples])
            parts.append(f"{len(self.pieces_changed)} base pieces changed score or type (e.g. {eg})")
        # Facts only: callers append what it means for them (scrambled rows, how to rebuild).
        return f"ids NOT preserved in {self.merged_path}: " + "; ".join(parts)

    def to_dict(self, examples: int = 20) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "base": self.base_path,
            "merged": self.merged_path,
            "base_tokens": self.base_tokens,
            "merged_tokens": self.merged_tokens,
            "base_merges": self.base_merges,
            "moved_ids": len(self.moved),
            "moved_examples": [
                {"token": m.token, "base_id": m.base_id, "merged_id": m.merged_id} for m in self.moved[:examples]
            ],
            "changed_merges": len(self.merges_changed),
            "changed_merge_examples": [
                {"merge": " ".join(m.merge), "base_rank": m.base_rank, "merged_rank": m.merged_rank}
                for m in self.merges_changed[:examples]
            ],
            "changed_pieces": len(self.pieces_changed),
            "changed_piece_examples": self.pieces_changed[:examples],
            "summary": self.summary(),
        }


def check_ids_preserved(base: TokenizerInfo, merged: TokenizerInfo) -> IdCheck:
    """THE check that a merged tokenizer is an extension of ``base``: token ``t`` with base id ``i`` has
    id ``i`` in ``merged``, and base merge ``r`` is still merge ``r`` (a merge ranked earlier or later
    changes how base-language text is split, even when every id stays put)."""
    check = IdCheck(
        base_path=str(base.path),
        merged_path=str(merged.path),
        base_tokens=base.vocab_size,
        merged_tokens=merged.vocab_size,
        base_merges=len(base.merges),
    )
    # Whole-list comparisons first (a resize checks two 50k-token tokenizers beside its copy); the
    # loops only run to name what moved.
    if merged.tokens[: len(base.tokens)] != base.tokens:
        for i, tok in enumerate(base.tokens):
            if i < merged.vocab_size and merged.tokens[i] == tok:
                continue
            check.moved.append(MovedId(tok, i, merged.token_to_id(tok)))
    if merged.merges[: len(base.merges)] != base.merges:
        merged_rank = {m: r for r, m in enumerate(merged.merges)}
        for r, m in enumerate(base.merges):
            if r < len(merged.merges) and merged.merges[r] == m:
                continue
            check.merges_changed.append(MovedMerge(m, r, merged_rank.get(m)))
    if base.kind == merged.kind == KIND_SENTENCEPIECE:
        b, m = base.backend, merged.backend
        for i, tok in enumerate(base.tokens):
            if i >= merged.vocab_size or merged.tokens[i] != tok:
                continue  # already reported as moved
            if _sp_piece_state(b, i) != _sp_piece_state(m, i):
                check.pieces_changed.append(tok)
    return check


def _sp_piece_state(sp: Any, i: int) -> tuple[float, bool, bool, bool, bool]:
    return (sp.get_score(i), sp.is_control(i), sp.is_unknown(i), sp.is_unused(i), sp.is_byte(i))


def _added_token_state(tok: TokenizerInfo) -> dict[int, tuple[Any, ...]]:
    return {
        i: (t.content, t.special, t.single_word, t.lstrip, t.rstrip, t.normalized)
        for i, t in tok.backend.get_added_tokens_decoder().items()
    }


def check_tokenizer_json(base: TokenizerInfo, merged: TokenizerInfo) -> IdCheck:
    """:func:`check_ids_preserved`, plus: every base added token is still an
    added token with the same flags (a special token turned into a plain one splits differently)."""
    check = check_ids_preserved(base, merged)
    moved = {m.token for m in check.moved}
    base_added, merged_added = _added_token_state(base), _added_token_state(merged)
    for i, state in sorted(base_added.items()):
        if merged_added.get(i) != state and state[0] not in moved:
            check.pieces_changed.append(state[0])
    return check


def check_merged(base: TokenizerInfo, merged: TokenizerInfo) -> IdCheck:
    """The check for this pair of kinds: :func:`check_tokenizer_json` between two tokenizer.json files,
    else :func:`check_ids_preserved`."""
    if base.kind == merged.kind == KIND_TOKENIZER_JSON:
        return check_tokenizer_json(base, merged)
    return check_ids_preserved(base, merged)


def fertility(tok: TokenizerInfo, texts: Iterable[str]) -> float:
    """Tokens per character over ``texts`` (lower = the tokenizer knows the language better)."""
    batch = [t for t in texts if t]
    chars = sum(len(t) for t in batch)
    if not chars:
        raise TokenizerError("fertility needs at least one non-empty text")
    return sum(len(ids) for ids in tok.encode_batch(batch)) / chars
