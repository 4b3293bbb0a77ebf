"""Tokenizer training, loading, merging and the id check, on small tokenizers trained here: English from
Python's own docs (``pydoc_data``), Thai from pythainlp's Wikipedia titles. The NeMo test loads the
merged files with NeMo's real GPT2BPETokenizer in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.sentencepiece_style import sentencepiece_model
from nemo_vocab_ext.cli_tokenizer import tokenizer as tokenizer_cli
from nemo_vocab_ext.errors import OutputExistsError, TokenizerError
from nemo_vocab_ext.tokenization.bytelevel import byte_level_bytes, bytes_to_unicode
from nemo_vocab_ext.tokenization.check import check_ids_preserved, fertility
from nemo_vocab_ext.tokenization.load import (
    EOS_TOKEN,
    KIND_GPT2_BPE,
    KIND_SENTENCEPIECE,
    KIND_TOKENIZER_JSON,
    load_tokenizer,
    read_vocab_json,
)
from nemo_vocab_ext.tokenization.merge import merge_bpe, merge_sentencepiece, write_gpt2_bpe
from nemo_vocab_ext.tokenization.pieces import pieces_under
from nemo_vocab_ext.tokenization.train import train_bpe, train_bpe_files

EN_VOCAB = 1000
TH_VOCAB = 1500


# ------------------------------------------------------------------------------------------- corpora


@pytest.fixture(scope="module")
def en_texts() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


@pytest.fixture(scope="module")
def en_lines(en_texts: list[str]) -> list[str]:
    return [line for text in en_texts for line in text.split("\n") if line.strip()]


@pytest.fixture(scope="module")
def th_lines() -> list[str]:
    import pythainlp

    path = Path(pythainlp.__file__).parent / "corpus" / "wikipedia_titles_th.txt"
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


@pytest.fixture(scope="module")
def th_train(th_lines: list[str]) -> list[str]:
    return th_lines[:20000]


@pytest.fixture(scope="module")
def th_heldout(th_lines: list[str]) -> list[str]:
    return th_lines[-3000:]  # never seen in training


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tok")


@pytest.fixture(scope="module")
def base_dir(work: Path, en_texts: list[str]) -> Path:
    return train_bpe(en_texts, work / "en", EN_VOCAB)


@pytest.fixture(scope="module")
def th_dir(work: Path, th_train: list[str]) -> Path:
    return train_bpe(th_train, work / "th", TH_VOCAB)


@pytest.fixture(scope="module")
def merged_dir(work: Path, base_dir: Path, th_dir: Path) -> Path:
    merge_bpe(base_dir, th_dir, work / "merged")
    return work / "merged"


def _copy_tokenizer(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


# --------------------------------------------------------------------------------------------- loading


def test_byte_alphabet_matches_tokenizers() -> None:
    from tokenizers.pre_tokenizers import ByteLevel

    table = bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert set(table.values()) == set(ByteLevel.alphabet())
    assert table[ord(" ")] == "Ġ" and table[ord("a")] == "a"
    # A byte-level token's bytes: every character of the alphabet is one byte, any other is refused.
    assert byte_level_bytes("".join(table[b] for b in range(256))) == bytes(range(256))
    assert byte_level_bytes("Ġthe") == b" the" and byte_level_bytes("") == b""
    for outside in (" ", "\n", "\x7f", "\xad", "中"):  # Latin-1 the alphabet moved away, and beyond Latin-1
        assert byte_level_bytes(f"ab{outside}") is None


def test_load_gpt2_folder(base_dir: Path) -> None:
    tok = load_tokenizer(base_dir)
    assert tok.kind == KIND_GPT2_BPE
    assert tok.vocab_size == EN_VOCAB == len(read_vocab_json(base_dir / "vocab.json"))
    assert tok.id_to_token(0) == EOS_TOKEN and tok.token_to_id(EOS_TOKEN) == 0
    assert tok.files == (base_dir / "vocab.json", base_dir / "merges.txt")
    assert len(tok.merges) == len((base_dir / "merges.txt").read_text().splitlines()) - 1
    assert load_tokenizer(base_dir / "vocab.json").tokens == tok.tokens  # a file inside the folder works too
    ids = tok.encode("The quick brown fox.")
    assert ids and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.encode(f"a{EOS_TOKEN}b") == tok.encode("a") + [0] + tok.encode("b")  # special, as in NeMo


def test_load_tokenizer_json_matches_folder(base_dir: Path, work: Path, en_texts: list[str]) -> None:
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer.from_file(str(base_dir / "vocab.json"), str(base_dir / "merges.txt"))
    bpe.add_special_tokens([EOS_TOKEN])
    (work / "json").mkdir(exist_ok=True)
    bpe.save(str(work / "json" / "tokenizer.json"))
    tok = load_tokenizer(work / "json")  # folder holding tokenizer.json
    folder = load_tokenizer(base_dir)
    assert tok.kind == KIND_TOKENIZER_JSON and tok.byte_level
    assert tok.tokens == folder.tokens and tok.merges == folder.merges
    assert tok.files == (work / "json" / "tokenizer.json",)
    assert tok.encode(en_texts[0][:500]) == folder.encode(en_texts[0][:500])
    assert check_ids_preserved(folder, tok).ok


def test_missing_eos_is_added_as_nemo_does(base_dir: Path, work: Path, en_lines: list[str]) -> None:
    # NeMo's slow GPT2Tokenizer adds <|endoftext|> with id len(vocab.json) when the file lacks it.
    vocab = read_vocab_json(base_dir / "vocab.json")
    del vocab[EOS_TOKEN]
    noeos = work / "noeos"
    write_gpt2_bpe(noeos, sorted(vocab, key=lambda t: vocab[t] - 1), load_tokenizer(base_dir).merges)
    tok = load_tokenizer(noeos)
    assert tok.vocab_size == EN_VOCAB and tok.nemo_added == (EOS_TOKEN,)
    assert tok.token_to_id(EOS_TOKEN) == EN_VOCAB - 1 and tok.encode(EOS_TOKEN) == [EN_VOCAB - 1]
    # A merge into such a base writes <|endoftext|> into vocab.json at the id NeMo gave it.
    new = _copy_tokenizer(base_dir, work / "noeos_new")
    result = merge_bpe(noeos, new, work / "noeos_merged")
    assert result.check.ok and result.tokens_added == 0
    assert read_vocab_json(work / "noeos_merged" / "vocab.json")[EOS_TOKEN] == EN_VOCAB - 1


@pytest.mark.parametrize(
    ("vocab", "merges", "message"),
    [
        ('{"a": 0, "b": 1', "#version: 0.2\n", "cannot read"),
        ('["a", "b"]', "#version: 0.2\n", "expected a JSON object"),
        ('{"a": 0, "b": 5}', "#version: 0.2\n", "ids must be 0..1 without gaps"),
        ('{"a": 0, "b": 0}', "#version: 0.2\n", "share id 0"),
        ('{"a": 0, "b": 1, "ab": 2}', "a b\n", "not a '#version' header"),
        ('{"a": 0, "b": 1, "ab": 2}', "#version: 0.2\na b", "does not end with a newline"),
        ('{"a": 0, "b": 1, "ab": 2}', "#version: 0.2\na b c\n", "expected two tokens"),
        ('{"a": 0, "b": 1, "ab": 2}', "#version: 0.2\na b\na b\n", "repeats line 2"),
        ('{"a": 0, "b": 1}', "#version: 0.2\na b\n", "needs token 'ab'"),
    ],
)
def test_bad_gpt2_files_name_the_file(tmp_path: Path, vocab: str, merges: str, message: str) -> None:
    (tmp_path / "vocab.json").write_text(vocab)
    (tmp_path / "merges.txt").write_text(merges)
    with pytest.raises(TokenizerError, match=message) as err:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)


def test_unreadable_paths(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="no such file or folder"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(TokenizerError, match="no tokenizer files found"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(TokenizerError, match="has no merges.txt"):
        load_tokenizer(tmp_path)
    (tmp_path / "x.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="x.model"):
        load_tokenizer(tmp_path / "x.model")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "tokenizer.json")


# ---------------------------------------------------------------------------------------------- merge


def test_merge_appends_and_preserves_ids(base_dir: Path, th_dir: Path, work: Path) -> None:
    result = merge_bpe(base_dir, th_dir, work / "merged_a")
    base, new, merged = load_tokenizer(base_dir), load_tokenizer(th_dir), load_tokenizer(work / "merged_a")
    assert result.check.ok and check_ids_preserved(base, merged).ok
    assert merged.tokens[: base.vocab_size] == base.tokens
    assert merged.merges[: len(base.merges)] == base.merges
    added = merged.tokens[base.vocab_size :]
    assert added and set(added).isdisjoint(base.tokens) and set(added) <= set(new.tokens)
    assert added == sorted(added, key=lambda t: new.tokens.index(t))  # the new tokenizer's id order
    assert set(new.tokens) <= set(merged.tokens)  # nothing of the new tokenizer lost
    new_merges = merged.merges[len(base.merges) :]
    assert new_merges == [m for m in new.merges if m not in set(base.merges)]  # new rank order
    vocab = set(merged.tokens)
    assert all({a, b, a + b} <= vocab for a, b in new_merges)
    assert result.vocab_size == merged.vocab_size == base.vocab_size + result.tokens_added
    assert result.merges_added == len(new_merges)
    assert result.padded_sizes(128) == {tp: -(-merged.vocab_size // (128 * tp)) * 128 * tp for tp in (1, 2, 4, 8)}
    # Deterministic: merging again gives the same bytes.
    merge_bpe(base_dir, th_dir, work / "merged_b")
    for name in ("vocab.json", "merges.txt"):
        assert (work / "merged_a" / name).read_bytes() == (work / "merged_b" / name).read_bytes()
    assert (work / "merged_a" / "merges.txt").read_text().startswith("#version")


def test_merged_encodes_english_exactly_like_base(base_dir: Path, merged_dir: Path, en_lines: list[str]) -> None:
    base, merged = load_tokenizer(base_dir), load_tokenizer(merged_dir)
    assert len(en_lines) > 5000
    assert merged.encode_batch(en_lines) == base.encode_batch(en_lines)


def test_thai_fertility_drops(base_dir: Path, merged_dir: Path, th_heldout: list[str], en_lines: list[str]) -> None:
    base, merged = load_tokenizer(base_dir), load_tokenizer(merged_dir)
    before, after = fertility(base, th_heldout), fertility(merged, th_heldout)
    print(f"Thai tokens/char: base {before:.3f}, merged {after:.3f}")
    assert before > 2.5  # the English tokenizer spells Thai in raw bytes (3 per character)
    assert after < before / 3
    assert fertility(merged, en_lines) == fertility(base, en_lines)
    with pytest.raises(TokenizerError):
        fertility(base, ["", ""])


def test_merge_accepts_tokenizer_json_new(base_dir: Path, th_dir: Path, merged_dir: Path, work: Path) -> None:
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer.from_file(str(th_dir / "vocab.json"), str(th_dir / "merges.txt"))
    bpe.add_special_tokens([EOS_TOKEN])
    bpe.save(str(work / "th_tokenizer.json"))
    merge_bpe(base_dir, work / "th_tokenizer.json", work / "merged_json")
    for name in ("vocab.json", "merges.txt"):
        assert (work / "merged_json" / name).read_bytes() == (merged_dir / name).read_bytes()


def test_merge_refuses_non_bpe(base_dir: Path, tmp_path: Path, sp_models: dict[str, Path]) -> None:
    with pytest.raises(TokenizerError, match="merging needs GPT-2 byte-level BPE"):
        merge_bpe(base_dir, sp_models["th"], tmp_path / "out")
    with pytest.raises(TokenizerError, match="holds an input tokenizer"):
        merge_bpe(base_dir, base_dir, base_dir)


# ------------------------------------------------------------------------------------ broken merges


def test_moved_id_is_caught(base_dir: Path, merged_dir: Path, tmp_path: Path) -> None:
    broken = _copy_tokenizer(merged_dir, tmp_path / "moved")
    vocab = read_vocab_json(broken / "vocab.json")
    inv = {i: t for t, i in vocab.items()}
    a, b = inv[300], inv[EN_VOCAB + 5]  # a base token swapped with a new one
    vocab[a], vocab[b] = EN_VOCAB + 5, 300
    (broken / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    check = check_ids_preserved(load_tokenizer(base_dir), load_tokenizer(broken))
    assert not check.ok and len(check.moved) == 1 and not check.merges_changed
    assert check.moved[0].token == a and check.moved[0].merged_id == EN_VOCAB + 5
    summary = check.summary()
    assert "\n" not in summary and "1 of 1000 base token ids moved" in summary
    assert f"{a!r}: 300 \u2192 {EN_VOCAB + 5}" in summary


def test_missing_token_is_caught(base_dir: Path, tmp_path: Path) -> None:
    base = load_tokenizer(base_dir)
    tokens = base.tokens[:-1]  # drop the last base token (and the merges that need it)
    last = base.tokens[-1]
    merges = [m for m in base.merges if last not in (m[0], m[1], m[0] + m[1])]
    write_gpt2_bpe(tmp_path / "short", tokens, merges)
    check = check_ids_preserved(base, load_tokenizer(tmp_path / "short"))
    assert not check.ok and f"{last!r}: {EN_VOCAB - 1} \u2192 missing" in check.summary()


def test_reordered_merges_are_caught(base_dir: Path, merged_dir: Path, tmp_path: Path) -> None:
    broken = _copy_tokenizer(merged_dir, tmp_path / "reordered")
    lines = (broken / "merges.txt").read_text(encoding="utf-8").split("\n")
    lines[11], lines[21] = lines[21], lines[11]  # base merges 10 and 20 swap ranks (line 1 is the header)
    (broken / "merges.txt").write_text("\n".join(lines), encoding="utf-8")
    base = load_tokenizer(base_dir)
    check = check_ids_preserved(base, load_tokenizer(broken))
    assert not check.ok and not check.moved and len(check.merges_changed) == 2
    a, b = base.merges[10]
    assert f"'{a} {b}': rank 10 \u2192 20" in check.summary()
    assert f"2 of {len(base.merges)} base merge ranks changed" in check.summary()
    data = check.to_dict()
    assert data["ok"] is False and data["changed_merges"] == 2 and data["moved_ids"] == 0


# ------------------------------------------------------------------------------------------------ FVT


def test_pieces_under_hand_checked(tmp_path: Path) -> None:
    b2u = bytes_to_unicode()
    byte_tokens = [b2u[b] for b in range(256)]
    thai_ko = "ก".encode()  # E0 B8 81
    partial = b2u[thai_ko[0]] + b2u[thai_ko[1]]
    old_tokens = [EOS_TOKEN, *byte_tokens, "th", "Ġth"]
    old_merges = [("t", "h"), ("Ġ", "th")]
    new_tokens = [*old_tokens, "the", "Ġthe", partial, partial + b2u[thai_ko[2]]]
    thai_merges = [(b2u[thai_ko[0]], b2u[thai_ko[1]]), (partial, b2u[thai_ko[2]])]
    new_merges = [*old_merges, ("th", "e"), ("Ġth", "e"), *thai_merges]
    write_gpt2_bpe(tmp_path / "old", old_tokens, old_merges)
    write_gpt2_bpe(tmp_path / "new", new_tokens, new_merges)
    old, new = load_tokenizer(tmp_path / "old"), load_tokenizer(tmp_path / "new")

    def byte_id(b: int) -> int:
        return 1 + b  # <|endoftext|> is 0, then the bytes in order

    th, space_th = old.token_to_id("th"), old.token_to_id("Ġth")
    assert pieces_under(old, new, range(len(old_tokens), len(new_tokens))) == [
        [th, byte_id(ord("e"))],  # "the" -> th + e
        [space_th, byte_id(ord("e"))],  # " the" -> Ġth + e
        [byte_id(0xE0), byte_id(0xB8)],  # two bytes of a three-byte character: no text, still bytes
        [byte_id(0xE0), byte_id(0xB8), byte_id(0x81)],  # "ก" spelled in bytes
    ]
    # An old token under itself is itself.
    assert pieces_under(old, old, range(0, 5))[1:] == [[1], [2], [3], [4]]
    with pytest.raises(TokenizerError, match="outside"):
        pieces_under(old, new, range(0, len(new_tokens) + 1))


def test_pieces_under_real_merge(base_dir: Path, merged_dir: Path) -> None:
    base, merged = load_tokenizer(base_dir), load_tokenizer(merged_dir)
    new_ids = range(base.vocab_size, merged.vocab_size)
    pieces = pieces_under(base, merged, new_ids)
    assert len(pieces) == len(new_ids) and all(pieces)
    for i, ids in zip(new_ids, pieces, strict=True):  # the old pieces spell exactly the new token's bytes
        assert b"".join(base.token_bytes(j) for j in ids) == merged.token_bytes(i)
        assert all(j < base.vocab_size for j in ids)


# ---------------------------------------------------------------------------------------- training


def test_train_bpe_files_plain_and_jsonl(tmp_path: Path, en_texts: list[str]) -> None:
    plain = tmp_path / "a.txt"
    plain.write_text("\n".join(en_texts[:20]), encoding="utf-8")
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(en_texts[:20])))
    a = load_tokenizer(train_bpe_files([plain], tmp_path / "plain", 400))
    b = load_tokenizer(train_bpe_files([jsonl], tmp_path / "jsonl", 400, json_key="text"))
    assert a.vocab_size == b.vocab_size == 400 and a.tokens[0] == EOS_TOKEN
    # Same texts: JSONL keeps a document's newlines inside one text, so the counts differ a little,
    # but both learned the corpus's commonest words.
    assert a.encode(" the") == [a.token_to_id("Ġthe")] and b.encode(" the") == [b.token_to_id("Ġthe")]


@pytest.mark.parametrize(
    ("content", "key", "message"),
    [
        ("not json\n", "text", r"bad\.jsonl:1: not a JSON object"),
        ('{"body": "x"}\n', "text", r"bad\.jsonl:1: no key 'text'"),
        ('{"text": 3}\n', "text", r"bad\.jsonl:1: 'text' is int"),
    ],
)
def test_train_bpe_files_errors(tmp_path: Path, content: str, key: str, message: str) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    with pytest.raises(TokenizerError, match=message):
        train_bpe_files([bad], tmp_path / "out", 300, json_key=key)
    with pytest.raises(TokenizerError, match="corpus file not found"):
        train_bpe_files([tmp_path / "missing.txt"], tmp_path / "out", 300)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(TokenizerError, match="not UTF-8"):
        train_bpe_files([tmp_path / "latin1.txt"], tmp_path / "out", 300)
    with pytest.raises(TokenizerError, match="too small"):
        train_bpe_files([bad], tmp_path / "out", 100)


# -------------------------------------------------------------------------------------- SentencePiece


@pytest.fixture(scope="module")
def sp_models(work: Path, en_lines: list[str], th_train: list[str]) -> dict[str, Path]:
    return {
        name: sentencepiece_model(lines, work / f"sp_{name}", size)
        for name, lines, size in (("en", en_lines, 600), ("th", th_train[:8000], 800))
    }


def test_sentencepiece_merge(
    sp_models: dict[str, Path], work: Path, en_lines: list[str], th_heldout: list[str]
) -> None:
    result = merge_sentencepiece(sp_models["en"], sp_models["th"], work / "sp_merged.model")
    base, new, merged = (load_tokenizer(p) for p in (sp_models["en"], sp_models["th"], result.out))
    assert merged.kind == KIND_SENTENCEPIECE and result.check.ok
    assert merged.tokens[: base.vocab_size] == base.tokens
    assert merged.vocab_size == base.vocab_size + result.tokens_added
    assert set(new.tokens) - set(merged.tokens) <= set(result.skipped)
    assert merged.encode_batch(en_lines) == base.encode_batch(en_lines)
    before, after = fertility(base, th_heldout), fertility(merged, th_heldout)
    print(f"SentencePiece Thai tokens/char: base {before:.3f}, merged {after:.3f}")
    assert after < before / 3
    # pieces_under on SentencePiece: a word-internal piece gets no "▁" from the dummy prefix.
    er = base.token_to_id("er")
    assert er is not None and pieces_under(base, base, range(er, er + 1)) == [[er]]
    for i, ids in zip(
        range(base.vocab_size, merged.vocab_size),
        pieces_under(base, merged, range(base.vocab_size, merged.vocab_size)),
        strict=True,
    ):
        assert b"".join(base.token_bytes(j) for j in ids) == merged.token_bytes(i)


def test_sentencepiece_changed_scores_are_caught(sp_models: dict[str, Path], tmp_path: Path) -> None:
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(sp_models["en"].read_bytes())
    proto.pieces[300].score, proto.pieces[301].score = proto.pieces[301].score, proto.pieces[300].score
    (tmp_path / "swapped.model").write_bytes(proto.SerializeToString())
    base = load_tokenizer(sp_models["en"])
    check = check_ids_preserved(base, load_tokenizer(tmp_path / "swapped.model"))
    assert not check.ok and not check.moved and len(check.pieces_changed) == 2
    assert "2 base pieces changed score or type" in check.summary()
    with pytest.raises(TokenizerError, match="is an input model"):
        merge_sentencepiece(sp_models["en"], sp_models["th"], sp_models["en"])


def test_sentencepiece_type_mismatch(sp_models: dict[str, Path], tmp_path: Path) -> None:
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(sp_models["th"].read_bytes())
    proto.trainer_spec.model_type = pb.TrainerSpec.UNIGRAM
    (tmp_path / "uni.model").write_bytes(proto.SerializeToString())
    with pytest.raises(TokenizerError, match="UNIGRAM model cannot be merged into the BPE base"):
        merge_sentencepiece(sp_models["en"], tmp_path / "uni.model", tmp_path / "out.model")


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_train(tmp_path: Path, en_texts: list[str]) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in en_texts[:10]))
    runner = CliRunner()
    args = ["train", str(corpus), str(tmp_path / "out"), "--vocab-size", "300", "--json-key", "text"]
    res = runner.invoke(tokenizer_cli, args)
    assert res.exit_code == 0, res.output
    assert "300 tokens" in res.output and (tmp_path / "out" / "merges.txt").is_file()
    res = runner.invoke(tokenizer_cli, args)
    assert res.exit_code == OutputExistsError.exit_code and "exists; pass --force" in res.output
    res = runner.invoke(tokenizer_cli, [*args, "--force", "--quiet"])
    assert res.exit_code == 0 and res.output == ""
    res = runner.invoke(tokenizer_cli, ["train", str(corpus), str(tmp_path / "o2"), "--vocab-size", "300"])
    assert res.exit_code == 0  # JSON lines read as plain text are still text
    res = runner.invoke(tokenizer_cli, ["train", str(tmp_path / "x"), str(tmp_path / "o3"), "--vocab-size", "300"])
    assert res.exit_code == 1 and res.output.count("\n") == 1 and "corpus file not found" in res.output
    assert not (tmp_path / "o3").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "o2", "out"]  # no temp folders left


def test_cli_merge(base_dir: Path, th_dir: Path, merged_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "m"
    res = runner.invoke(tokenizer_cli, ["merge", str(base_dir), str(th_dir), str(out)])
    assert res.exit_code == 0, res.output
    size = load_tokenizer(merged_dir).vocab_size
    added = size - EN_VOCAB
    assert f"added {added} tokens and " in res.output
    assert f"vocab size (as NeMo counts it): {size} (base {EN_VOCAB})" in res.output
    from nemo_vocab_ext.core.sizes import padded_vocab_size

    assert ", ".join(f"TP{tp} {padded_vocab_size(size, 128, tp)}" for tp in (1, 2, 4, 8)) in res.output
    assert f"ids preserved: all {EN_VOCAB} base tokens keep their ids" in res.output
    assert f"tokens in {out})" in res.output  # the published folder, not the temp one
    assert (out / "vocab.json").read_bytes() == (merged_dir / "vocab.json").read_bytes()

    res = runner.invoke(tokenizer_cli, ["merge", str(base_dir), str(th_dir), str(out)])
    assert res.exit_code == 1 and "exists; pass --force" in res.output
    (out / "vocab.json").write_text("{}")
    args = ["merge", str(base_dir), str(th_dir), str(out), "--force", "--divisible-by", "64"]
    res = runner.invoke(tokenizer_cli, args)
    assert res.exit_code == 0 and "make_vocab_size_divisible_by=64" in res.output
    assert (out / "vocab.json").read_bytes() == (merged_dir / "vocab.json").read_bytes()
    res = runner.invoke(tokenizer_cli, ["merge", str(base_dir), str(tmp_path / "nope"), str(tmp_path / "m2")])
    assert res.exit_code == 1 and res.output.startswith("Error: ") and "nope: no such file" in res.output
    assert res.output.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp folders left


def test_cli_merge_sentencepiece(sp_models: dict[str, Path], tmp_path: Path) -> None:
    res = CliRunner().invoke(tokenizer_cli, ["merge", str(sp_models["en"]), str(sp_models["th"]), str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert load_tokenizer(tmp_path / "o" / "sp_en.model").kind == KIND_SENTENCEPIECE
    res = CliRunner().invoke(
        tokenizer_cli, ["merge", str(sp_models["en"]), str(sp_models["th"]), str(tmp_path / "x.model")]
    )
    assert res.exit_code == 0 and load_tokenizer(tmp_path / "x.model").vocab_size > 600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", "x.model"]


def test_cli_check(
    base_dir: Path, merged_dir: Path, tmp_path: Path, en_lines: list[str], th_heldout: list[str]
) -> None:
    en = tmp_path / "en.txt"
    en.write_text("\n".join(en_lines[:2000]) + "\n", encoding="utf-8")
    th = tmp_path / "th.txt"
    th.write_text("\n".join(th_heldout[:500]) + "\n", encoding="utf-8")
    runner = CliRunner()
    res = runner.invoke(tokenizer_cli, ["check", str(base_dir), str(merged_dir), "--text", str(en), "--text", str(th)])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("ids preserved: all 1000 base tokens keep their ids")
    assert f"{en}: 0 of 2000 lines (0.0%) encode differently" in res.output
    base, merged = load_tokenizer(base_dir), load_tokenizer(merged_dir)
    pairs = zip(base.encode_batch(th_heldout[:500]), merged.encode_batch(th_heldout[:500]), strict=True)
    differ = sum(b != m for b, m in pairs)
    assert differ > 450  # nearly every Thai title (a few are Latin or digits only)
    assert f"{th}: {differ} of 500 lines ({differ / 5:.1f}%) encode differently" in res.output

    res = runner.invoke(tokenizer_cli, ["check", str(base_dir), str(merged_dir), "--text", str(th), "--json"])
    data = json.loads(res.output)
    assert res.exit_code == 0 and data["ids"]["ok"] is True
    report = data["texts"][0]
    assert report["fertility_merged"] < report["fertility_base"] / 3 and len(report["examples"]) == 3

    broken = _copy_tokenizer(merged_dir, tmp_path / "broken")
    lines = (broken / "merges.txt").read_text(encoding="utf-8").split("\n")
    lines[1], lines[2] = lines[2], lines[1]
    (broken / "merges.txt").write_text("\n".join(lines), encoding="utf-8")
    res = runner.invoke(tokenizer_cli, ["check", str(base_dir), str(broken)])
    assert res.exit_code == 1 and "ids NOT preserved" in res.output and "merge ranks changed" in res.output
    res = runner.invoke(tokenizer_cli, ["check", str(base_dir), str(broken), "--json"])
    assert res.exit_code == 1 and json.loads(res.output)["ids"]["changed_merges"] == 2

    res = runner.invoke(tokenizer_cli, ["check", str(base_dir), str(tmp_path / "none")])
    assert res.exit_code == 1 and res.output.count("\n") == 1 and "none: no such file or folder" in res.output


# ----------------------------------------------------------------------------------------------- NeMo

_NEMO_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from nemo.collections.nlp.modules.common.tokenizer_utils import get_nmt_tokenizer

    job = json.loads(sys.argv[1])
    out = {}
    for name, folder in job["folders"].items():
        tok = get_nmt_tokenizer(
            library="megatron", model_name="GPT2BPETokenizer",
            vocab_file=folder + "/vocab.json", merges_file=folder + "/merges.txt",
        )
        out[name] = {
            "vocab_size": tok.vocab_size,
            "len": len(tok.tokenizer),
            "class": type(tok.tokenizer).__name__,
            "eos_id": tok.token_to_id("<|endoftext|>"),
            "ids": [tok.text_to_ids(t) for t in job["texts"]],
        }
    print("RESULT " + json.dumps(out))
    """
)


@pytest.mark.nemo
def test_nemo_gpt2bpe_reports_our_vocab_size(
    base_dir: Path, merged_dir: Path, work: Path, en_lines: list[str], th_heldout: list[str]
) -> None:
    from harness.tiny import cpu_env, offline_hf_home

    # A base whose vocab.json lacks <|endoftext|>: NeMo adds it, so its size is one more than the file's.
    vocab = read_vocab_json(base_dir / "vocab.json")
    del vocab[EOS_TOKEN]
    write_gpt2_bpe(work / "nemo_noeos", sorted(vocab, key=vocab.__getitem__), load_tokenizer(base_dir).merges)
    folders = {"base": base_dir, "merged": merged_dir, "noeos": work / "nemo_noeos"}
    texts = [*en_lines[:50], *th_heldout[:50], f"end{EOS_TOKEN}next"]
    job = json.dumps({"folders": {k: str(v) for k, v in folders.items()}, "texts": texts})
    env = cpu_env(offline_hf_home(work / "hf_home"))
    proc = subprocess.run(
        [sys.executable, "-c", _NEMO_SCRIPT, job], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    nemo = json.loads(line[len("RESULT ") :])
    for name, folder in folders.items():
        ours = load_tokenizer(folder)
        assert nemo[name]["class"] == "GPT2Tokenizer"  # the slow tokenizer: it drops merges.txt's first/last line
        assert nemo[name]["vocab_size"] == nemo[name]["len"] == ours.vocab_size, name
        assert nemo[name]["eos_id"] == ours.token_to_id(EOS_TOKEN), name
        assert nemo[name]["ids"] == ours.encode_batch(texts), name
    assert nemo["noeos"]["vocab_size"] == len(vocab) + 1 and nemo["noeos"]["eos_id"] == len(vocab)
    assert nemo["merged"]["vocab_size"] > nemo["base"]["vocab_size"] == EN_VOCAB
