"""Crafted checkpoints through the CLI: each is refused with one line and exit 1, reads and writes stay inside the
input and the output, and the input is left as it was. The inputs start as small checkpoints the project's own
tools write (``tools/make_checkpoint.py``), then one thing is changed in them."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result

from nemo_vocab_ext.cli import main
from nemo_vocab_ext.formats.dcp_records import dumps
from nemo_vocab_ext.formats.torch_dist import parse_metadata

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
import make_checkpoint as mc  # noqa: E402

COMMANDS = ("inspect", "validate", "convert", "resize")
MODELS = {  # name -> (format, layout) as make_checkpoint writes them
    "dist.nemo": ("nemo", "distributed"),
    "single.nemo": ("nemo", "single"),
    "single.ckpt": ("ckpt", "single"),
    "dist_ckpt": ("ckpt", "distributed"),
    "model.safetensors": ("safetensors", "single"),
    "shards": ("safetensors", "single"),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, base_tokenizer: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adversarial_models")
    return {
        name: mc.write_checkpoint(
            root / name, fmt, mc.SIZES["tiny"], layout=layout, tied=True, tokenizer_dir=base_tokenizer
        )
        for name, (fmt, layout) in MODELS.items()
    }


def copy_of(models: dict[str, Path], name: str, dst: Path) -> Path:
    src = models[name]
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copyfile(src, dst)
    return dst


def tree(root: Path) -> dict[str, str]:
    """Every path under ``root`` (links not followed) and a digest of what it holds."""
    found = {}
    for p in sorted([root, *root.rglob("*")]):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            found[rel] = "link " + str(p.readlink())
        elif p.is_file():
            found[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            found[rel] = "folder"
    return found


def run(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def command_args(command: str, src: Path, out_dir: Path) -> list[object]:
    if command == "convert":
        return ["convert", src, out_dir / "out.safetensors" if ".safetensors" not in src.name else out_dir / "o.nemo"]
    if command == "resize":
        return ["resize", src, out_dir / "o.nemo", "--vocab-size", 600, "--init", "mean"]
    return [command, src]


def assert_refused(
    src: Path, work: Path, monkeypatch: pytest.MonkeyPatch, *expected: str, commands: tuple[str, ...] = COMMANDS
) -> None:
    """Every command exits 1 with one line naming the problem; nothing changes under ``work`` (the input, the
    files beside it) and nothing is left in the temporary folder."""
    scratch = work.parent / f"{work.name}_tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    before = tree(work)
    for command in commands:
        out_dir = work.parent / f"{work.name}_out_{command}"
        out_dir.mkdir()
        result = run(*command_args(command, src, out_dir))
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1, (command, result.output)
        assert len(lines) == 1 and lines[0].startswith("Error: "), (command, result.output)
        assert any(e in lines[0] for e in expected), (command, lines[0])
        assert list(out_dir.iterdir()) == [], command
    assert tree(work) == before
    assert list(scratch.iterdir()) == []


# ------------------------------------------------------------------------------- crafting helpers


def tar_members(nemo: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    with tarfile.open(nemo) as tar:
        return [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]  # type: ignore[union-attr]


def write_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w:") -> Path:
    with tarfile.open(path, mode) as tar:  # type: ignore[call-overload]
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def replace_members(nemo: Path, dst: Path, changes: dict[str, bytes], mode: str = "w:") -> Path:
    members = []
    for info, data in tar_members(nemo):
        name = info.name.removeprefix("./")
        members.append((info, changes.pop(name, data)))
    for name, data in changes.items():
        members.append((tarfile.TarInfo("./" + name), data))
    return write_tar(dst, members, mode)


def metadata_pointing_at(metadata: bytes, relative_path: str) -> bytes:
    """The torch_dist ``.metadata`` with every data record in ``relative_path``."""
    md = parse_metadata(metadata, "test")
    for info in md.storage_data.values():
        info.relative_path = relative_path
    return dumps(md)


def outside_name(target: Path) -> str:
    """A relative path that climbs from any folder to ``target``."""
    return "../" * 40 + str(target.resolve()).lstrip("/")


# ------------------------------------------------------------------ 1. paths from inside a checkpoint


@pytest.mark.parametrize("container", ["tar", "tar.gz", "folder"])
@pytest.mark.parametrize("how", ["dotdot", "absolute"])
def test_dist_metadata_cannot_name_a_file_outside(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, container: str, how: str
) -> None:
    """The weights moved out of the archive, and its metadata points at them there."""
    work = tmp_path / "work"
    work.mkdir()
    members = dict((i.name.removeprefix("./"), d) for i, d in tar_members(models["dist.nemo"]))
    local = work / "local.distcp"  # a local file with exactly the bytes the records expect
    local.write_bytes(members["model_weights/__0_0.distcp"] or b"")
    where = outside_name(local) if how == "dotdot" else str(local.resolve())
    changes = {"model_weights/.metadata": metadata_pointing_at(members["model_weights/.metadata"] or b"", where)}
    crafted = replace_members(
        models["dist.nemo"], tmp_path / "crafted.nemo", changes, "w:gz" if container == "tar.gz" else "w:"
    )
    if container == "folder":
        src = work / "extracted"
        with tarfile.open(crafted) as tar:
            tar.extractall(src, filter="data")
    else:
        src = work / "model.nemo"
        shutil.move(crafted, src)
    expected = ("absolute path", "not a plain relative name") if how == "absolute" else ("outside the archive",)
    assert_refused(src, work, monkeypatch, *expected)


def test_linked_artifact_in_a_folder_is_refused(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    src = work / "extracted"
    src.mkdir(parents=True)
    with tarfile.open(models["dist.nemo"]) as tar:
        tar.extractall(src, filter="data")
    artifact = next(src.glob("*_vocab.json"))
    local = work / "secret.json"
    local.write_bytes(artifact.read_bytes())  # what the link points at: a local file outside the folder
    artifact.unlink()
    artifact.symlink_to(local)
    assert_refused(src, work, monkeypatch, "is a link")


@pytest.mark.parametrize("model", ["dist_ckpt", "shards"])
def test_links_in_other_checkpoint_folders_are_refused(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    src = copy_of(models, model, work / model)
    data = next(p for p in src.iterdir() if p.suffix in (".distcp", ".safetensors"))
    moved = work / data.name
    data.rename(moved)
    data.symlink_to(moved)
    assert_refused(src, work, monkeypatch, "is a link")


@pytest.mark.parametrize("how", ["dotdot", "absolute"])
def test_safetensors_index_cannot_name_a_shard_outside(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    src = copy_of(models, "shards", work / "shards")
    shard = next(src.glob("model-*.safetensors"))
    local = shard.rename(work / "local.safetensors")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    where = outside_name(local) if how == "dotdot" else str(local.resolve())
    index["weight_map"] = dict.fromkeys(index["weight_map"], where)
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_refused(src, work, monkeypatch, "absolute path" if how == "absolute" else "outside the archive or folder")


@pytest.mark.parametrize("name", ["../evil.txt", "/tmp/evil.txt", "a//b", "./.", "x\x00y"])
@pytest.mark.parametrize("carrier", ["safetensors", "ckpt"])
def test_artifact_names_must_be_plain(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, carrier: str
) -> None:
    """Artifacts are written as files of the output .nemo: a name that climbs out would be written outside."""
    work = tmp_path / "work"
    work.mkdir()
    if carrier == "safetensors":
        src = work / "model.safetensors"
        rewrite_safetensors(
            models["model.safetensors"],
            src,
            lambda h: h["__metadata__"].update(
                {"nemo_vocab_ext.artifacts": json.dumps({name: base64.b64encode(b"x").decode()})}
            ),
        )
    else:
        src = work / "model.ckpt"
        payload = torch.load(models["single.ckpt"], weights_only=False)  # written by this test's own tools
        payload["nemo_vocab_ext_artifacts"] = {name: b"x"}
        torch.save(payload, src)
    assert_refused(
        src, work, monkeypatch, "absolute path", "outside the archive or folder", "not a plain relative name"
    )


def test_nemo_references_in_the_config_must_be_plain(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    members = dict((i.name.removeprefix("./"), d) for i, d in tar_members(models["single.nemo"]))
    config = (members["model_config.yaml"] or b"").decode()
    vocab_ref = next(line.split(": ", 1)[1] for line in config.splitlines() if "vocab_file: nemo:" in line)
    changed = config.replace(vocab_ref, "nemo:../../etc/passwd").encode()
    src = replace_members(models["single.nemo"], work / "model.nemo", {"model_config.yaml": changed})
    assert_refused(src, work, monkeypatch, "outside the archive or folder")


@pytest.mark.parametrize("name", ["../evil.txt", "/tmp/evil.txt"])
def test_hostile_tar_gz_members_are_refused(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    src = replace_members(models["single.nemo"], work / "model.nemo", {}, "w:gz")
    members = tar_members(src)
    members.append((tarfile.TarInfo(name), b"pwned"))
    write_tar(src, members, "w:gz")
    assert_refused(src, work, monkeypatch, "absolute path", "outside the archive or folder")


# ------------------------------------------------------------ 2. tar.gz: only what is needed, streamed


def test_tar_gz_skips_members_nothing_uses_without_holding_them(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    size = 64 << 20
    src = tmp_path / "old.nemo"
    members = tar_members(models["single.nemo"])
    members.append((tarfile.TarInfo("./junk.bin"), bytes(size)))
    with tarfile.open(src, "w:gz", compresslevel=1) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    before = tree(src.parent / "scratch"), hashlib.sha256(src.read_bytes()).hexdigest()
    tracemalloc.start()
    try:
        result = run("convert", src, tmp_path / "out.nemo")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.exit_code == 0, result.output
    assert peak < size / 4, f"peak {peak} bytes"
    with tarfile.open(tmp_path / "out.nemo") as tar:
        assert "./junk.bin" not in tar.getnames()
    assert (tree(scratch), hashlib.sha256(src.read_bytes()).hexdigest()) == before


def test_truncated_tar_gz_is_one_line(models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    whole = replace_members(models["single.nemo"], tmp_path / "whole.nemo", {}, "w:gz")
    src = work / "model.nemo"
    src.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert_refused(src, work, monkeypatch, "truncated or corrupt")


# --------------------------------------------------------------------------- 3. safetensors headers


def rewrite_safetensors(src: Path, dst: Path, change: Callable[[dict[str, Any]], object]) -> Path:
    """``src`` with its header changed by ``change`` (which edits it in place, or returns raw header bytes)."""
    raw = src.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    replaced = change(header)
    text = replaced if isinstance(replaced, bytes) else json.dumps(header).encode()
    text += b" " * (-(len(text) + 8) % 8)
    dst.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length :])
    return dst


def _set_meta(key: str, value: object) -> Callable[[dict[str, Any]], None]:
    def change(header: dict[str, Any]) -> None:
        if value is None:
            del header["__metadata__"][key]
        else:
            header["__metadata__"][key] = value

    return change


def _first_tensor(header: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return next((k, v) for k, v in header.items() if k != "__metadata__" and v["data_offsets"][1] > 0)


def _entry_change(field: str, value: object) -> Callable[[dict[str, Any]], None]:
    def change(header: dict[str, Any]) -> None:
        _first_tensor(header)[1][field] = value

    return change


def _overlap(header: dict[str, Any]) -> None:
    tensors = sorted(
        (v for k, v in header.items() if k != "__metadata__" and v["data_offsets"][1] > v["data_offsets"][0]),
        key=lambda v: v["data_offsets"][0],
    )
    a, b = tensors[0], tensors[1]  # b's bytes start inside a's, same length
    length = b["data_offsets"][1] - b["data_offsets"][0]
    b["data_offsets"] = [a["data_offsets"][0] + 2, a["data_offsets"][0] + 2 + length]


def _past_the_end(header: dict[str, Any]) -> None:
    _, info = _first_tensor(header)
    begin, end = info["data_offsets"]
    info["data_offsets"] = [begin + 10**9, end + 10**9]


def _many_entries(header: dict[str, Any]) -> None:
    for i in range(100_001):
        header[f"extra.{i}"] = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}


HEADERS: dict[str, tuple[Callable[[dict[str, Any]], object], str]] = {
    "config is a list": (_set_meta("nemo_vocab_ext.config", "[1, 2]"), "not a dict"),
    "config is a number": (_set_meta("nemo_vocab_ext.config", "5"), "not a dict"),
    "config is not JSON": (_set_meta("nemo_vocab_ext.config", "{oops"), "not valid JSON"),
    "config missing": (_set_meta("nemo_vocab_ext.config", None), "no NeMo model config"),
    "config nests deep": (_set_meta("nemo_vocab_ext.config", '{"a":' * 100 + "1" + "}" * 100), "nests deeper"),
    "metadata value is a list": (_set_meta("nemo_vocab_ext.config", ["x"]), "not a table of strings"),
    "metadata value is an object": (_set_meta("nemo_vocab_ext.layout", {"a": 1}), "not a table of strings"),
    "metadata is a list": (lambda h: h.update({"__metadata__": [1]}), "not a table of strings"),
    "layout unknown": (_set_meta("nemo_vocab_ext.layout", "sideways"), "not one of"),
    "artifacts a list": (_set_meta("nemo_vocab_ext.artifacts", "[]"), "not a dict"),
    "artifact not base64": (_set_meta("nemo_vocab_ext.artifacts", '{"a_vocab.json": 7}'), "not base64"),
    "blobs an object": (_set_meta("nemo_vocab_ext.blobs", '{"a": 1}'), "not a list"),
    "blob not stored": (_set_meta("nemo_vocab_ext.blobs", '["nowhere"]'), "not a stored entry"),
    "none keys a number": (_set_meta("nemo_vocab_ext.none_keys", "5"), "not a list"),
    "none key a number": (_set_meta("nemo_vocab_ext.none_keys", "[5]"), "not an entry name"),
    "alias to nothing": (_set_meta("nemo_vocab_ext.aliases", '{"x": "nowhere"}'), "not a stored entry"),
    "aliases a list": (_set_meta("nemo_vocab_ext.aliases", '["x"]'), "not a dict"),
    "dtype unknown": (_entry_change("dtype", "F33"), "malformed header"),
    "dtype a list": (_entry_change("dtype", ["F32"]), "malformed header"),
    "shape negative": (_entry_change("shape", [-1, 64]), "malformed header"),
    "shape text": (_entry_change("shape", "64"), "malformed header"),
    "offsets three": (_entry_change("data_offsets", [0, 1, 2]), "malformed header"),
    "offsets reversed": (_entry_change("data_offsets", [8, 0]), "bytes for shape"),
    "dtype missing": (_entry_change("dtype", None), "malformed header"),
    "entry not an object": (lambda h: h.update({_first_tensor(h)[0]: [1]}), "malformed header"),
    "offsets past the end": (_past_the_end, "outside its"),
    "entries overlap": (_overlap, "overlap"),
    "nested 100k deep": (lambda h: b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "not valid JSON"),
    "header is a list": (lambda h: b"[]", "not an object"),
    "too many entries": (_many_entries, "over the limit"),
}


@pytest.mark.parametrize("case", HEADERS)
def test_crafted_safetensors_headers_are_refused(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    change, expected = HEADERS[case]
    work = tmp_path / "work"
    work.mkdir()
    src = rewrite_safetensors(models["model.safetensors"], work / "model.safetensors", change)
    assert_refused(src, work, monkeypatch, expected)


# -------------------------------------------------------------------------------- 4. YAML configs

BILLION_LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi", strict=True)
)

CONFIGS = {
    "billion laughs": (BILLION_LAUGHS.encode(), "expands to more than"),
    "recursive alias": (b"a: &a [1, *a]\n", "contains itself"),
    "a list": (b"- 1\n- 2\n", "not a mapping"),
    "not UTF-8": (b"a: \xff\xfe\n", "not UTF-8"),
    "not YAML": (b"a: [1, 2\nb: {", "not valid YAML"),
    "nested deep": (b"a: " + b"[" * 900 + b"]" * 900 + b"\n", "nests deeper"),
    "too large": (b"a: 1\n" + b"#" * (16 << 20) + b"\n", "over"),
}


@pytest.mark.parametrize("case", CONFIGS)
@pytest.mark.parametrize("container", ["tar", "folder"])
def test_crafted_model_configs_are_refused(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, container: str
) -> None:
    text, expected = CONFIGS[case]
    work = tmp_path / "work"
    work.mkdir()
    src = replace_members(models["single.nemo"], work / "model.nemo", {"model_config.yaml": text})
    if container == "folder":
        folder = work / "extracted"
        with tarfile.open(src) as tar:
            tar.extractall(folder, filter="data")
        src.unlink()
        src = folder
    assert_refused(src, work, monkeypatch, expected)


# ------------------------------------------------------------------------------ 5. Lightning hparams


def test_torch_save_zip_of_an_unknown_version_is_refused(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A central directory entry asking for zip version 12.5 to extract: zipfile raises NotImplementedError."""
    work = tmp_path / "work"
    work.mkdir()
    src = copy_of(models, "single.ckpt", work / "single.ckpt")
    data = bytearray(src.read_bytes())
    entry = data.index(b"PK\x01\x02")
    data[entry + 6 : entry + 8] = (125).to_bytes(2, "little")  # version needed to extract
    src.write_bytes(bytes(data))
    assert_refused(src, work, monkeypatch, "not a torch.save file")


def _laughs() -> dict[str, Any]:
    level: Any = ["lol"] * 9
    for _ in range(9):
        level = [level] * 9  # shared lists: a small pickle that expands to 9**10 values
    return {"hidden_size": 64, "layers": level}


def _hparams(value: Callable[[dict[str, Any]], object]) -> Callable[[dict[str, Any]], None]:
    def change(payload: dict[str, Any]) -> None:
        payload["hyper_parameters"] = value(payload["hyper_parameters"])

    return change


LIGHTNING = {
    "hyper_parameters a list": (_hparams(lambda h: [1, 2]), "not a mapping"),
    "hyper_parameters text": (_hparams(lambda h: "cfg"), "not a mapping"),
    "cfg missing": (_hparams(lambda h: {"other": 1}), "no model config ('cfg')"),
    "cfg a list": (_hparams(lambda h: {"cfg": [1, 2]}), "not a mapping"),
    "cfg a number": (_hparams(lambda h: {"cfg": 5}), "not a mapping"),
    "cfg expands": (_hparams(lambda h: {"cfg": _laughs()}), "expands to more than"),
    "no hyper_parameters": (lambda p: p.pop("hyper_parameters"), "no hyper_parameters"),
}


@pytest.mark.parametrize("case", LIGHTNING)
@pytest.mark.parametrize("model", ["single.ckpt", "dist_ckpt"])
def test_crafted_lightning_hparams_are_refused(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, model: str
) -> None:
    change, expected = LIGHTNING[case]
    work = tmp_path / "work"
    work.mkdir()
    src = copy_of(models, model, work / model)
    payload_file = src / "common.pt" if src.is_dir() else src
    payload = torch.load(payload_file, weights_only=False)  # written by this test's own tools
    change(payload)
    torch.save(payload, payload_file)
    assert_refused(src, work, monkeypatch, expected)


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "model"  # no suffix: the format would be told from its first bytes
    os.mkfifo(fifo)
    done = subprocess.run(
        [sys.executable, "-m", "nemo_vocab_ext.cli", "inspect", str(fifo)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        f"Error: {fifo}: not a regular file or folder"
    ], done.stderr


@pytest.mark.parametrize("rows", [2**64, 10**12])
def test_dist_record_of_a_shape_no_file_holds_is_refused(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rows: int
) -> None:
    """A tensor record (and its one chunk) claiming rows past int64, or a terabyte: refused before anything is
    allocated for it."""
    work = tmp_path / "work"
    work.mkdir()
    src = copy_of(models, "dist_ckpt", work / "dist_ckpt")
    md = parse_metadata((src / ".metadata").read_bytes(), "test")
    record = md.state_dict_metadata["model.embedding.word_embeddings.weight"]
    record.size = torch.Size([rows, *record.size[1:]])
    record.chunks[0].sizes = torch.Size([rows, *record.chunks[0].sizes[1:]])
    (src / ".metadata").write_bytes(dumps(md))
    assert_refused(src, work, monkeypatch, "does not hold a", commands=("validate",))


# --------------------------------------------------------------------------- 6. Megatron run folders


@pytest.fixture(scope="module")
def megatron_run(tmp_path_factory: pytest.TempPathFactory, base_tokenizer: Path) -> Path:
    """A Megatron-LM run folder saved by megatron-core, its tokenizer files in the iteration folder."""
    from test_megatron_run import generate

    root = tmp_path_factory.mktemp("adversarial_run")
    return generate(root / "run", "--untied", "--vocab-size", "500", "--tokenizer", str(base_tokenizer))


def run_copy(megatron_run: Path, work: Path) -> tuple[Path, Path]:
    """A copy of the run under ``work``, and its iteration folder."""
    from nemo_vocab_ext.formats.megatron_run import TRACKER_FILE

    run = Path(shutil.copytree(megatron_run, work / "run"))
    return run, run / f"iter_{int((run / TRACKER_FILE).read_text()):07d}"


def change_common(folder: Path, change: Callable[[dict[str, Any]], object]) -> None:
    common = torch.load(folder / "common.pt", weights_only=False)  # written by megatron-core here
    change(common)
    torch.save(common, folder / "common.pt")


@pytest.mark.parametrize("text", ["\u00b9\u2070", "1" * 5000])
def test_megatron_tracker_takes_ascii_digits_only(
    megatron_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    """'¹⁰' passes str.isdigit and then fails int(); 5,000 digits are over int()'s limit for text."""
    work = tmp_path / "work"
    work.mkdir()
    run, _ = run_copy(megatron_run, work)
    (run / "latest_checkpointed_iteration.txt").write_text(text)
    assert_refused(run, work, monkeypatch, "expected an iteration number")


@pytest.mark.parametrize(
    "member", [".metadata", "__0_0.distcp", "common.pt", "tokenizer/vocab.json", "TRACKER", "LATEST_TRAIN_STATE"]
)
def test_links_in_a_megatron_run_are_refused(
    megatron_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, member: str
) -> None:
    """A file of the run replaced by a link to a copy beside the run: read through it, the run would read
    whatever the link names."""
    work = tmp_path / "work"
    work.mkdir()
    run, folder = run_copy(megatron_run, work)
    if member == "LATEST_TRAIN_STATE":  # Megatron-Bridge's copy beside the iteration, carried over by a resize
        (work / "elsewhere").write_bytes(b"not the run's")
        (run / "latest_train_state.pt").symlink_to(work / "elsewhere")
    else:
        path = run / "latest_checkpointed_iteration.txt" if member == "TRACKER" else folder / member
        path.rename(work / "elsewhere")
        path.symlink_to(work / "elsewhere")
    assert_refused(run, work, monkeypatch, "link")


BAD_SIZES = {"text": "128x", "a list": [128], "infinite": float("inf"), "a dict": {"a": 1}}


@pytest.mark.parametrize("arg", ["make_vocab_size_divisible_by", "tensor_model_parallel_size"])
@pytest.mark.parametrize("value", BAD_SIZES)
def test_megatron_args_of_the_wrong_type_are_refused(
    megatron_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arg: str, value: str
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    run, folder = run_copy(megatron_run, work)
    change_common(folder, lambda common: setattr(common["args"], arg, BAD_SIZES[value]))
    assert_refused(run, work, monkeypatch, "is not a positive whole number")


def test_megatron_args_nested_deep_are_refused(
    megatron_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A value of the args nested 2,000 lists deep: writing the args again (a resize) would recurse past
    Python's limit."""
    work = tmp_path / "work"
    work.mkdir()
    run_dir, folder = run_copy(megatron_run, work)
    deep: list[Any] = []
    for _ in range(2000):
        deep = [deep]
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10_000)  # for torch.save to write it
    try:
        change_common(folder, lambda common: setattr(common["args"], "data_path", deep))
    finally:
        sys.setrecursionlimit(limit)
    assert_refused(run_dir, work, monkeypatch, "nests deeper")


RUN_CONFIGS = {
    "a size as text": ("model:\n  tensor_model_parallel_size: two\n", "is not a positive whole number"),
    "a size as a list": ("model:\n  make_vocab_size_divisible_by: [128]\n", "is not a positive whole number"),
    "nested deep": ("model: " + "[" * 5000 + "]" * 5000 + "\n", "not valid YAML"),
    "recursive alias": ("model: &m {a: *m}\n", "contains itself"),
}


@pytest.mark.parametrize("case", RUN_CONFIGS)
def test_crafted_bridge_run_configs_are_refused(
    megatron_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """Megatron-Bridge's run_config.yaml is read where common.pt holds no args."""
    text, expected = RUN_CONFIGS[case]
    work = tmp_path / "work"
    work.mkdir()
    run, folder = run_copy(megatron_run, work)
    change_common(folder, lambda common: common.pop("args"))
    (folder / "run_config.yaml").write_text(text)
    assert_refused(run, work, monkeypatch, expected)


def test_megatron_args_without_padded_vocab_size_resize(megatron_run: Path, tmp_path: Path) -> None:
    """args without padded_vocab_size (the config read from them has none): resized, they still have none."""
    src, folder = run_copy(megatron_run, tmp_path)
    change_common(folder, lambda common: delattr(common["args"], "padded_vocab_size"))
    result = run("resize", src, tmp_path / "resized", "--vocab-size", 600, "--init", "mean")
    assert result.exit_code == 0, result.output
    written = torch.load(tmp_path / "resized" / folder.name / "common.pt", weights_only=False)
    assert not hasattr(written["args"], "padded_vocab_size")
