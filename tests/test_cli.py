"""CLI behaviour without NeMo: exit codes, one-line messages, dry runs, and one test per bad input."""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from conftest import invoke_cli, sources_unchanged

from nemo_vocab_ext.checkpoint import DISTRIBUTED, Checkpoint
from nemo_vocab_ext.cli import main
from nemo_vocab_ext.formats.nemo import embed_tokenizer
from nemo_vocab_ext.io import Format, load_checkpoint, save_checkpoint
from nemo_vocab_ext.tokenization.train import train_bpe

HIDDEN = 8


def english() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tok")
    return {
        name: train_bpe(english(), root / name, size) for name, size in (("small", 300), ("base", 400), ("large", 600))
    }


def make_nemo(path: Path, tokenizer: Path, *, rows: int = 512, tied: bool = True, nan: bool = False) -> Path:
    g = torch.Generator().manual_seed(0)
    tensors: dict = {"model.embedding.word_embeddings.weight": torch.randn(rows, HIDDEN, generator=g)}
    if not tied:
        tensors["model.output_layer.weight"] = torch.randn(rows, HIDDEN, generator=g)
    tensors["model.decoder.final_layernorm.weight"] = torch.ones(HIDDEN)
    if nan:
        tensors["model.decoder.final_layernorm.weight"][3] = float("nan")
    config = {
        "make_vocab_size_divisible_by": 128,
        "tensor_model_parallel_size": 1,
        "share_embeddings_and_output_weights": tied,
        "tokenizer": {"library": "megatron", "type": "GPT2BPETokenizer"},
    }
    ckpt = embed_tokenizer(
        Checkpoint(tensors, config, DISTRIBUTED),
        {"vocab_file": tokenizer / "vocab.json", "merge_file": tokenizer / "merges.txt"},
    )
    save_checkpoint(ckpt, path, Format.NEMO)
    return path


def run(*args: object) -> Result:
    return invoke_cli(*args)


@pytest.fixture()
def base_nemo(tmp_path: Path, tokenizers: dict[str, Path]) -> Path:
    return make_nemo(tmp_path / "base.nemo", tokenizers["base"], tied=False)


def test_inspect_json_fields(base_nemo: Path) -> None:
    result = run("inspect", base_nemo, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    expected_keys = {
        "format", "layout", "embedding_rows", "hidden_size", "tied", "has_output_layer", "tokenizer_vocab_size",
        "padded_vocab_size", "make_vocab_size_divisible_by", "tensor_model_parallel_size",
        "pipeline_model_parallel_size", "num_tensors", "num_parameters",
    }  # fmt: skip
    assert expected_keys <= set(info)
    assert (info["tokenizer_vocab_size"], info["padded_vocab_size"], info["embedding_rows"]) == (400, 512, 512)
    assert info["num_parameters"] == 2 * 512 * HIDDEN + HIDDEN and info["tied"] is False


def test_resize_dry_run_prints_the_plan_and_writes_nothing(
    base_nemo: Path, tokenizers: dict[str, Path], tmp_path: Path
) -> None:
    dst = tmp_path / "out.nemo"
    result = run(
        "resize", base_nemo, dst, "--tokenizer", tokenizers["large"], "--init", "mean", "--tp", "2", "--dry-run"
    )
    assert result.exit_code == 0, result.output
    assert "tokenizer size: 400 -> 600" in result.output and "rows: 512 -> 768" in result.output
    assert (
        "rows [400, 512) old padding (dropped)" in result.output and "rows [400, 600) new tokens: mean" in result.output
    )
    assert "TP2: 512 -> 768" in result.output and "TP4: 512 -> 1024" in result.output
    assert not dst.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["base.nemo"]


@pytest.mark.parametrize("dry_run", [True, False])
@pytest.mark.parametrize(
    ("damage", "messages"),
    [
        ("swap two ids", ("2 of 400 base token ids moved", "the pretrained rows would be scrambled")),
        # The plan counts the tokens only; the full read, beside the copy, finds two on one id.
        ("share an id", ("share id 11; every id needs one token",)),
    ],
)
def test_resize_refuses_a_tokenizer_that_moves_base_ids(
    base_nemo: Path, tokenizers: dict[str, Path], tmp_path: Path, dry_run: bool, damage: str, messages: tuple[str, ...]
) -> None:
    # The tokenizers are read and checked while the copy runs; a failed check stops it, as before it.
    moved = tmp_path / "moved"
    moved.mkdir()
    vocab = json.loads((tokenizers["large"] / "vocab.json").read_text(encoding="utf-8"))
    a, b = (t for t, i in vocab.items() if i in (10, 11))
    vocab[a], vocab[b] = (vocab[b], vocab[a]) if damage == "swap two ids" else (11, 11)
    (moved / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (moved / "merges.txt").write_bytes((tokenizers["large"] / "merges.txt").read_bytes())
    dst = tmp_path / "out.nemo"
    result = run("resize", base_nemo, dst, "--tokenizer", moved, *(["--dry-run"] if dry_run else []))
    assert result.exit_code == 1, result.output
    assert all(m in result.output for m in messages) and len(result.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.nemo", "moved"]  # no output, no temporary


def test_resize_writes_config_and_artifacts_for_the_new_tokenizer(
    base_nemo: Path, tokenizers: dict[str, Path], tmp_path: Path
) -> None:
    dst = tmp_path / "out.nemo"
    result = run("resize", base_nemo, dst, "--tokenizer", tokenizers["large"], "--init", "normal")
    assert result.exit_code == 0, result.output
    old_table = load_checkpoint(base_nemo)[0].tensors["model.embedding.word_embeddings.weight"]
    assert isinstance(old_table, torch.Tensor)
    assert f"model.output_layer.weight: [512, {HIDDEN}] -> [640, {HIDDEN}]" in result.output
    out, _ = load_checkpoint(dst)
    assert torch.equal(out.tensors["model.embedding.word_embeddings.weight"][:400], old_table[:400])
    assert out.tensors["model.embedding.word_embeddings.weight"].shape == (640, HIDDEN)
    assert out.tensors["model.output_layer.weight"].shape == (640, HIDDEN)
    vocab_ref = out.config["tokenizer"]["vocab_file"]
    assert out.artifacts[vocab_ref.removeprefix("nemo:")] == (tokenizers["large"] / "vocab.json").read_bytes()
    assert len(out.artifacts) == 2  # the old tokenizer's artifacts are replaced, not kept beside
    assert run("validate", dst).exit_code == 0


def test_resize_clears_stale_override_vocab_size(tokenizers: dict[str, Path], tmp_path: Path) -> None:
    src = make_nemo(tmp_path / "b.nemo", tokenizers["base"])
    ckpt, _ = load_checkpoint(src)
    ckpt.config["override_vocab_size"] = 512
    save_checkpoint(ckpt, src, Format.NEMO, force=True)
    assert run("resize", src, tmp_path / "o.nemo", "--tokenizer", tokenizers["large"]).exit_code == 0
    out, _ = load_checkpoint(tmp_path / "o.nemo")
    assert "override_vocab_size" not in out.config


def test_shrink_needs_the_flag(base_nemo: Path, tokenizers: dict[str, Path], tmp_path: Path) -> None:
    result = run("resize", base_nemo, tmp_path / "o.nemo", "--tokenizer", tokenizers["small"])
    assert result.exit_code == 1
    assert "100 trained rows would be dropped" in result.output and "--allow-shrink" in result.output
    assert not (tmp_path / "o.nemo").exists()
    ok = run("resize", base_nemo, tmp_path / "o.nemo", "--tokenizer", tokenizers["small"], "--allow-shrink")
    assert ok.exit_code == 0, ok.output
    assert load_checkpoint(tmp_path / "o.nemo")[0].tensors["model.embedding.word_embeddings.weight"].shape[0] == 384


def test_destination_exists_needs_force(base_nemo: Path, tmp_path: Path) -> None:
    dst = tmp_path / "x.safetensors"
    dst.write_text("keep me")
    result = run("convert", base_nemo, dst)
    assert result.exit_code == 1 and "pass --force" in result.output and dst.read_text() == "keep me"
    forced = run("convert", base_nemo, dst, "--force")
    assert forced.exit_code == 0 and "%" not in forced.output  # no progress bar when stderr is not a terminal


def test_nan_weights_fail_validation(tokenizers: dict[str, Path], tmp_path: Path) -> None:
    bad = make_nemo(tmp_path / "nan.nemo", tokenizers["base"], nan=True)
    result = run("validate", bad, "--json")
    report = json.loads(result.output)
    assert result.exit_code == 1 and not report["ok"]
    (finite,) = [c for c in report["checks"] if c["name"] == "finite"]
    assert not finite["ok"] and "model.decoder.final_layernorm.weight" in finite["message"]


def test_wrong_key_names_are_named(tokenizers: dict[str, Path], tmp_path: Path) -> None:
    src = make_nemo(tmp_path / "k.nemo", tokenizers["base"])
    ckpt, _ = load_checkpoint(src)
    ckpt.tensors["model.embed.weight"] = ckpt.tensors.pop("model.embedding.word_embeddings.weight")
    save_checkpoint(ckpt, src, Format.NEMO, force=True)
    result = run("inspect", src)
    assert result.exit_code == 1
    assert "no word-embedding tensor found" in result.output and "model.embed.weight" in result.output
    assert "Traceback" not in result.output


def test_pickle_that_would_run_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, (f"touch {marker}",))

    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": Evil()}, ckpt)
    result = run("inspect", ckpt)
    assert result.exit_code == 1 and "would run code" in result.output and "posix.system" in result.output
    complex_ckpt = tmp_path / "complex.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2, dtype=torch.complex64)}}, complex_ckpt)
    result = run("inspect", complex_ckpt)  # torch's own inert names: unsupported, not unsafe
    assert result.exit_code == 1 and "holds torch.ComplexFloatStorage tensors" in result.output
    assert "would run code" not in result.output
    # A torch zip written by hand (not by torch.save) whose pickle names os.system itself: the zip is
    # read, and the restricted unpickler refuses the name before anything is called.
    by_hand = tmp_path / "by_hand.ckpt"
    call = f"touch {marker}".encode()
    data = b"\x80\x02cos\nsystem\nX" + len(call).to_bytes(4, "little") + call + b"\x85R."
    with zipfile.ZipFile(by_hand, "w") as archive:
        archive.writestr("archive/data.pkl", data)
        archive.writestr("archive/version", "3\n")
    result = run("inspect", by_hand)
    assert result.exit_code == 1 and "references os.system" in result.output and "would run code" in result.output
    raw = tmp_path / "raw.ckpt"  # a bare pickle, not torch's zip format: refused as such, never unpickled
    raw.write_bytes(pickle.dumps({"state_dict": {}, "hyper_parameters": Evil()}))
    result = run("inspect", raw)
    assert result.exit_code == 1 and "not a torch.save file" in result.output
    assert not marker.exists()


def test_a_changed_source_byte_is_noticed(base_nemo: Path) -> None:
    with pytest.raises(AssertionError, match="was modified"), sources_unchanged(base_nemo, base_nemo.parent):
        data = bytearray(base_nemo.read_bytes())
        data[-1] ^= 1
        base_nemo.write_bytes(bytes(data))


def test_usage_errors_exit_2_and_debug_shows_traceback(base_nemo: Path, tmp_path: Path) -> None:
    assert run("resize", base_nemo, tmp_path / "o.nemo").exit_code == 2  # neither --tokenizer nor --vocab-size
    assert run("convert", base_nemo, tmp_path / "o.bin").exit_code == 1  # format not inferable
    broken = tmp_path / "broken.nemo"
    broken.write_bytes(b"not a tar")
    plain = run("inspect", broken)
    assert plain.exit_code == 1 and plain.output.count("\n") == 1 and str(broken) in plain.output
    debug = CliRunner().invoke(main, ["--debug", "inspect", str(broken)])
    assert debug.exception is not None and type(debug.exception).__name__ == "CheckpointFormatError"


def test_vocab_size_without_tokenizer(base_nemo: Path, tmp_path: Path) -> None:
    result = run("resize", base_nemo, tmp_path / "o.nemo", "--vocab-size", "1000", "--init", "mean")
    assert result.exit_code == 0, result.output
    assert load_checkpoint(tmp_path / "o.nemo")[0].tensors["model.embedding.word_embeddings.weight"].shape[0] == 1024


def test_cli_never_imports_nemo_or_megatron(base_nemo: Path, tokenizers: dict[str, Path], tmp_path: Path) -> None:
    """Conversion, validation and resize work on a machine without the NeMo stack; inspecting,
    converting and resizing (every init) import neither torch (about 3 s of each command) nor
    omegaconf (0.08 s; a .nemo's config is dumped by libyaml)."""
    import subprocess
    import sys

    nemo_stack = ("nemo", "megatron", "megatron.core", "apex")
    commands = [
        (["inspect", str(base_nemo)], False),
        (["convert", str(base_nemo), str(tmp_path / "a.safetensors")], False),
        (
            [
                "resize",
                str(tmp_path / "a.safetensors"),
                str(tmp_path / "b.nemo"),
                "--tokenizer",
                str(tokenizers["large"]),
            ],
            False,
        ),
        (["resize", str(base_nemo), str(tmp_path / "c.nemo"), "--vocab-size", "700", "--init", "normal"], False),
        (["validate", str(tmp_path / "b.nemo")], True),  # reads tensor values with torch
    ]
    outputs = []
    with sources_unchanged(base_nemo, tokenizers["large"]):
        for args, needs_torch in commands:
            blocked = nemo_stack if needs_torch else (*nemo_stack, "torch", "omegaconf")
            run_cli = (
                f"import sys; sys.modules.update(dict.fromkeys({blocked!r})); "
                "from nemo_vocab_ext.cli import main; main()"
            )
            done = subprocess.run([sys.executable, "-c", run_cli, *args], capture_output=True, text=True)
            assert done.returncode == 0, (args, done.stderr)
            outputs.append(done.stdout)
    assert "init 'fvt'" in outputs[2] and "fvt fallbacks to mean: 0" in outputs[2]  # the CLI's default init
