"""Outputs under misuse and kills: every refusal is one line with exit code 1 before anything is written,
a killed command leaves nothing behind (or a later run removes what SIGKILL left), and the source never
changes. Commands run as the installed CLI does (a subprocess) where signals or exit codes matter."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import dead_pid

from nemo_vocab_ext.checkpoint import DISTRIBUTED, SINGLE, Checkpoint
from nemo_vocab_ext.cli import main
from nemo_vocab_ext.cli_common import error_message
from nemo_vocab_ext.errors import ResizeError
from nemo_vocab_ext.formats.nemo import embed_tokenizer
from nemo_vocab_ext.io import Format, load_checkpoint, save_checkpoint
from nemo_vocab_ext.tokenization.train import train_bpe
from nemo_vocab_ext.vocab import refuse_training_checkpoint_of_another_size

REPO = Path(__file__).resolve().parents[1]
HIDDEN = 8
EMBEDDING = "model.embedding.word_embeddings.weight"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pydoc_data.topics import topics

    return train_bpe([topics[k] for k in sorted(topics)], tmp_path_factory.mktemp("tok"), 400)


def make_nemo(path: Path, tokenizer: Path, *, rows: int = 512, hidden: int = HIDDEN, **config: object) -> Path:
    g = torch.Generator().manual_seed(0)
    tensors: dict = {
        EMBEDDING: torch.randn(rows, hidden, generator=g),
        "model.decoder.final_layernorm.weight": torch.ones(hidden),
    }
    cfg = {"make_vocab_size_divisible_by": 128, "tensor_model_parallel_size": 1, **config}
    cfg["tokenizer"] = {"library": "megatron", "type": "GPT2BPETokenizer"}
    ckpt = embed_tokenizer(
        Checkpoint(tensors, cfg, DISTRIBUTED),
        {"vocab_file": tokenizer / "vocab.json", "merge_file": tokenizer / "merges.txt"},
    )
    save_checkpoint(ckpt, path, Format.NEMO)
    return path


@pytest.fixture()
def base(tmp_path: Path, tokenizer: Path) -> Path:
    return make_nemo(tmp_path / "base.nemo", tokenizer)


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (hidden ones included) with its content's digest."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = f"-> {os.readlink(path)}"
        elif path.is_dir():
            out[rel] = "folder"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def cli_env(tmpdir: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", TMPDIR=str(tmpdir))


def cli(*args: object, tmpdir: Path, cwd: Path | None = None, **kw: object) -> subprocess.CompletedProcess[str]:
    """``nemo-vocab-ext ARGS`` as the console script runs it, with its own temporary folder."""
    command = [sys.executable, "-m", "nemo_vocab_ext.cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=cli_env(tmpdir), cwd=cwd, **kw)


def assert_refused(done: subprocess.CompletedProcess[str], *messages: str) -> None:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("Error: "), done.stderr
    assert all(m in lines[0] for m in messages), lines[0]
    assert "Traceback" not in done.stderr and done.stdout == ""


@pytest.fixture()
def tmpdir_(tmp_path: Path) -> Path:
    """The commands' TMPDIR: empty before and after each command."""
    folder = tmp_path.parent / f"{tmp_path.name}_TMPDIR"
    folder.mkdir()
    return folder


# Kills.


def wait_for(found: Callable[[], bool], proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not found():
        assert proc.poll() is None, f"the command ended before {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.005)


def temporaries_beside(dst: Path) -> list[Path]:
    return [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]


@pytest.fixture()
def large(tmp_path: Path, tokenizer: Path) -> Path:
    """A checkpoint whose write and bitwise check take long enough to kill the command in between."""
    return make_nemo(tmp_path / "large.nemo", tokenizer, rows=65536, hidden=256)


COMMANDS = {
    "convert": lambda src, dst: ["convert", src, dst, "--verify"],
    "resize": lambda src, dst: ["resize", src, dst, "--vocab-size", 70000, "--init", "mean", "--verify"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_sigterm_cleans_up_as_ctrl_c_does(large: Path, tmpdir_: Path, command: str) -> None:
    folder = large.parent
    before, source = snapshot(folder), snapshot(large.parent)[large.name]
    dst = folder / "out.nemo"
    args = [sys.executable, "-m", "nemo_vocab_ext.cli", *map(str, COMMANDS[command](large, dst))]
    proc = subprocess.Popen(args, env=cli_env(tmpdir_), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: bool(temporaries_beside(dst)), proc, "temporary output")
    proc.send_signal(signal.SIGTERM)  # what `timeout` sends
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines() == ["Error: terminated by SIGTERM; unfinished outputs and temporary files removed"]
    assert snapshot(folder) == before and list(tmpdir_.iterdir()) == []
    assert snapshot(folder)[large.name] == source


def test_a_later_run_removes_what_sigkill_left(large: Path, tmpdir_: Path) -> None:
    folder = large.parent
    dst = folder / "out.nemo"
    args = COMMANDS["resize"](large, dst)
    proc = subprocess.Popen(
        [sys.executable, "-m", "nemo_vocab_ext.cli", *map(str, args)],
        env=cli_env(tmpdir_),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: bool(temporaries_beside(dst)) and any(tmpdir_.iterdir()), proc, "temporaries")
    proc.kill()
    proc.wait()
    assert temporaries_beside(dst) and any(tmpdir_.iterdir())  # nothing could remove them
    # Temporaries of a live process, and entries not named as ours, are left alone.
    live = folder / f".out.nemo.{os.getpid()}.abc123.tmp"
    live.mkdir()
    other = folder / ".out.nemo.notours.tmp"
    other.write_text("keep")
    live_scratch = tmpdir_ / f"nemo_vocab_ext.{os.getpid()}.xyz.tmp"
    live_scratch.mkdir()
    source = snapshot(folder)[large.name]

    done = cli(*args, tmpdir=tmpdir_)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in folder.iterdir()) == sorted([large.name, "out.nemo", live.name, other.name])
    assert list(tmpdir_.iterdir()) == [live_scratch]
    assert load_checkpoint(dst)[0].tensors[EMBEDDING].shape == (70016, 256)
    assert snapshot(folder)[large.name] == source


def test_a_replaced_output_moved_aside_by_a_killed_run_is_put_back(base: Path, tmpdir_: Path, tokenizer: Path) -> None:
    # Killed between moving the old output aside and renaming the new one: the next run restores it.
    folder = base.parent
    old = cli("convert", base, folder / "x.ckpt", tmpdir=tmpdir_)
    assert old.returncode == 0, old.stderr
    aside = folder / f".x.ckpt.{dead_pid()}.aside.tmp"
    (folder / "x.ckpt").rename(aside)
    kept = snapshot(aside)
    refused = cli("convert", base, folder / "x.ckpt", tmpdir=tmpdir_)  # no --force: the old one is back
    assert_refused(refused, "exists; pass --force")
    assert snapshot(folder / "x.ckpt") == kept and not aside.exists()


# Destination and source are one.


@pytest.mark.parametrize("form", ["same", "dot", "absolute", "symlink", "hard link"])
@pytest.mark.parametrize("command", ["convert", "resize"])
def test_destination_that_is_the_source_is_refused(base: Path, tmpdir_: Path, form: str, command: str) -> None:
    folder = base.parent
    (folder / "sym.nemo").symlink_to(base)
    os.link(base, folder / "hard.nemo")
    dst = {
        "same": base.name,
        "dot": f"./{base.name}",
        "absolute": str(base.resolve()),
        "symlink": "sym.nemo",
        "hard link": "hard.nemo",
    }[form]
    before = snapshot(folder)
    extra = ["--vocab-size", 700, "--init", "mean"] if command == "resize" else []
    done = cli(command, base.name, dst, "--force", *extra, tmpdir=tmpdir_, cwd=folder)
    assert_refused(done, "is the source")
    assert snapshot(folder) == before and list(tmpdir_.iterdir()) == []


@pytest.mark.parametrize("form", ["same", "symlink", "inside", "contains"])
def test_folders_that_overlap_the_source_are_refused(base: Path, tmpdir_: Path, form: str) -> None:
    folder = base.parent
    src = folder / "dist.ckpt"  # a distributed training checkpoint: a folder
    assert cli("convert", base, src, tmpdir=tmpdir_).returncode == 0
    dst = {"same": src, "inside": src / "x.nemo"}.get(form)
    if form == "symlink":
        dst = folder / "sym.ckpt"
        dst.symlink_to(src)
    if form == "contains":  # the source inside the destination folder, which holds a checkpoint
        outer = folder / "outer.ckpt"
        assert cli("convert", base, outer, tmpdir=tmpdir_).returncode == 0
        src = (outer / "inner.nemo").resolve()
        src.write_bytes(base.read_bytes())
        dst = outer
    assert dst is not None
    before = snapshot(folder)
    done = cli("convert", src, dst, "--to", "ckpt", "--force", tmpdir=tmpdir_)
    assert_refused(done, {"inside": "lies inside the source", "contains": "lies inside"}.get(form, "is the source"))
    assert snapshot(folder) == before and list(tmpdir_.iterdir()) == []


# --force onto a folder.


def test_force_never_replaces_a_folder_that_holds_no_checkpoint(base: Path, tmpdir_: Path) -> None:
    folder = base.parent
    precious = folder / "precious"
    (precious / "sub").mkdir(parents=True)
    (precious / "notes.txt").write_text("mine")
    before = snapshot(folder)
    for args in (["convert", base, precious, "--to", "ckpt"], ["resize", base, precious, "--to", "nemo"]):
        extra = ["--vocab-size", 700, "--init", "mean"] if args[0] == "resize" else []
        done = cli(*args, "--force", *extra, tmpdir=tmpdir_)
        assert_refused(done, "is a folder that holds no checkpoint", "remove it or pick another name")
        assert snapshot(folder) == before and list(tmpdir_.iterdir()) == []
    # A checkpoint folder and a checkpoint file are replaced with --force.
    for name in ("dist.ckpt", "file.nemo"):
        assert cli("convert", base, folder / name, tmpdir=tmpdir_).returncode == 0
        again = cli("resize", base, folder / name, "--vocab-size", 700, "--init", "mean", "--force", tmpdir=tmpdir_)
        assert again.returncode == 0, again.stderr
        assert load_checkpoint(folder / name)[0].tensors[EMBEDDING].shape == (768, HIDDEN)
    assert snapshot(folder)[base.name] == before[base.name]


# resize writes what its destination's name asks for.


@pytest.mark.parametrize(("name", "fmt"), [("out.ckpt", Format.CKPT), ("out.safetensors", Format.SAFETENSORS)])
def test_resize_writes_the_format_its_destination_names(base: Path, tmpdir_: Path, name: str, fmt: Format) -> None:
    dst = base.parent / name
    done = cli("resize", base, dst, "--vocab-size", 700, "--init", "mean", tmpdir=tmpdir_)
    assert done.returncode == 0, done.stderr
    assert dst.is_dir() or not tarfile.is_tarfile(dst)  # not a .nemo under another name
    out, read_as = load_checkpoint(dst)
    assert read_as is fmt and out.tensors[EMBEDDING].shape == (768, HIDDEN)
    assert len(out.artifacts) == 2  # the tokenizer travels with it


def test_resize_refuses_a_destination_whose_format_it_cannot_tell(base: Path, tmpdir_: Path) -> None:
    before = snapshot(base.parent)
    done = cli("resize", base, base.parent / "out.bin", "--vocab-size", 700, "--init", "mean", tmpdir=tmpdir_)
    assert_refused(done, "cannot tell the output format")
    assert snapshot(base.parent) == before


# Training checkpoints.


def lightning_file(path: Path, tokenizer: Path, rows: int = 512, *, optimizer: bool = True, **config: object) -> Path:
    """A Lightning training checkpoint file (with optimizer state), as torch saves it; ``config`` overrides
    model config values (stored as given: a NaN is no config a .nemo's written-back check accepts)."""
    ckpt, _ = load_checkpoint(make_nemo(path.with_suffix(".nemo"), tokenizer, rows=rows))
    payload = {
        "state_dict": {k: ckpt.tensors[k] for k in ckpt.tensors},
        "global_step": 3,
        "hyper_parameters": {"cfg": dict(ckpt.config, **config)},
        "nemo_vocab_ext_artifacts": ckpt.artifacts,
    }
    if optimizer:
        moments = {"state": {0: {"exp_avg": torch.zeros(rows, HIDDEN)}}, "param_groups": [{"params": [0], "lr": 0.1}]}
        payload["optimizer_states"] = [moments]
    torch.save(payload, path)
    path.with_suffix(".nemo").unlink()
    return path


def test_training_checkpoints_of_another_size_are_refused_in_both_layouts(
    tmp_path: Path, tokenizer: Path, tmpdir_: Path
) -> None:
    single = lightning_file(tmp_path / "single.ckpt", tokenizer, 512)
    assert load_checkpoint(single)[0].layout == SINGLE
    dist = tmp_path / "dist.ckpt"
    assert cli("convert", make_nemo(tmp_path / "d.nemo", tokenizer), dist, tmpdir=tmpdir_).returncode == 0
    for path in (single, dist):
        refuse_training_checkpoint_of_another_size(path, 512)  # its own size: loads
        with pytest.raises(ResizeError, match="training checkpoint has 512 embedding rows but the model has 768"):
            refuse_training_checkpoint_of_another_size(path, 768)


def test_resize_refuses_optimizer_state_it_cannot_follow(tmp_path: Path, tokenizer: Path, tmpdir_: Path) -> None:
    single = lightning_file(tmp_path / "single.ckpt", tokenizer, 512)
    before = snapshot(tmp_path)
    done = cli("resize", single, tmp_path / "out.ckpt", "--vocab-size", 700, "--init", "mean", tmpdir=tmpdir_)
    assert_refused(done, "optimizer state cannot follow a resized table")
    assert snapshot(tmp_path) == before
    weights = cli("resize", single, tmp_path / "out.nemo", "--vocab-size", 700, "--init", "mean", tmpdir=tmpdir_)
    assert weights.returncode == 0, weights.stderr


# Config values and options.

SIZE_KEYS = [
    "make_vocab_size_divisible_by",
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "override_vocab_size",
]
BAD_VALUES = [0, -128, float("nan"), float("inf"), True, "128", "${no_such_key}"]


@pytest.mark.parametrize("value", BAD_VALUES, ids=repr)
@pytest.mark.parametrize("key", SIZE_KEYS)
def test_config_sizes_that_are_not_positive_whole_numbers_are_refused(
    tmp_path: Path, tokenizer: Path, key: str, value: object
) -> None:
    src = lightning_file(tmp_path / "bad.ckpt", tokenizer, optimizer=False, **{key: value})
    before = snapshot(tmp_path)
    commands = [["inspect", src]]
    if key != "pipeline_model_parallel_size":  # the row count a validation expects
        commands.append(["validate", src])
    if key in SIZE_KEYS[:2]:  # what a resize pads with
        commands.append(["resize", src, tmp_path / "o.nemo", "--vocab-size", 700, "--init", "mean"])
    for args in commands:
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code == 1, (args, result.output)
        assert result.output.count("\n") == 1 and f"model config: {key}={value!r}" in result.output, result.output
        assert snapshot(tmp_path) == before


def test_config_interpolations_that_resolve_are_used(tmp_path: Path, tokenizer: Path) -> None:
    src = make_nemo(tmp_path / "i.nemo", tokenizer, make_vocab_size_divisible_by="${padding}", padding=64)
    result = CliRunner().invoke(main, ["inspect", str(src), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert (info["make_vocab_size_divisible_by"], info["padded_vocab_size"]) == (64, 448)


@pytest.mark.parametrize("option", ["--tp", "--divisible-by", "--vocab-size"])
@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "true", "1.5"])
def test_size_options_must_be_positive_whole_numbers(base: Path, tmp_path: Path, option: str, value: str) -> None:
    before = snapshot(tmp_path)
    extra = [] if option == "--vocab-size" else ["--vocab-size", "700"]
    result = CliRunner().invoke(
        main, ["resize", str(base), str(tmp_path / "o.nemo"), option, value, *extra, "--init", "mean"]
    )
    assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output, result.output
    assert snapshot(tmp_path) == before


# Memory and OS errors.


def test_running_out_of_memory_is_one_line(base: Path, tmpdir_: Path) -> None:
    import resource

    def limit_memory() -> None:  # the command's own address space: 600 MB
        resource.setrlimit(resource.RLIMIT_AS, (600 << 20, 600 << 20))

    before = snapshot(base.parent)
    done = cli(
        "resize", base, base.parent / "o.nemo", "--vocab-size", 30_000_000, "--init", "mean",
        tmpdir=tmpdir_, preexec_fn=limit_memory,
    )  # fmt: skip
    assert_refused(done, "GiB of memory, more than this machine gives")  # the rows the config asks for
    assert snapshot(base.parent) == before and list(tmpdir_.iterdir()) == []


def test_memory_and_os_errors_name_what_they_can(base: Path, tmpdir_: Path) -> None:
    assert error_message(MemoryError()) == "out of memory; free memory or run on a machine with more"
    try:
        os.open(base.parent / "missing" / "x", os.O_RDONLY)
    except OSError as e:
        assert error_message(e) == f"{base.parent / 'missing' / 'x'}: No such file or directory"
    (base.parent / "afile").write_text("")
    before = snapshot(base.parent)
    done = cli("convert", base, base.parent / "afile" / "o.nemo", tmpdir=tmpdir_)
    assert_refused(done, str(base.parent / "afile"))
    assert snapshot(base.parent) == before
