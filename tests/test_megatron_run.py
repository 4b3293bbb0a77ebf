"""Megatron-LM run folders written by megatron-core's own ``dist_checkpointing.save`` (on the CPU), read
by the run-folder adapter: tables against torch's own DCP reader, args mapped, bad folders refused."""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import BASE_VOCAB, LARGER_VOCAB, invoke_cli

from harness.megatron_run import as_bridge_run
from harness.tiny import cpu_env
from nemo_vocab_ext.checkpoint import DISTRIBUTED
from nemo_vocab_ext.core.sizes import padded_vocab_size
from nemo_vocab_ext.entries import tensor_meta
from nemo_vocab_ext.errors import CheckpointFormatError, ConfigError, UnsafeCheckpointError
from nemo_vocab_ext.formats.byteio import link_or_copy
from nemo_vocab_ext.formats.dcp_records import MetadataIndex
from nemo_vocab_ext.formats.megatron_run import (
    EMBEDDING_KEY,
    OUTPUT_LAYER_KEY,
    RUN_CONFIG,
    TRACKER_FILE,
    common_with_vocab_rows,
    find_iteration,
    is_megatron_run,
    iteration_folder_name,
    read_megatron_run,
)
from nemo_vocab_ext.formats.torch_dist import COMMON_FILE, read_metadata, read_torch_dist

HIDDEN = 64
ITERATION = 10
DIVISIBLE_BY = 128
TP2_VOCAB = 600  # pads to 640 rows at TP1 and 768 at TP2: the row count shows the TP it was built for


def megatron(out: Path, *flags: str, nproc: int = 1, pp: int = 1) -> Path:
    """``harness.megatron_run`` (megatron-core itself) in a fresh process, so that its CPU patches stay
    out of this one; under torchrun with ``nproc`` ranks: ``pp`` pipeline stages of ``nproc // pp``
    tensor-parallel ranks each."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    parallel = ["--tp", str(nproc // pp), "--pp", str(pp)]
    argv = [*launcher, "-m", "harness.megatron_run", str(out), *parallel, "--hidden", str(HIDDEN), *flags]
    env = cpu_env(out.parent / "hf_home")
    done = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def generate(out: Path, *flags: str, nproc: int = 1, pp: int = 1) -> Path:
    """A run folder saved by megatron-core."""
    return megatron(out, "--iteration", str(ITERATION), "--divisible-by", str(DIVISIBLE_BY), *flags, nproc=nproc, pp=pp)


def megatron_loads(
    folder: Path, out: Path, rows: int, tying: str, nproc: int = 1, pp: int = 1
) -> dict[str, torch.Tensor]:
    """What megatron-core's ``dist_checkpointing.load`` gives a ``GPTModel`` of ``rows`` vocabulary rows at
    TP ``nproc // pp``, PP ``pp`` loading ``folder``: the model saved again after loading, read back as
    global tensors (a tied last stage's copy of the embedding under ``output_layer.weight``)."""
    megatron(out, f"--{tying}", "--load", str(folder), "--rows", str(rows), nproc=nproc, pp=pp)
    return {k: v for k, v in read_torch_dist(out).items() if isinstance(v, torch.Tensor)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, base_tokenizer: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("megatron_runs")
    common = ["--vocab-size", str(BASE_VOCAB), "--tokenizer", str(base_tokenizer)]
    return {
        "tied": generate(root / "tied", "--tied", *common),
        "untied": generate(root / "untied", "--untied", *common),
    }


def dcp_tensor(folder: Path, key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """``key`` as torch's own distributed-checkpoint reader loads it (every shard joined)."""
    import torch.distributed.checkpoint as dcp

    state = {key: torch.empty(shape)}
    dcp.load(state, checkpoint_id=str(folder), no_dist=True)
    return state[key]


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / run.name))


@pytest.mark.parametrize("tying", ["tied", "untied"])
def test_tables_and_args_of_a_tp1_run(runs: dict[str, Path], base_tokenizer: Path, tying: str) -> None:
    ckpt = read_megatron_run(runs[tying])
    rows = padded_vocab_size(BASE_VOCAB, DIVISIBLE_BY, 1)
    assert ckpt.layout == DISTRIBUTED
    keys = ckpt.tensor_keys()
    assert EMBEDDING_KEY in keys and not any(k.startswith("model.") for k in keys)
    assert (OUTPUT_LAYER_KEY in keys) == (tying == "untied")
    folder = runs[tying] / iteration_folder_name(ITERATION)
    for key in [EMBEDDING_KEY, OUTPUT_LAYER_KEY] if tying == "untied" else [EMBEDDING_KEY]:
        meta = tensor_meta(ckpt.tensors, key)
        assert meta is not None and meta[0] == (rows, HIDDEN)
        assert torch.equal(ckpt.tensors[key], dcp_tensor(folder, key, (rows, HIDDEN)))  # type: ignore[arg-type]
    if tying == "untied":  # two tables, trained apart: not one stored twice
        assert not torch.equal(ckpt.tensors[EMBEDDING_KEY], ckpt.tensors[OUTPUT_LAYER_KEY])  # type: ignore[arg-type]
    config = ckpt.config
    assert config["padded_vocab_size"] == rows
    assert config["make_vocab_size_divisible_by"] == DIVISIBLE_BY
    assert config["tensor_model_parallel_size"] == 1 and config["pipeline_model_parallel_size"] == 1
    assert config["share_embeddings_and_output_weights"] is (tying == "tied")
    assert config["hidden_size"] == HIDDEN
    tokenizer = config["tokenizer"]
    assert tokenizer["library"] == "megatron" and tokenizer["type"] == "GPT2BPETokenizer"
    for key, name in (("vocab_file", "vocab.json"), ("merge_file", "merges.txt")):
        assert ckpt.artifacts[tokenizer[key].removeprefix("nemo:")] == (base_tokenizer / name).read_bytes()
    state = ckpt.training_state
    assert state["iteration"] == ITERATION and state["release"] is False
    assert state["dist_common"] == (folder / COMMON_FILE).read_bytes()
    assert isinstance(state["common"]["args"], argparse.Namespace)


def test_an_iteration_folder_reads_as_its_run(runs: dict[str, Path]) -> None:
    run = runs["untied"]
    folder = run / iteration_folder_name(ITERATION)
    assert is_megatron_run(run) and is_megatron_run(folder)
    assert find_iteration(run).folder == folder and find_iteration(folder).iteration == ITERATION
    whole, one = read_megatron_run(run), read_megatron_run(folder)
    assert whole.tensor_keys() == one.tensor_keys() and whole.config == one.config


def test_common_pt_written_back_with_new_rows_loads_as_megatron_wrote_it(runs: dict[str, Path]) -> None:
    folder = runs["untied"] / iteration_folder_name(ITERATION)
    ckpt = read_megatron_run(folder)
    rows = padded_vocab_size(LARGER_VOCAB, DIVISIBLE_BY, 1)
    written = common_with_vocab_rows(ckpt.training_state["common"], rows)
    # torch's full unpickler, megatron importable: the enums and dtypes come back as megatron's own.
    original = torch.load(folder / COMMON_FILE, weights_only=False)
    loaded = torch.load(io.BytesIO(written), weights_only=False)
    assert loaded["args"].padded_vocab_size == rows != original["args"].padded_vocab_size
    loaded["args"].padded_vocab_size = original["args"].padded_vocab_size
    assert loaded == original


def test_a_nemo_style_folder_is_not_a_run(runs: dict[str, Path], tmp_path: Path) -> None:
    weights = shutil.copytree(runs["tied"] / iteration_folder_name(ITERATION), tmp_path / "model_weights")
    assert not is_megatron_run(weights)


def test_refuses_a_tracker_naming_a_missing_iteration(runs: dict[str, Path], tmp_path: Path) -> None:
    run = copy_run(runs["tied"], tmp_path)
    (run / TRACKER_FILE).write_text("20")
    with pytest.raises(CheckpointFormatError, match=iteration_folder_name(20)):
        read_megatron_run(run)
    (run / TRACKER_FILE).write_text("latest")
    with pytest.raises(CheckpointFormatError, match="iteration number or 'release'"):
        read_megatron_run(run)


def test_refuses_a_run_without_tracker(runs: dict[str, Path], tmp_path: Path) -> None:
    run = copy_run(runs["tied"], tmp_path)
    (run / TRACKER_FILE).unlink()
    with pytest.raises(CheckpointFormatError, match=iteration_folder_name(ITERATION)):
        read_megatron_run(run)


def test_refuses_an_iteration_without_common_pt(runs: dict[str, Path], tmp_path: Path) -> None:
    run = copy_run(runs["tied"], tmp_path)
    (run / iteration_folder_name(ITERATION) / COMMON_FILE).unlink()
    with pytest.raises(CheckpointFormatError, match="common.pt is missing"):
        read_megatron_run(run)


def test_refuses_metadata_naming_an_absent_shard(runs: dict[str, Path], tmp_path: Path) -> None:
    run = copy_run(runs["tied"], tmp_path)
    shards = sorted((run / iteration_folder_name(ITERATION)).glob("*.distcp"))
    shards[-1].unlink()
    with pytest.raises(CheckpointFormatError, match=f"{shards[-1].name}.*missing"):
        read_megatron_run(run)


def test_refuses_common_pt_that_would_run_code(runs: dict[str, Path], tmp_path: Path) -> None:
    run = copy_run(runs["tied"], tmp_path)
    common = run / iteration_folder_name(ITERATION) / COMMON_FILE
    torch.save({"args": argparse.Namespace(hook=os.system), "iteration": ITERATION}, common)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        read_megatron_run(run)


def bridge_style(run: Path, model: dict[str, object]) -> Path:
    """``run`` as Megatron-Bridge leaves it, its tokenizer named as a Hugging Face one."""
    return as_bridge_run(run, model, {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": "gpt2"})


def test_bridge_run_config_maps_onto_the_config(runs: dict[str, Path], tmp_path: Path) -> None:
    model = {
        "vocab_size": BASE_VOCAB,
        "should_pad_vocab": True,
        "make_vocab_size_divisible_by": DIVISIBLE_BY,
        "tensor_model_parallel_size": 1,
        "pipeline_model_parallel_size": 1,
        "share_embeddings_and_output_weights": False,
        "hidden_size": HIDDEN,
    }
    config = read_megatron_run(bridge_style(copy_run(runs["untied"], tmp_path), model)).config
    assert config["make_vocab_size_divisible_by"] == DIVISIBLE_BY and config["vocab_size"] == BASE_VOCAB
    assert config["share_embeddings_and_output_weights"] is False
    assert config["tokenizer"]["library"] == "huggingface" and config["tokenizer"]["type"] == "gpt2"


def test_bridge_preset_vocab_size_is_not_padded(runs: dict[str, Path], tmp_path: Path) -> None:
    model = {"vocab_size": 512, "should_pad_vocab": False, "make_vocab_size_divisible_by": DIVISIBLE_BY}
    config = read_megatron_run(bridge_style(copy_run(runs["tied"], tmp_path), model)).config
    assert config["make_vocab_size_divisible_by"] == 1


def test_refuses_a_run_without_any_config(runs: dict[str, Path], tmp_path: Path) -> None:
    run = bridge_style(copy_run(runs["tied"], tmp_path), {})
    (run / iteration_folder_name(ITERATION) / RUN_CONFIG).unlink()
    with pytest.raises(ConfigError, match="no model config"):
        read_megatron_run(run)


@pytest.mark.nemo  # slow: two megatron-core processes under torchrun
def test_tp2_run_joins_row_shards(tmp_path: Path) -> None:
    run = generate(tmp_path / "run", "--untied", "--vocab-size", str(TP2_VOCAB), nproc=2)
    folder = run / iteration_folder_name(ITERATION)
    assert len(list(folder.glob("__1_*.distcp"))) > 0  # the second rank wrote its own shards
    ckpt = read_megatron_run(run)
    rows = padded_vocab_size(TP2_VOCAB, DIVISIBLE_BY, 2)
    assert rows != padded_vocab_size(TP2_VOCAB, DIVISIBLE_BY, 1)
    assert ckpt.config["tensor_model_parallel_size"] == 2 and ckpt.config["padded_vocab_size"] == rows
    for key in (EMBEDDING_KEY, OUTPUT_LAYER_KEY):
        table = ckpt.tensors[key]
        assert isinstance(table, torch.Tensor) and table.shape == (rows, HIDDEN)
        assert torch.equal(table, dcp_tensor(folder, key, (rows, HIDDEN)))


# --- the CLI on run folders ------------------------------------------------------------------


@pytest.mark.parametrize("tying", ["tied", "untied"])
def test_inspect_a_run_folder_and_its_iteration_folder(runs: dict[str, Path], tying: str) -> None:
    for path in (runs[tying], runs[tying] / iteration_folder_name(ITERATION)):
        result = invoke_cli("inspect", path, "--json")
        assert result.exit_code == 0, result.output
        info = json.loads(result.output)
        assert info["format"] == "megatron" and info["embedding_key"] == EMBEDDING_KEY
        assert info["embedding_rows"] == padded_vocab_size(BASE_VOCAB, DIVISIBLE_BY, 1)
        assert info["tokenizer_vocab_size"] == BASE_VOCAB and info["tied"] is (tying == "tied")


def test_validate_a_run_folder_against_a_larger_tokenizer(runs: dict[str, Path], larger_tokenizer: Path) -> None:
    own = invoke_cli("validate", runs["untied"])
    assert own.exit_code == 0 and own.output.rstrip().endswith("ok"), own.output
    larger = invoke_cli("validate", runs["untied"], "--tokenizer", larger_tokenizer, "--json")
    assert larger.exit_code == 1
    checks = {c["name"]: c for c in json.loads(larger.output)["checks"]}
    rows = checks.pop("embedding rows")
    assert not rows["ok"] and f"needs {padded_vocab_size(LARGER_VOCAB, DIVISIBLE_BY, 1)}" in rows["message"]
    assert checks["ids preserved"]["ok"] and all(c["ok"] for c in checks.values())


def test_a_folder_of_iterations_without_tracker_is_named_as_such(runs: dict[str, Path], tmp_path: Path) -> None:
    run = copy_run(runs["tied"], tmp_path)
    (run / TRACKER_FILE).unlink()
    result = invoke_cli("inspect", run)
    assert result.exit_code == 1 and TRACKER_FILE in result.output and iteration_folder_name(ITERATION) in result.output


# --- resize into a new run folder ------------------------------------------------------------


def check_resized(source: Path, loaded: dict[str, torch.Tensor], old_vocab: int, rows: int) -> None:
    """``loaded`` (what megatron-core read from the resized run) against the source iteration folder: old
    rows bit-identical, new rows (tokens and padding) the mean of the old real rows (computed here, in
    float64, as the 'mean' init defines it), every other tensor bit-identical."""
    before = {k: v for k, v in read_torch_dist(source).items() if isinstance(v, torch.Tensor)}
    assert loaded and set(loaded) <= set(before)
    for key, tensor in loaded.items():
        old = before[key]
        if key in (EMBEDDING_KEY, OUTPUT_LAYER_KEY):
            assert tensor.shape == (rows, HIDDEN) and old.shape[0] != rows
            assert torch.equal(tensor[:old_vocab].view(torch.int32), old[:old_vocab].view(torch.int32))
            mean = old[:old_vocab].double().mean(dim=0).float()
            torch.testing.assert_close(tensor[old_vocab:], mean.expand(rows - old_vocab, HIDDEN), rtol=1e-6, atol=1e-7)
        else:
            assert tensor.dtype == old.dtype and torch.equal(tensor.view(torch.uint8), old.view(torch.uint8)), key


def check_run_written(run: Path, resized: Path, tokenizer: Path, rows: int) -> Path:
    """The resized run's folder: same iteration, the source's data files hard linked (same inode), the
    tables' kept rows in the source's chunks and their new rows in one new file, args and tokenizer
    describing the new tables. Returns its iteration folder."""
    source, folder = run / iteration_folder_name(ITERATION), resized / iteration_folder_name(ITERATION)
    assert (resized / TRACKER_FILE).read_text() == str(ITERATION)
    shards = sorted(source.glob("*.distcp"))
    for shard in shards:
        assert (folder / shard.name).stat().st_ino == shard.stat().st_ino, f"{shard.name} copied, not linked"
    new = [p for p in folder.glob("*.distcp") if p.name not in {s.name for s in shards}]
    assert len(new) == 1 and new[0].stat().st_nlink == 1
    metadata = read_metadata(folder)
    for key in (EMBEDDING_KEY, OUTPUT_LAYER_KEY):
        if key not in metadata.state_dict_metadata:
            continue
        for chunk in metadata.state_dict_metadata[key].chunks:
            file = metadata.storage_data[MetadataIndex(key, chunk.offsets)].relative_path
            kept = chunk.offsets[0] < BASE_VOCAB
            assert (file != new[0].name) == kept, f"{key} rows from {chunk.offsets[0]} in {file}"
            assert not kept or chunk.offsets[0] + chunk.sizes[0] <= BASE_VOCAB  # the old padding is not kept
    args = torch.load(folder / COMMON_FILE, weights_only=False)["args"]
    assert args.padded_vocab_size == rows
    for name in ("vocab.json", "merges.txt"):
        assert (folder / "tokenizer" / name).read_bytes() == (tokenizer / name).read_bytes()
    return folder


@pytest.mark.parametrize("tying", ["tied", "untied"])
def test_resized_run_loads_in_megatron_core(
    runs: dict[str, Path], larger_tokenizer: Path, tmp_path: Path, tying: str
) -> None:
    run, resized = runs[tying], tmp_path / "resized"
    rows = padded_vocab_size(LARGER_VOCAB, DIVISIBLE_BY, 1)
    result = invoke_cli("resize", run, resized, "--tokenizer", larger_tokenizer, "--init", "mean", "--verify")
    assert result.exit_code == 0, result.output
    folder = check_run_written(run, resized, larger_tokenizer, rows)
    assert invoke_cli("inspect", resized, "--json").exit_code == 0
    assert invoke_cli("validate", resized).exit_code == 0  # its own tokenizer now fits its tables
    loaded = megatron_loads(folder, tmp_path / "loaded", rows, tying)
    check_resized(run / iteration_folder_name(ITERATION), loaded, BASE_VOCAB, rows)


def test_optimizer_state_is_refused_or_dropped(base_tokenizer: Path, larger_tokenizer: Path, tmp_path: Path) -> None:
    run = generate(tmp_path / "run", "--tied", "--optimizer-state", "--tokenizer", str(base_tokenizer))
    refused = invoke_cli("resize", run, tmp_path / "out", "--tokenizer", larger_tokenizer, "--init", "mean")
    assert refused.exit_code == 1 and len(refused.output.strip().splitlines()) == 1
    assert "--drop-optimizer" in refused.output and "--no-load-optim" in refused.output
    assert not (tmp_path / "out").exists()
    dropped = invoke_cli(
        "resize", run, tmp_path / "out", "--tokenizer", larger_tokenizer, "--init", "mean", "--drop-optimizer"
    )
    assert dropped.exit_code == 0, dropped.output
    folder = tmp_path / "out" / iteration_folder_name(ITERATION)
    assert not [k for k in read_megatron_run(folder).tensors if k.startswith("optimizer")]
    assert "optimizer" not in torch.load(folder / COMMON_FILE, weights_only=False)
    assert "optimizer" in torch.load(run / iteration_folder_name(ITERATION) / COMMON_FILE, weights_only=False)


def _missing_iteration(run: Path) -> None:
    (run / TRACKER_FILE).write_text("20")


def _missing_common(run: Path) -> None:
    (run / iteration_folder_name(ITERATION) / COMMON_FILE).unlink()


def _absent_shard(run: Path) -> None:
    sorted((run / iteration_folder_name(ITERATION)).glob("*.distcp"))[-1].unlink()


def _another_format(run: Path) -> None:
    shutil.rmtree(run)
    run.mkdir()
    (run / "weights.bin").write_bytes(b"\0" * 64)


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        (_missing_iteration, "iter_0000020"),
        (_missing_common, "common.pt is missing"),
        (_absent_shard, "missing; the checkpoint is incomplete"),
        (_another_format, "neither"),
    ],
)
def test_resize_refuses_a_bad_run_in_one_line(
    runs: dict[str, Path], larger_tokenizer: Path, tmp_path: Path, damage: object, said: str
) -> None:
    run = copy_run(runs["tied"], tmp_path)
    damage(run)  # type: ignore[operator]
    result = invoke_cli("resize", run, tmp_path / "out", "--tokenizer", larger_tokenizer, "--init", "mean")
    assert result.exit_code == 1 and said in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.nemo  # slow: megatron-core processes under torchrun
@pytest.mark.parametrize("tying", ["tied", "untied"])
def test_tp2_run_resized_loads_at_tp2_and_tp1(
    base_tokenizer: Path, larger_tokenizer: Path, tmp_path: Path, tying: str
) -> None:
    run = generate(
        tmp_path / "run", f"--{tying}", "--vocab-size", str(BASE_VOCAB), "--tokenizer", str(base_tokenizer), nproc=2
    )
    assert list((run / iteration_folder_name(ITERATION)).glob("__1_*.distcp"))  # each rank saved its rows
    rows = padded_vocab_size(LARGER_VOCAB, DIVISIBLE_BY, 2)
    result = invoke_cli("resize", run, tmp_path / "resized", "--tokenizer", larger_tokenizer, "--init", "mean")
    assert result.exit_code == 0, result.output
    folder = check_run_written(run, tmp_path / "resized", larger_tokenizer, rows)
    for nproc in (2, 1):  # the TP it was saved with, and another
        loaded = megatron_loads(folder, tmp_path / f"loaded_tp{nproc}", rows, tying, nproc=nproc)
        check_resized(run / iteration_folder_name(ITERATION), loaded, BASE_VOCAB, rows)


@pytest.mark.nemo  # slow: megatron-core processes under torchrun
@pytest.mark.parametrize("tying", ["tied", "untied"])
def test_pp2_run_resized_loads_at_pp2(base_tokenizer: Path, larger_tokenizer: Path, tmp_path: Path, tying: str) -> None:
    tokenizer = ["--vocab-size", str(BASE_VOCAB), "--tokenizer", str(base_tokenizer)]
    run = generate(tmp_path / "run", f"--{tying}", *tokenizer, nproc=2, pp=2)  # two stages, TP1 each
    source = run / iteration_folder_name(ITERATION)
    assert list(source.glob("__1_*.distcp"))  # the last stage saved its own part
    shown = invoke_cli("inspect", run, "--json")
    assert shown.exit_code == 0, shown.output
    info = json.loads(shown.output)
    assert info["pipeline_model_parallel_size"] == 2 and info["tensor_model_parallel_size"] == 1
    assert info["embedding_rows"] == padded_vocab_size(BASE_VOCAB, DIVISIBLE_BY, 1) and info["hidden_size"] == HIDDEN
    assert info["tied"] is (tying == "tied") and info["has_output_layer"] is (tying == "untied")
    rows = padded_vocab_size(LARGER_VOCAB, DIVISIBLE_BY, 1)
    result = invoke_cli(
        "resize", run, tmp_path / "resized", "--tokenizer", larger_tokenizer, "--init", "mean", "--verify"
    )
    assert result.exit_code == 0, result.output
    folder = check_run_written(run, tmp_path / "resized", larger_tokenizer, rows)
    assert read_megatron_run(folder).config["pipeline_model_parallel_size"] == 2
    loaded = megatron_loads(folder, tmp_path / "loaded", rows, tying, nproc=2, pp=2)
    if tying == "tied":  # the last stage's copy, stored once under the embedding's key: it loaded the same rows
        copy = loaded.pop(OUTPUT_LAYER_KEY)
        assert torch.equal(copy.view(torch.int32), loaded[EMBEDDING_KEY].view(torch.int32))
    check_resized(source, loaded, BASE_VOCAB, rows)


def test_bridge_run_resized_records_the_new_vocab_size(
    runs: dict[str, Path], larger_tokenizer: Path, tmp_path: Path
) -> None:
    model = {"vocab_size": BASE_VOCAB, "should_pad_vocab": True, "make_vocab_size_divisible_by": DIVISIBLE_BY}
    run = bridge_style(copy_run(runs["tied"], tmp_path), model)
    folder = run / iteration_folder_name(ITERATION)
    torch.save({"step": torch.tensor(ITERATION)}, folder / "train_state.pt")
    shutil.copyfile(folder / "train_state.pt", run / "latest_train_state.pt")
    result = invoke_cli("resize", run, tmp_path / "resized", "--tokenizer", larger_tokenizer, "--init", "mean")
    assert result.exit_code == 0, result.output
    written = tmp_path / "resized" / iteration_folder_name(ITERATION)
    run_config = yaml.safe_load((written / RUN_CONFIG).read_text())
    assert run_config["model"] == {**model, "vocab_size": LARGER_VOCAB}
    assert run_config["tokenizer"] == yaml.safe_load((folder / RUN_CONFIG).read_text())["tokenizer"]
    assert (written / "train_state.pt").read_bytes() == (folder / "train_state.pt").read_bytes()
    assert (tmp_path / "resized" / "latest_train_state.pt").is_file()
    assert read_megatron_run(tmp_path / "resized").config["vocab_size"] == LARGER_VOCAB


def test_link_or_copy_copies_where_it_cannot_link(tmp_path: Path) -> None:
    other = Path("/dev/shm")
    if not other.is_dir() or other.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second file system to link across")
    source = tmp_path / "__0_0.distcp"
    source.write_bytes(os.urandom(3 << 20))
    linked, copied = tmp_path / "linked.distcp", other / f"copied_{os.getpid()}.distcp"
    try:
        link_or_copy(source, linked)
        link_or_copy(source, copied)  # across file systems: os.link fails with EXDEV
        assert linked.stat().st_ino == source.stat().st_ino
        assert copied.stat().st_ino != source.stat().st_ino and copied.read_bytes() == source.read_bytes()
    finally:
        copied.unlink(missing_ok=True)


# --- convert ---------------------------------------------------------------------------------


def test_iteration_folder_to_nemo_and_back_bit_exact(runs: dict[str, Path], tmp_path: Path) -> None:
    source = runs["untied"] / iteration_folder_name(ITERATION)
    nemo, back = tmp_path / "run.nemo", tmp_path / "back"
    for args in (("convert", source, nemo), ("convert", nemo, back, "--to", "megatron")):
        result = invoke_cli(*args, "--verify")
        assert result.exit_code == 0 and "compared bit for bit" in result.output, result.output
    folder = back / iteration_folder_name(ITERATION)
    assert (back / TRACKER_FILE).read_text() == str(ITERATION)
    assert (folder / COMMON_FILE).read_bytes() == (source / COMMON_FILE).read_bytes()
    before, after = read_torch_dist(source), read_torch_dist(folder)
    assert list(after) == list(before)
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(after[key].view(torch.uint8), value.view(torch.uint8)), key  # type: ignore[union-attr]
        else:
            assert after[key] == value, key
    assert read_megatron_run(back).config == read_megatron_run(source).config
    safetensors = tmp_path / "run.safetensors"
    assert invoke_cli("convert", back, safetensors, "--verify").exit_code == 0
    refused = invoke_cli("convert", safetensors, tmp_path / "again", "--to", "megatron")
    assert refused.exit_code == 1 and "safetensors keep no common.pt" in refused.output
    assert len(refused.output.strip().splitlines()) == 1 and not (tmp_path / "again").exists()
