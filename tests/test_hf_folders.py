"""Hugging Face model folders: tiny Llama, Mistral, Qwen2 and GPT-2 models built and saved by transformers,
resized by the CLI, and loaded back by transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import english_texts, invoke_cli, sources_unchanged, tree_digest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2TokenizerFast,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from harness.sentencepiece_style import sentencepiece_model

THAI = [
    "สวัสดีครับ ภาษาไทย ทดสอบ ประเทศไทย",
    "กรุงเทพมหานคร เป็นเมืองหลวงของประเทศไทย",
    "การเรียนรู้ภาษาใหม่ ต้องใช้เวลา และความตั้งใจ",
]
BASE_TEXT = "The tokenizer splits text into tokens; every token has a row in the embedding table."


def _byte_level_bpe(texts: list[str], size: int, specials: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    return tok


@pytest.fixture(scope="module")
def english_bpe() -> Tokenizer:
    return _byte_level_bpe(english_texts()[:200], 400, ["<|endoftext|>"])


@pytest.fixture(scope="module")
def thai_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("th_tok")
    _byte_level_bpe(THAI * 20, 330, []).save(str(out / "tokenizer.json"))
    return out


def _config(kind: str, vocab: int, tied: bool) -> PretrainedConfig:
    small = {"vocab_size": vocab, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2}
    heads = {"num_attention_heads": 2, "num_key_value_heads": 1}
    if kind == "llama":
        return LlamaConfig(**small, **heads, tie_word_embeddings=tied)
    if kind == "mistral":
        return MistralConfig(**small, **heads, tie_word_embeddings=tied, sliding_window=None)
    if kind == "qwen2":
        return Qwen2Config(**small, **heads, tie_word_embeddings=tied)
    return GPT2Config(vocab_size=vocab, n_embd=16, n_layer=1, n_head=2, n_positions=64, tie_word_embeddings=tied)


def _save_model(folder: Path, kind: str, tied: bool, english_bpe: Tokenizer, *, shard: bool) -> Path:
    """A transformers-built model with random weights and its tokenizer, saved by transformers."""
    cls = GPT2TokenizerFast if kind in ("gpt2", "qwen2") else PreTrainedTokenizerFast
    tokenizer = cls(tokenizer_object=english_bpe, eos_token="<|endoftext|>")
    if kind == "qwen2":  # as Qwen2's: added tokens in tokenizer.json that vocab.json lacks
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(kind, len(tokenizer), tied))
    if kind == "mistral":  # as most released models: bfloat16 on disk
        model = model.to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="30KB" if shard else "5GB")
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def make_model(tmp_path_factory: pytest.TempPathFactory, english_bpe: Tokenizer) -> Callable[..., Path]:
    made: dict[tuple[str, bool, bool], Path] = {}

    def make(kind: str, *, tied: bool = False, shard: bool = False) -> Path:
        key = (kind, tied, shard)
        if key not in made:
            folder = tmp_path_factory.mktemp(f"{kind}_{'tied' if tied else 'untied'}{'_sharded' if shard else ''}")
            made[key] = _save_model(folder / "model", kind, tied, english_bpe, shard=shard)
        return made[key]

    return make


def _merged(model: Path, thai_tokenizer: Path, tmp_path: Path) -> Path:
    merged = tmp_path / "merged"
    result = invoke_cli("tokenizer", "merge", model / "tokenizer.json", thai_tokenizer, merged)
    assert result.exit_code == 0, result.output
    return merged


def _load(folder: Path) -> torch.nn.Module:
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, torch_dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


def _fvt_rows(
    table: torch.Tensor, base_tokenizer: Path, merged_tokenizer: Path, old_vocab: int, dtype: torch.dtype
) -> torch.Tensor:
    """Each new token's row by fvt's definition: the mean (in float64, rounded once to the stored
    ``dtype``) of the rows of the pieces the base BPE model splits the token's byte-level string into."""
    base = Tokenizer.from_file(str(base_tokenizer / "tokenizer.json")).model
    merged = Tokenizer.from_file(str(merged_tokenizer / "tokenizer.json"))
    rows = []
    for i in range(old_vocab, merged.get_vocab_size()):
        pieces = [t.id for t in base.tokenize(merged.id_to_token(i))]
        rows.append(table[pieces].double().mean(0).to(dtype).float())
    return torch.stack(rows)


CASES = [
    ("llama", False, False),
    ("llama", True, True),
    ("mistral", False, True),
    ("qwen2", True, False),
    ("gpt2", True, True),
]


@pytest.mark.parametrize(("kind", "tied", "shard"), CASES)
@pytest.mark.parametrize("init", ["fvt", "mean"])
def test_resize_loads_in_transformers(
    kind: str, tied: bool, shard: bool, init: str, make_model: Callable[..., Path], thai_tokenizer: Path, tmp_path: Path
) -> None:
    src = make_model(kind, tied=tied, shard=shard)
    merged = _merged(src, thai_tokenizer, tmp_path)
    out = tmp_path / "out"
    result = invoke_cli("resize", src, out, "--tokenizer", merged, "--init", init)
    assert result.exit_code == 0, result.output

    base, new = _load(src), _load(out)  # as float32: bfloat16 values exactly
    stored = getattr(torch, json.loads((src / "config.json").read_text())["torch_dtype"])
    old_vocab = base.get_input_embeddings().weight.shape[0]
    new_vocab = Tokenizer.from_file(str(merged / "tokenizer.json")).get_vocab_size()
    assert new_vocab > old_vocab
    assert json.loads((out / "config.json").read_text())["vocab_size"] == new_vocab  # no padding by default
    tables = [("input", base.get_input_embeddings().weight, new.get_input_embeddings().weight)]
    if not tied:
        tables.append(("output", base.get_output_embeddings().weight, new.get_output_embeddings().weight))
    else:
        assert new.get_output_embeddings().weight.data_ptr() == new.get_input_embeddings().weight.data_ptr()
    for name, old_table, new_table in tables:
        assert new_table.shape == (new_vocab, old_table.shape[1]), name
        assert torch.equal(_bits(new_table[:old_vocab]), _bits(old_table)), name
        if init == "mean":
            expected = old_table.double().mean(0).to(stored).float().expand(new_vocab - old_vocab, -1)
        else:
            expected = _fvt_rows(old_table, src, merged, old_vocab, stored)
        assert torch.equal(_bits(new_table[old_vocab:]), _bits(expected)), name

    ids = torch.tensor([Tokenizer.from_file(str(src / "tokenizer.json")).encode(BASE_TEXT).ids])
    with torch.no_grad():
        old_logits, new_logits = base(ids).logits, new(ids).logits
    assert torch.equal(_bits(new_logits[..., :old_vocab]), _bits(old_logits))

    # Every other tensor and file is carried over; shards keep their names.
    new_state, tables_named = (
        new.state_dict(),
        {"model.embed_tokens.weight", "transformer.wte.weight", "lm_head.weight"},
    )
    for key, value in base.state_dict().items():
        if key not in tables_named:
            assert value.dtype == new_state[key].dtype and torch.equal(value, new_state[key]), key
    before, after = tree_digest(src), tree_digest(out)
    assert set(after) - set(before) == set()
    changed = {name for name in before if before[name] != after.get(name)}
    tokenizer_files = {"tokenizer.json", "vocab.json", "merges.txt"}
    assert (
        {"config.json"}
        <= changed
        <= {"config.json", "model.safetensors.index.json", *tokenizer_files}
        | {n for n in before if n.endswith(".safetensors")}
    )
    if kind in ("gpt2", "qwen2"):  # the base's slow-tokenizer files would describe the old vocabulary
        assert "vocab.json" not in after and "merges.txt" not in after
    assert (out / "tokenizer.json").read_bytes() == (merged / "tokenizer.json").read_bytes()
    assert new.generation_config.to_dict() == base.generation_config.to_dict()


def test_sharded_index_rewritten(make_model: Callable[..., Path], thai_tokenizer: Path, tmp_path: Path) -> None:
    src = make_model("llama", tied=True, shard=True)
    out = tmp_path / "out"
    assert invoke_cli("resize", src, out, "--tokenizer", _merged(src, thai_tokenizer, tmp_path)).exit_code == 0
    old_index = json.loads((src / "model.safetensors.index.json").read_text())
    new_index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(old_index["weight_map"].values())) > 1
    assert new_index["weight_map"] == old_index["weight_map"]
    shards = sorted(set(new_index["weight_map"].values()))
    assert new_index["metadata"]["total_size"] == sum(_tensor_bytes(out / s) for s in shards)
    embedding_shard = old_index["weight_map"]["model.embed_tokens.weight"]
    for shard in shards:  # shards without a vocabulary table are byte for byte the same
        if shard != embedding_shard:
            assert (out / shard).read_bytes() == (src / shard).read_bytes()


def test_every_shard_is_copied_before_a_table_is_awaited_and_each_table_is_written_once_computed(
    make_model: Callable[..., Path], thai_tokenizer: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An untied folder's writer copies every shard's stored entries before it waits for any table (the
    embedding's rows are computed after the output layer's shard is begun), then takes each table as
    soon as its rows are computed (the embedding's shard is complete before the output layer's rows
    are); the folder is the same bit for bit."""
    import nemo_vocab_ext.core.resize as core_resize
    import nemo_vocab_ext.formats.hf_folder as hf_folder

    src = make_model("mistral", tied=False, shard=True)
    weight_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    embedding_shard, head_shard = weight_map["model.embed_tokens.weight"], weight_map["lm_head.weight"]
    assert embedding_shard < head_shard  # written first
    merged = _merged(src, thai_tokenizer, tmp_path)
    expected = tmp_path / "expected"
    assert invoke_cli("resize", src, expected, "--tokenizer", merged).exit_code == 0

    events: list[str] = []
    head_copied, embedding_written = threading.Event(), threading.Event()
    compute_rows, shard_writer = core_resize.rows_after_kept, hf_folder.shard_writer

    def computes(*args: Any, **kwargs: Any) -> Any:
        # Each waits (at most 10 s) for what the writer must have done without it.
        (embedding_written if events.count("table computed") else head_copied).wait(10)
        rows = compute_rows(*args, **kwargs)
        events.append("table computed")
        return rows

    def writes(path: Path, *args: Any) -> Generator[None, None, None]:
        steps = shard_writer(path, *args)
        next(steps)
        if path.name == head_shard:
            events.append("output layer's shard copied")
            head_copied.set()
        yield
        next(steps, None)
        if path.name == embedding_shard:
            events.append("embedding's shard written")
            embedding_written.set()

    monkeypatch.setattr(core_resize, "rows_after_kept", computes)
    monkeypatch.setattr(hf_folder, "shard_writer", writes)
    out = tmp_path / "out"
    result = invoke_cli("resize", src, out, "--tokenizer", merged)
    assert result.exit_code == 0, result.output
    assert events == [
        "output layer's shard copied",
        "table computed",
        "embedding's shard written",
        "table computed",
    ]
    assert tree_digest(out) == tree_digest(expected)


def _tensor_bytes(shard: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(shard), "pt") as f:
        return sum(f.get_tensor(k).nbytes for k in f.keys())  # noqa: SIM118 (safe_open is no mapping)


def test_pad_to_multiple_of(make_model: Callable[..., Path], thai_tokenizer: Path, tmp_path: Path) -> None:
    src = make_model("qwen2", tied=True)
    merged = _merged(src, thai_tokenizer, tmp_path)
    out = tmp_path / "out"
    result = invoke_cli("resize", src, out, "--tokenizer", merged, "--pad-to-multiple-of", "64", "--init", "mean")
    assert result.exit_code == 0, result.output
    new_vocab = Tokenizer.from_file(str(merged / "tokenizer.json")).get_vocab_size()
    rows = -(-new_vocab // 64) * 64
    assert rows > new_vocab
    assert f"-> {rows} (pad_to_multiple_of=64)" in result.output and "tensor parallel" not in result.output
    model = _load(out)
    table = model.get_input_embeddings().weight
    assert table.shape[0] == rows == model.config.vocab_size
    old = _load(src).get_input_embeddings().weight
    assert torch.equal(_bits(table[new_vocab:]), _bits(old.double().mean(0).float().expand(rows - new_vocab, -1)))


def test_inspect_and_validate(make_model: Callable[..., Path], thai_tokenizer: Path, tmp_path: Path) -> None:
    src = make_model("llama")
    result = invoke_cli("inspect", src, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    vocab = len(json.loads((src / "tokenizer.json").read_text())["model"]["vocab"])
    assert info["format"] == "hf" and info["architecture"] == "LlamaForCausalLM"
    assert (info["embedding_rows"], info["tokenizer_vocab_size"], info["tied"]) == (vocab, vocab, False)

    result = invoke_cli("validate", src, "--tp", "2", "--divisible-by", "64", "--json")
    assert result.exit_code == 0, result.output
    rows_check = next(c for c in json.loads(result.output)["checks"] if c["name"] == "embedding rows")
    assert f"Megatron pads {vocab} to {-(-vocab // 128) * 128} at TP=2, divisible by 64" in rows_check["message"]

    merged = _merged(src, thai_tokenizer, tmp_path)
    result = invoke_cli("validate", src, "--tokenizer", merged)
    assert result.exit_code == 1
    assert "✗ embedding rows" in result.output


def _refused(args: list[object], message: str, tmp_path: Path) -> None:
    """The console script ends with one line naming ``message``, exit code 1, nothing written, the source untouched."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "nemo_vocab_ext.cli", *map(str, args[:2]), str(out), *map(str, args[2:])]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    with sources_unchanged(Path(str(args[1]))):
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 1 and not done.stdout, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], done.stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def _copy(src: Path, tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    return dst


def test_folder_without_config(make_model: Callable[..., Path], thai_tokenizer: Path, tmp_path: Path) -> None:
    broken = _copy(make_model("llama"), tmp_path)
    (broken / "config.json").unlink()
    _refused(["resize", broken, "--tokenizer", thai_tokenizer], "needs its config.json", tmp_path)


def test_index_names_missing_shard(make_model: Callable[..., Path], thai_tokenizer: Path, tmp_path: Path) -> None:
    broken = _copy(make_model("llama", shard=True), tmp_path)
    (broken / "model-00002-of-00003.safetensors").unlink()
    _refused(
        ["resize", broken, "--vocab-size", "500", "--init", "mean"], "shard listed in the index is missing", tmp_path
    )


def test_shard_header_disagrees_with_index(make_model: Callable[..., Path], tmp_path: Path) -> None:
    broken = _copy(make_model("llama", shard=True), tmp_path)
    index_path = broken / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first, second = sorted(set(index["weight_map"].values()))[:2]
    moved = next(k for k, v in index["weight_map"].items() if v == first)
    index["weight_map"][moved] = second
    index_path.write_text(json.dumps(index))
    _refused(["resize", broken, "--vocab-size", "500", "--init", "mean"], "header disagrees", tmp_path)


@pytest.mark.parametrize("metadata", ["../../secret.txt", None, [1]])
def test_index_metadata_not_a_mapping(make_model: Callable[..., Path], tmp_path: Path, metadata: object) -> None:
    """A resize rewrites the index's metadata.total_size: metadata of another type is refused when read."""
    broken = _copy(make_model("llama", shard=True), tmp_path)
    index_path = broken / "model.safetensors.index.json"
    index_path.write_text(json.dumps({**json.loads(index_path.read_text()), "metadata": metadata}))
    _refused(["resize", broken, "--vocab-size", "500", "--init", "mean"], "'metadata' is a", tmp_path)


def test_unknown_architecture(make_model: Callable[..., Path], tmp_path: Path) -> None:
    broken = _copy(make_model("llama"), tmp_path)
    config = json.loads((broken / "config.json").read_text())
    config["architectures"] = ["FalconForCausalLM"]
    (broken / "config.json").write_text(json.dumps(config))
    _refused(["resize", broken, "--vocab-size", "500", "--init", "mean"], "FalconForCausalLM", tmp_path)
    result = invoke_cli("inspect", broken)
    assert result.exit_code == 1 and "FalconForCausalLM" in result.output


def test_tokenizer_larger_than_table(make_model: Callable[..., Path], thai_tokenizer: Path, tmp_path: Path) -> None:
    """The folder's own tokenizer has more tokens than its table has rows."""
    src = make_model("llama")
    broken = _copy(src, tmp_path)
    merged = _merged(src, thai_tokenizer, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((merged / name).read_bytes())
    _refused(["resize", broken, "--tokenizer", merged, "--init", "mean"], "rows", tmp_path)


def test_megatron_padding_options_refused(make_model: Callable[..., Path], tmp_path: Path) -> None:
    src = make_model("llama")
    _refused(["resize", src, "--vocab-size", "600", "--init", "mean", "--tp", "2"], "--pad-to-multiple-of", tmp_path)
    _refused(["resize", src, "--vocab-size", "600", "--init", "mean", "--to", "nemo"], "Hugging Face", tmp_path)


def test_convert_to_another_format_refused(make_model: Callable[..., Path], tmp_path: Path) -> None:
    src = make_model("llama")
    result = invoke_cli("convert", src, tmp_path / "out.nemo")
    assert result.exit_code == 1 and "Hugging Face" in result.output
    assert list(tmp_path.iterdir()) == []


def test_folder_without_safetensors(make_model: Callable[..., Path], tmp_path: Path) -> None:
    broken = _copy(make_model("llama"), tmp_path)
    (broken / "model.safetensors").rename(broken / "pytorch_model.bin")
    _refused(["resize", broken, "--vocab-size", "500", "--init", "mean"], "without model.safetensors", tmp_path)


def test_sentencepiece_llama(tmp_path: Path) -> None:
    """A Llama whose tokenizer is tokenizer.model alone, grown by a merged SentencePiece model."""
    from transformers import LlamaTokenizer

    english = [line for text in english_texts()[:100] for line in text.splitlines() if line.strip()]
    base_sp = sentencepiece_model(english, tmp_path / "en", 400)
    new_sp = sentencepiece_model(THAI * 20, tmp_path / "th", 300)
    src = tmp_path / "base"
    tokenizer = LlamaTokenizer(vocab_file=str(base_sp))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_config("llama", len(tokenizer), False)).save_pretrained(src)
    tokenizer.save_pretrained(src)
    assert (src / "tokenizer.model").is_file() and not (src / "tokenizer.json").exists()
    merged = tmp_path / "merged.model"
    assert invoke_cli("tokenizer", "merge", src / "tokenizer.model", new_sp, merged).exit_code == 0

    out = tmp_path / "out"
    for init in ("fvt", "mean"):
        result = invoke_cli("resize", src, out, "--tokenizer", merged, "--init", init, "--force")
        assert result.exit_code == 0, result.output
    assert (out / "tokenizer.model").read_bytes() == merged.read_bytes()
    base, new = _load(src), _load(out)
    new_vocab = LlamaTokenizer(vocab_file=str(merged)).vocab_size
    for old_table, new_table in (
        (base.get_input_embeddings().weight, new.get_input_embeddings().weight),
        (base.get_output_embeddings().weight, new.get_output_embeddings().weight),
    ):
        old_vocab = old_table.shape[0]
        assert new_table.shape[0] == new_vocab > old_vocab
        assert torch.equal(_bits(new_table[:old_vocab]), _bits(old_table))
        expected = old_table.double().mean(0).float().expand(new_vocab - old_vocab, -1)
        assert torch.equal(_bits(new_table[old_vocab:]), _bits(expected))


def test_shrink_and_moved_ids_refused(make_model: Callable[..., Path], thai_tokenizer: Path, tmp_path: Path) -> None:
    src = make_model("llama", tied=True)
    _refused(["resize", src, "--vocab-size", "100", "--init", "mean"], "--allow-shrink", tmp_path)
    # A tokenizer trained alone gives the base's ids to other tokens.
    args = ["resize", src, "--tokenizer", thai_tokenizer / "tokenizer.json", "--allow-shrink", "--init", "mean"]
    _refused(args, "scrambled", tmp_path)


def test_shrink_to_kept_rows(make_model: Callable[..., Path], tmp_path: Path) -> None:
    """A shrink computes no row at all (no padding): the work beside the copy still runs."""
    src = make_model("llama", tied=True)
    out = tmp_path / "out"
    result = invoke_cli("resize", src, out, "--vocab-size", 100, "--init", "mean", "--allow-shrink")
    assert result.exit_code == 0, result.output
    old, new = _load(src).get_input_embeddings().weight, _load(out).get_input_embeddings().weight
    assert new.shape[0] == 100 and torch.equal(_bits(new), _bits(old[:100]))


def test_tied_model_storing_its_output_layer(make_model: Callable[..., Path], tmp_path: Path) -> None:
    """A tied model whose file holds lm_head.weight too (a copy of the embedding): both are resized alike."""
    from safetensors.torch import load_file, save_file

    folder = _copy(make_model("llama", tied=True), tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    info = json.loads(invoke_cli("inspect", folder, "--json").output)
    assert info["tied"] is True
    out = tmp_path / "out"
    result = invoke_cli("resize", folder, out, "--vocab-size", 450, "--init", "mean")
    assert result.exit_code == 0, result.output
    resized = load_file(str(out / "model.safetensors"))
    assert resized["lm_head.weight"].shape[0] == 450
    assert torch.equal(_bits(resized["lm_head.weight"]), _bits(resized["model.embed_tokens.weight"]))
    model = _load(out)
    assert torch.equal(_bits(model.get_input_embeddings().weight), _bits(resized["model.embed_tokens.weight"]))


def test_gpt2_merged_as_vocab_and_merges(make_model: Callable[..., Path], thai_tokenizer: Path, tmp_path: Path) -> None:
    """GPT-2's folder merged as vocab.json + merges.txt: the base's tokenizer.json (the old vocabulary) is
    dropped, and transformers builds the tokenizer of the table's size from the merged files."""
    from transformers import AutoTokenizer

    src = make_model("gpt2", tied=True, shard=True)
    merged = tmp_path / "merged"
    assert invoke_cli("tokenizer", "merge", src, thai_tokenizer, merged).exit_code == 0
    assert not (merged / "tokenizer.json").exists()
    out = tmp_path / "out"
    result = invoke_cli("resize", src, out, "--tokenizer", merged)
    assert result.exit_code == 0, result.output
    assert "removed the base's tokenizer.json" in result.output and not (out / "tokenizer.json").exists()
    assert len(AutoTokenizer.from_pretrained(out)) == _load(out).get_input_embeddings().weight.shape[0]


def test_weights_in_other_forms_left_behind(make_model: Callable[..., Path], tmp_path: Path) -> None:
    """PyTorch weights beside the safetensors hold the old vocabulary: the resized folder leaves them out."""
    folder = _copy(make_model("llama", tied=True), tmp_path)
    (folder / "pytorch_model.bin").write_bytes(b"old weights")
    (folder / "original").mkdir()
    (folder / "original" / "params.json").write_text("{}")
    out = tmp_path / "out"
    result = invoke_cli("resize", folder, out, "--vocab-size", 450, "--init", "mean")
    assert result.exit_code == 0, result.output
    assert "not carried over (weights in other forms, with the old vocabulary): pytorch_model.bin" in result.output
    assert not (out / "pytorch_model.bin").exists()
    assert (out / "original" / "params.json").read_text() == "{}"
    _load(out)
