"""tokenizer.json merging, checking and FVT pieces in both BPE styles, on tokenizers trained here with the
``tokenizers`` library (English from Python's docs for the base, Thai from pythainlp's Wikipedia titles
for the addition) and loaded back with transformers' ``AutoTokenizer``."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from harness.sentencepiece_style import SP_BYTES, SP_SPECIALS, sentencepiece_style
from nemo_vocab_ext.cli_tokenizer import tokenizer as tokenizer_cli
from nemo_vocab_ext.errors import OutputExistsError, TokenizerError
from nemo_vocab_ext.tokenization.bytelevel import bytes_to_unicode
from nemo_vocab_ext.tokenization.check import check_tokenizer_json, fertility
from nemo_vocab_ext.tokenization.load import load_tokenizer
from nemo_vocab_ext.tokenization.merge import (
    STYLE_BYTE_LEVEL,
    STYLE_SENTENCEPIECE,
    merge_tokenizer_json,
    tokenizer_style,
)
from nemo_vocab_ext.tokenization.pieces import pieces_under, pieces_under_json

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"  # byte-level specials, above the BPE vocabulary
SPACE = "\u2581"
STYLES = (STYLE_BYTE_LEVEL, STYLE_SENTENCEPIECE)


# ------------------------------------------------------------------------------------------- corpora


@pytest.fixture(scope="module")
def en_lines() -> list[str]:
    from pydoc_data.topics import topics

    return [line for k in sorted(topics) for line in topics[k].split("\n") if line.strip()]


@pytest.fixture(scope="module")
def th_lines() -> list[str]:
    import pythainlp

    path = Path(pythainlp.__file__).parent / "corpus" / "wikipedia_titles_th.txt"
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


# ---------------------------------------------------------------------------------- tokenizer builders


def byte_level(texts: list[str], vocab_size: int, specials: list[str]) -> Tokenizer:
    """A Llama 3 / Qwen2 style tokenizer: byte-level BPE, special tokens added above its vocabulary."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, show_progress=False)
    tk.train_from_iterator(texts, trainer)
    data = json.loads(tk.to_str())
    data["model"]["ignore_merges"] = True  # as Llama 3: a word in the vocabulary is taken whole
    tk = Tokenizer.from_str(json.dumps(data))
    tk.add_special_tokens(specials)
    tk.post_processor = processors.TemplateProcessing(
        single=f"{specials[0]} $A", special_tokens=[(specials[0], tk.token_to_id(specials[0]))]
    )
    return tk


def save_hf(tk: Tokenizer, folder: Path, style: str) -> Path:
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json, as transformers writes them."""
    from transformers import LlamaTokenizerFast, PreTrainedTokenizerFast

    if style == STYLE_BYTE_LEVEL:
        hf: Any = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=BOS, eos_token=EOS)
    else:
        hf = LlamaTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>", legacy=True)
    hf.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tokjson")


@pytest.fixture(scope="module")
def tokenizers(work: Path, en_lines: list[str], th_lines: list[str]) -> dict[str, dict[str, Path]]:
    """For each style: a base folder (English, with transformers' companions) and a Thai addition file."""
    out: dict[str, dict[str, Path]] = {}
    th_train = th_lines[:15000]
    for style in STYLES:
        d = work / style
        d.mkdir()
        if style == STYLE_BYTE_LEVEL:
            base = byte_level(en_lines, 1000, [BOS, EOS])
            new = byte_level(th_train, 1200, ["<|endoftext|>"])
        else:
            base = sentencepiece_style(en_lines, 1000, llama2_normalizer=True)
            new = sentencepiece_style(th_train, 1200, llama2_normalizer=False)
        new.save(str(d / "th.json"))
        out[style] = {"base": save_hf(base, d / "base", style), "new": d / "th.json"}
    return out


@pytest.fixture(scope="module")
def merged(tokenizers: dict[str, dict[str, Path]], work: Path) -> dict[str, Path]:
    return {s: merge_tokenizer_json(t["base"], t["new"], work / s / "merged").out for s, t in tokenizers.items()}


def _auto(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


# ---------------------------------------------------------------------------------------------- style


def test_styles_are_told_apart(tokenizers: dict[str, dict[str, Path]]) -> None:
    for style, paths in tokenizers.items():
        for path in (paths["base"] / "tokenizer.json", paths["new"]):
            assert tokenizer_style(json.loads(path.read_text(encoding="utf-8")), path) == style
    # transformers' own Llama conversion: spaces replaced in the normalizer, no Prepend, no pre-tokenizer.
    converted = Tokenizer(models.BPE())
    converted.normalizer = normalizers.Replace(" ", SPACE)
    assert tokenizer_style(json.loads(converted.to_str()), Path("x")) == STYLE_SENTENCEPIECE
    wordpiece = json.loads(Tokenizer(models.WordPiece({"[UNK]": 0}, unk_token="[UNK]")).to_str())
    with pytest.raises(TokenizerError, match="a WordPiece model; merging needs a BPE"):
        tokenizer_style(wordpiece, Path("x"))
    plain = json.loads(Tokenizer(models.BPE()).to_str())
    with pytest.raises(TokenizerError, match="neither byte-level"):
        tokenizer_style(plain, Path("x"))


# ---------------------------------------------------------------------------------------------- merge


@pytest.mark.parametrize("style", STYLES)
def test_merge_keeps_every_base_id(tokenizers: dict[str, dict[str, Path]], merged: dict[str, Path], style: str) -> None:
    base_dir, out = tokenizers[style]["base"], merged[style]
    base, new, result = load_tokenizer(base_dir), load_tokenizer(tokenizers[style]["new"]), load_tokenizer(out)
    base_json = json.loads((base_dir / "tokenizer.json").read_text(encoding="utf-8"))
    out_json = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))

    assert result.tokens[: base.vocab_size] == base.tokens
    assert result.merges[: len(base.merges)] == base.merges and len(result.merges) > len(base.merges)
    assert out_json["added_tokens"] == base_json["added_tokens"]
    assert out_json["post_processor"] == base_json["post_processor"]
    highest = max(t["id"] for t in base_json["added_tokens"])
    # The added tokens join the model vocabulary at their ids (else tokenizers renumbers them on load).
    assert {t["content"]: t["id"] for t in base_json["added_tokens"]}.items() <= out_json["model"]["vocab"].items()
    new_ids = sorted(i for t, i in out_json["model"]["vocab"].items() if t not in set(base.tokens))
    assert new_ids == list(range(base.vocab_size, result.vocab_size)) and new_ids[0] > highest
    # New tokens in the addition's order; its special tokens are not carried over.
    new_added = {t["content"] for t in json.loads(tokenizers[style]["new"].read_text(encoding="utf-8"))["added_tokens"]}
    expected = [t for t in new.tokens if t not in set(base.tokens) | new_added]
    assert result.tokens[base.vocab_size :] == expected
    for a, b in result.merges[len(base.merges) :]:
        assert {a, b, a + b} <= out_json["model"]["vocab"].keys()
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).read_bytes() == (base_dir / name).read_bytes()
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert {int(i): e["content"] for i, e in config["added_tokens_decoder"].items()} == {
        t["id"]: t["content"] for t in out_json["added_tokens"]
    }
    assert check_tokenizer_json(base, result).ok


@pytest.mark.parametrize("style", STYLES)
def test_merged_loads_in_transformers(
    tokenizers: dict[str, dict[str, Path]],
    merged: dict[str, Path],
    style: str,
    en_lines: list[str],
    th_lines: list[str],
) -> None:
    base_hf, merged_hf = _auto(tokenizers[style]["base"]), _auto(merged[style])
    assert type(merged_hf) is type(base_hf)
    assert len(merged_hf) == load_tokenizer(merged[style]).vocab_size > len(base_hf)
    assert (merged_hf.bos_token_id, merged_hf.eos_token_id) == (base_hf.bos_token_id, base_hf.eos_token_id)
    english = en_lines[:3000]
    assert merged_hf(english)["input_ids"] == base_hf(english)["input_ids"]  # BOS included
    heldout = th_lines[-2000:]  # never seen in training
    base_th, merged_th = base_hf(heldout)["input_ids"], merged_hf(heldout)["input_ids"]
    assert sum(map(len, merged_th)) < sum(map(len, base_th)) / 2
    assert merged_hf.batch_decode(merged_th, skip_special_tokens=True) == heldout


@pytest.mark.parametrize("style", STYLES)
def test_fertility_drops_on_thai_only(
    tokenizers: dict[str, dict[str, Path]],
    merged: dict[str, Path],
    style: str,
    en_lines: list[str],
    th_lines: list[str],
) -> None:
    base, out = load_tokenizer(tokenizers[style]["base"]), load_tokenizer(merged[style])
    assert fertility(out, en_lines[:3000]) == fertility(base, en_lines[:3000])
    assert fertility(out, th_lines[-2000:]) < fertility(base, th_lines[-2000:]) / 2


def test_merge_strings_format_merges_stay_strings(tokenizers: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    # Files written by tokenizers < 0.20 hold merges as "a b" strings; the appended ones follow suit.
    base = tmp_path / "base"
    base.mkdir()
    data = json.loads((tokenizers[STYLE_BYTE_LEVEL]["base"] / "tokenizer.json").read_text(encoding="utf-8"))
    data["model"]["merges"] = [" ".join(m) for m in data["model"]["merges"]]
    (base / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    result = merge_tokenizer_json(base, tokenizers[STYLE_BYTE_LEVEL]["new"], tmp_path / "out")
    merges = json.loads((result.out / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"]
    assert all(isinstance(m, str) for m in merges) and len(merges) == len(data["model"]["merges"]) + result.merges_added
    assert result.merges_added > 0 and result.files == (tmp_path / "out" / "tokenizer.json",)


# ------------------------------------------------------------------------------------------ bad inputs


def _invoke(*args: Path | str) -> Any:
    return CliRunner().invoke(tokenizer_cli, [str(a) for a in args])


def _assert_refused(res: Any, message: str, tmp_path: Path, before: set[str]) -> None:
    assert res.exit_code == 1 and res.output.count("\n") == 1 and message in res.output, res.output
    assert res.output.startswith("Error: ")
    assert {p.name for p in tmp_path.iterdir()} == before  # nothing written, no temp folder left


def test_cli_refuses_bad_inputs(tokenizers: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    bl, sp = tokenizers[STYLE_BYTE_LEVEL], tokenizers[STYLE_SENTENCEPIECE]
    before = {p.name for p in tmp_path.iterdir()}
    _assert_refused(_invoke("merge", bl["base"], sp["new"], tmp_path / "o"), "cannot be merged into", tmp_path, before)
    _assert_refused(_invoke("merge", sp["base"], bl["new"], tmp_path / "o"), "cannot be merged into", tmp_path, before)

    junk = tmp_path / "junk.json"
    junk.write_text('{"hello": 1}', encoding="utf-8")
    before = {p.name for p in tmp_path.iterdir()}
    _assert_refused(_invoke("merge", bl["base"], junk, tmp_path / "o"), "not a valid tokenizer.json", tmp_path, before)
    _assert_refused(_invoke("merge", junk, bl["new"], tmp_path / "o"), "not a valid tokenizer.json", tmp_path, before)

    # A WordPiece tokenizer.json loads, but is no BPE to extend.
    wp = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    wp.save(str(tmp_path / "wp.json"))
    before = {p.name for p in tmp_path.iterdir()}
    _assert_refused(_invoke("merge", tmp_path / "wp.json", bl["new"], tmp_path / "o"), "WordPiece", tmp_path, before)

    # A GPT-2 folder cannot be the addition of a tokenizer.json base.
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "vocab.json").write_text('{"a": 0, "b": 1, "ab": 2}', encoding="utf-8")
    (gpt2 / "merges.txt").write_text("#version: 0.2\na b\n", encoding="utf-8")
    before = {p.name for p in tmp_path.iterdir()}
    _assert_refused(_invoke("merge", bl["base"], gpt2, tmp_path / "o"), "same style", tmp_path, before)


def test_cli_refuses_base_with_id_gap(tokenizers: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    # An added token past a gap: new ids "after the highest" would leave rows no token owns.
    base = tmp_path / "gap"
    base.mkdir()
    data = json.loads((tokenizers[STYLE_BYTE_LEVEL]["base"] / "tokenizer.json").read_text(encoding="utf-8"))
    top = max(t["id"] for t in data["added_tokens"])
    data["added_tokens"].append({**data["added_tokens"][-1], "id": top + 10, "content": "<|far|>"})
    (base / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    before = {p.name for p in tmp_path.iterdir()}
    res = _invoke("merge", base, tokenizers[STYLE_BYTE_LEVEL]["new"], tmp_path / "o")
    _assert_refused(res, "without gaps", tmp_path, before)


def test_cli_refuses_contradicting_config(tokenizers: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    src = tokenizers[STYLE_SENTENCEPIECE]["base"]
    base = tmp_path / "base"
    base.mkdir()
    for f in src.iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    config = json.loads((base / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["added_tokens_decoder"]["1"]["content"] = "<bos>"
    (base / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    before = {p.name for p in tmp_path.iterdir()}
    res = _invoke("merge", base, tokenizers[STYLE_SENTENCEPIECE]["new"], tmp_path / "o")
    _assert_refused(res, "gives id 1 to '<bos>' but", tmp_path, before)


def test_merge_output_is_refused_or_replaced(tokenizers: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    bl = tokenizers[STYLE_BYTE_LEVEL]
    (tmp_path / "o").mkdir()
    with pytest.raises(OutputExistsError):
        merge_tokenizer_json(bl["base"], bl["new"], tmp_path / "o")
    assert merge_tokenizer_json(bl["base"], bl["new"], tmp_path / "o", force=True).check.ok
    with pytest.raises(TokenizerError, match="holds an input tokenizer"):
        merge_tokenizer_json(bl["base"], bl["new"], bl["base"], force=True)
    assert _auto(bl["base"]) is not None  # the base is untouched


# ------------------------------------------------------------------------------------------------ CLI


@pytest.mark.parametrize("style", STYLES)
def test_cli_merge_and_check(
    tokenizers: dict[str, dict[str, Path]], style: str, tmp_path: Path, en_lines: list[str], th_lines: list[str]
) -> None:
    paths = tokenizers[style]
    out = tmp_path / "merged"
    res = _invoke("merge", paths["base"], paths["new"], out)
    assert res.exit_code == 0, res.output
    base, result = load_tokenizer(paths["base"]), load_tokenizer(out)
    added = result.vocab_size - base.vocab_size
    assert f"merged tokenizer written to {out}\nadded {added} tokens and " in res.output
    assert f"vocab size (as NeMo counts it): {result.vocab_size} (base {base.vocab_size})" in res.output
    assert f"ids preserved: all {base.vocab_size} base tokens keep their ids and all {len(base.merges)}" in res.output
    assert f"tokens in {out})" in res.output
    assert sorted(p.name for p in out.iterdir()) == [
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]

    en, th = tmp_path / "en.txt", tmp_path / "th.txt"
    en.write_text("\n".join(en_lines[:1000]) + "\n", encoding="utf-8")
    th.write_text("\n".join(th_lines[-500:]) + "\n", encoding="utf-8")
    res = _invoke("check", paths["base"], out, "--text", en, "--text", th)
    assert res.exit_code == 0, res.output
    assert res.output.startswith(f"ids preserved: all {base.vocab_size} base tokens keep their ids")
    assert f"{en}: 0 of 1000 lines (0.0%) encode differently" in res.output
    pairs = zip(base.encode_batch(th_lines[-500:]), result.encode_batch(th_lines[-500:]), strict=True)
    differ = sum(b != m for b, m in pairs)
    assert differ > 400
    assert f"{th}: {differ} of 500 lines ({differ / 5:.1f}%) encode differently" in res.output


def _rewrite(src: Path, dst: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    dst.mkdir()
    data = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    change(data)
    (dst / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return dst


@pytest.mark.parametrize("style", STYLES)
def test_cli_check_catches_changes(
    tokenizers: dict[str, dict[str, Path]], merged: dict[str, Path], style: str, tmp_path: Path
) -> None:
    base = tokenizers[style]["base"]

    def swap_ids(data: dict[str, Any]) -> None:
        vocab = data["model"]["vocab"]
        a, b = sorted(vocab, key=vocab.__getitem__)[300:302]
        vocab[a], vocab[b] = vocab[b], vocab[a]

    def swap_merges(data: dict[str, Any]) -> None:
        m = data["model"]["merges"]
        m[3], m[4] = m[4], m[3]

    def unspecial(data: dict[str, Any]) -> None:
        data["added_tokens"][-1]["special"] = False

    cases = {"ids": (swap_ids, "2 of"), "merges": (swap_merges, "2 of"), "added": (unspecial, "1 base pieces")}
    for name, (change, message) in cases.items():
        broken = _rewrite(merged[style], tmp_path / name, change)
        res = _invoke("check", base, broken)
        assert res.exit_code == 1 and "ids NOT preserved" in res.output and message in res.output, (name, res.output)
        assert not check_tokenizer_json(load_tokenizer(base), load_tokenizer(broken)).ok
    res = _invoke("check", base, tmp_path / "nothing")
    assert res.exit_code == 1 and res.output.count("\n") == 1 and "no such file or folder" in res.output


# ------------------------------------------------------------------------------------------------ FVT


def _hand_tokenizer(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]], style: str) -> Path:
    folder.mkdir()
    if style == STYLE_BYTE_LEVEL:
        tk = Tokenizer(models.BPE(vocab, merges))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
    else:
        tk = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
        tk.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
        tk.add_special_tokens(SP_SPECIALS)
    tk.save(str(folder / "tokenizer.json"))
    return folder


def test_pieces_byte_level_hand_checked(tmp_path: Path) -> None:
    b2u = bytes_to_unicode()
    ko = "ก".encode()  # E0 B8 81
    base_tokens = [*(b2u[b] for b in range(256)), "th", "Ġth"]
    base_merges = [("t", "h"), ("Ġ", "th")]
    partial = b2u[ko[0]] + b2u[ko[1]]
    new_tokens = ["the", "Ġthe", partial, partial + b2u[ko[2]]]
    merges = [*base_merges, ("th", "e"), ("Ġth", "e"), (b2u[ko[0]], b2u[ko[1]]), (partial, b2u[ko[2]])]
    base_vocab = {t: i for i, t in enumerate(base_tokens)}
    base = load_tokenizer(_hand_tokenizer(tmp_path / "b", base_vocab, base_merges, STYLE_BYTE_LEVEL))
    vocab = {t: i for i, t in enumerate([*base_tokens, *new_tokens])}
    merged = load_tokenizer(_hand_tokenizer(tmp_path / "m", vocab, merges, STYLE_BYTE_LEVEL))
    th, space_th = base_vocab["th"], base_vocab["Ġth"]
    assert pieces_under_json(base, merged, range(258, 262)) == [
        [th, ord("e")],  # "the" -> th + e (a byte's id is its value here)
        [space_th, ord("e")],  # " the" -> Ġth + e
        [0xE0, 0xB8],  # two bytes of a three-byte character
        [0xE0, 0xB8, 0x81],  # "ก" in bytes
    ]
    assert pieces_under_json(base, base, range(0, 3)) == [[0], [1], [2]]
    with pytest.raises(TokenizerError, match="outside"):
        pieces_under_json(base, merged, range(258, 263))


def test_pieces_sentencepiece_hand_checked(tmp_path: Path) -> None:
    letters = [SPACE, "t", "h", "e"]
    base_tokens = [*SP_SPECIALS, *SP_BYTES, *letters, "th", f"{SPACE}th"]
    base_merges = [("t", "h"), (SPACE, "th")]
    new_tokens = [f"{SPACE}the", "the", f"{SPACE}ก", "ก"]
    merges = [*base_merges, (f"{SPACE}th", "e"), ("th", "e"), (SPACE, "ก")]
    base_vocab = {t: i for i, t in enumerate(base_tokens)}
    base = load_tokenizer(_hand_tokenizer(tmp_path / "b", base_vocab, base_merges, STYLE_SENTENCEPIECE))
    vocab = {t: i for i, t in enumerate([*base_tokens, *new_tokens])}
    merged = load_tokenizer(_hand_tokenizer(tmp_path / "m", vocab, merges, STYLE_SENTENCEPIECE))

    def byte(b: int) -> int:
        return 3 + b  # <unk> <s> </s>, then <0x00>..<0xFF>

    n = len(base_tokens)
    assert pieces_under_json(base, merged, range(n, n + 4)) == [
        [base_vocab[f"{SPACE}th"], base_vocab["e"]],  # "▁the": one prefix space, not a second one
        [base_vocab["th"], base_vocab["e"]],  # "the" inside a word: no prefix space added
        [base_vocab[SPACE], byte(0xE0), byte(0xB8), byte(0x81)],  # "▁ก": ก falls back to its bytes
        [byte(0xE0), byte(0xB8), byte(0x81)],
    ]
    # The full tokenizer would have prefixed a ▁: "the" -> ▁th e; the pieces keep the token's own text.
    assert base.encode("the") == [base_vocab[f"{SPACE}th"], base_vocab["e"]]
    assert pieces_under_json(base, merged, range(1, 2)) == [[]]  # a special token has no pieces


@pytest.mark.parametrize("style", STYLES)
def test_pieces_spell_each_new_token(
    tokenizers: dict[str, dict[str, Path]], merged: dict[str, Path], style: str
) -> None:
    base, out = load_tokenizer(tokenizers[style]["base"]), load_tokenizer(merged[style])
    new_ids = range(base.vocab_size, out.vocab_size)
    pieces = pieces_under_json(base, out, new_ids)
    assert len(pieces) == len(new_ids) and all(pieces)
    for i, ids in zip(new_ids, pieces, strict=True):
        assert all(j < base.vocab_size for j in ids)
        assert b"".join(base.token_bytes(j) for j in ids) == out.token_bytes(i)


@pytest.mark.parametrize("style", STYLES)
def test_pieces_under_splits_tokenizer_json_by_its_model(
    tokenizers: dict[str, dict[str, Path]], merged: dict[str, Path], style: str
) -> None:
    """FVT's entry point: between two tokenizer.json files each new token is spelled by base tokens as the
    base's BPE model splits it, with no second "▁" from a SentencePiece-style normalizer."""
    base, out = load_tokenizer(tokenizers[style]["base"]), load_tokenizer(merged[style])
    new_ids = range(base.vocab_size, out.vocab_size)
    pieces = pieces_under(base, out, new_ids)
    assert pieces == pieces_under_json(base, out, new_ids)
    for i, ids in zip(new_ids, pieces, strict=True):
        assert b"".join(base.token_bytes(j) for j in ids) == out.token_bytes(i)


# ---------------------------------------------------------------------------------- a shipped tokenizer


def _shipped_tokenizers() -> list[Path]:
    """tokenizer.json files and SentencePiece BPE models (``*.model*``: mistral-common ships
    ``tokenizer.model.v1``) that installed packages ship; none of them written by this project."""
    import sentencepiece as spm

    found = []
    for root in sorted({p for p in sys.path if p.endswith("site-packages")}):
        for dirpath, _, files in os.walk(root):
            for name in files:
                path = Path(dirpath) / name
                if name == "tokenizer.json":
                    found.append(path)
                elif ".model" in name and path.stat().st_size > 1000:
                    try:  # other packages' .model files (CRF taggers, ...) are no SentencePiece models
                        sp = spm.SentencePieceProcessor(model_file=str(path))
                    except (OSError, RuntimeError):
                        continue
                    if sp.is_byte(sp.piece_to_id("<0x41>")):  # a BPE with byte fallback, as Llama 2's
                        found.append(path)
    return sorted(found)


def _as_hf_folder(shipped: Path, folder: Path) -> Path:
    if shipped.name == "tokenizer.json":
        return shipped.parent
    from transformers import LlamaTokenizerFast

    # transformers' own conversion of a Llama 2 / Mistral SentencePiece model into a tokenizer.json.
    LlamaTokenizerFast(vocab_file=str(shipped), legacy=True).save_pretrained(str(folder))
    return folder


def test_shipped_tokenizer_round_trip(
    tokenizers: dict[str, dict[str, Path]], tmp_path: Path, en_lines: list[str], th_lines: list[str]
) -> None:
    shipped = _shipped_tokenizers()
    if not shipped:
        pytest.skip("no installed package ships a tokenizer.json or a SentencePiece BPE model (mistral-common does)")
    for k, path in enumerate(shipped[:2]):
        base_dir = _as_hf_folder(path, tmp_path / f"base{k}")
        style = tokenizer_style(json.loads((base_dir / "tokenizer.json").read_text(encoding="utf-8")), path)
        result = merge_tokenizer_json(base_dir, tokenizers[style]["new"], tmp_path / f"merged{k}")
        assert result.check.ok and result.tokens_added > 0, path
        base_hf, merged_hf = _auto(base_dir), _auto(result.out)
        assert len(merged_hf) == len(base_hf) + result.tokens_added == result.vocab_size
        english, thai = en_lines[:2000], th_lines[-1000:]
        assert merged_hf(english)["input_ids"] == base_hf(english)["input_ids"], path
        merged_th = merged_hf(thai)["input_ids"]
        assert sum(map(len, merged_th)) < sum(map(len, base_hf(thai)["input_ids"])), path
        assert merged_hf.batch_decode(merged_th, skip_special_tokens=True) == thai
        pieces = pieces_under_json(
            load_tokenizer(base_dir), load_tokenizer(result.out), range(len(base_hf), len(merged_hf))
        )
        assert all(pieces) and max(max(p) for p in pieces) < len(base_hf)
