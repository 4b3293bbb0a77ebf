"""Round trips through every adapter on synthetic checkpoints, and the archive's safety rules."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from nemo_vocab_ext.atomic import atomic_output
from nemo_vocab_ext.checkpoint import DISTRIBUTED, SINGLE, Checkpoint
from nemo_vocab_ext.core.dtypes import dtype_of
from nemo_vocab_ext.errors import CheckpointFormatError, ConfigError, OutputExistsError, UnsafeCheckpointError
from nemo_vocab_ext.formats.archive import NemoArchive
from nemo_vocab_ext.io import Format, load_checkpoint, save_checkpoint, verify_written

CONFIG = {
    "num_layers": 2,
    "hidden_size": 4,
    "make_vocab_size_divisible_by": 8,
    "share_embeddings_and_output_weights": False,
    "tokenizer": {"library": "megatron", "type": "GPT2BPETokenizer", "vocab_file": "nemo:" + "a" * 32 + "_vocab.json"},
}


def synthetic(layout: str) -> Checkpoint:
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(16, 4, generator=g)
    tensors: dict = {
        "model.embedding.word_embeddings.weight": emb,
        "model.output_layer.weight": torch.randn(16, 4, generator=g).to(torch.bfloat16),
        "model.decoder.final_layernorm.weight": torch.ones(4),
        "model.counter": torch.tensor(7, dtype=torch.int64),
    }
    if layout == DISTRIBUTED:
        tensors["model.decoder.layers.mlp.linear_fc1._extra_state/shard_0_2"] = b"\x80\x04N."
    else:
        tensors["model.output_layer._extra_state"] = None
    return Checkpoint(tensors, dict(CONFIG), layout, {"a" * 32 + "_vocab.json": b'{"x": 0}'})


@pytest.mark.parametrize("layout", [SINGLE, DISTRIBUTED])
@pytest.mark.parametrize(
    ("fmt", "name"),
    [
        (Format.NEMO, "m.nemo"),
        (Format.CKPT, "m.ckpt"),
        (Format.SAFETENSORS, "m.safetensors"),
        (Format.SAFETENSORS, "shards"),
    ],
)
def test_round_trip_is_bit_exact(tmp_path: Path, layout: str, fmt: Format, name: str) -> None:
    ckpt = synthetic(layout)
    dst = tmp_path / name
    save_checkpoint(ckpt, dst, fmt)
    back, detected = load_checkpoint(dst, fmt if name == "shards" else None)
    assert detected is fmt and back.layout == layout
    verify_written(ckpt, back, dst, bitwise=True)
    assert back.artifacts == ckpt.artifacts and back.config == ckpt.config


@pytest.mark.parametrize(
    "key", ["model.embedding.word_embeddings.weight", "model.output_layer.weight", "model.counter"]
)
def test_verify_written_notices_one_changed_byte(tmp_path: Path, key: str) -> None:
    ckpt = synthetic(SINGLE)
    dst = tmp_path / "m.safetensors"
    save_checkpoint(ckpt, dst, Format.SAFETENSORS)
    data = bytearray(dst.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    start, _ = json.loads(data[8 : 8 + header_len])[key]["data_offsets"]
    data[8 + header_len + start] ^= 0x01  # the lowest bit of the entry's first byte
    dst.write_bytes(bytes(data))
    back, _ = load_checkpoint(dst)
    verify_written(ckpt, back, dst, bitwise=False)  # shapes and dtypes alone cannot see it
    with pytest.raises(CheckpointFormatError, match=f"entry '{key}' differs after writing"):
        verify_written(ckpt, back, dst, bitwise=True)


def test_sharded_safetensors_splits_and_indexes(tmp_path: Path) -> None:
    from nemo_vocab_ext.formats.safetensors_io import INDEX, write_safetensors

    ckpt = synthetic(SINGLE)
    out = tmp_path / "shards"
    write_safetensors(ckpt, out, max_shard_bytes=100)
    assert len(list(out.glob("model-*-of-*.safetensors"))) >= 2
    assert (out / INDEX).is_file()
    back, _ = load_checkpoint(out)
    verify_written(ckpt, back, out, bitwise=True)


def test_tied_alias_is_stored_once(tmp_path: Path) -> None:
    from safetensors import safe_open

    ckpt = synthetic(SINGLE)
    ckpt.tensors["model.word_embeddings_for_head.weight"] = ckpt.tensors["model.embedding.word_embeddings.weight"]
    dst = tmp_path / "t.safetensors"
    save_checkpoint(ckpt, dst, Format.SAFETENSORS)
    with safe_open(str(dst), "pt") as f:
        assert "model.word_embeddings_for_head.weight" not in set(f.keys())
        assert f.metadata()["format"] == "pt"
    back, _ = load_checkpoint(dst)
    assert torch.equal(
        back.tensors["model.word_embeddings_for_head.weight"], ckpt.tensors["model.embedding.word_embeddings.weight"]
    )


def test_existing_destination_needs_force_and_failures_leave_nothing(tmp_path: Path) -> None:
    dst = tmp_path / "out.nemo"
    dst.write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="--force"):
        save_checkpoint(synthetic(SINGLE), dst, Format.NEMO)
    assert dst.read_bytes() == b"precious"
    with pytest.raises(RuntimeError), atomic_output(tmp_path / "new.nemo", force=False) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nemo"]


def _tar_with(tmp_path: Path, name: str, add) -> Path:  # type: ignore[no-untyped-def]
    path = tmp_path / name
    with tarfile.open(path, "w:") as tar:
        data = b"x: 1\n"
        info = tarfile.TarInfo("./model_config.yaml")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        add(tar)
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("dotdot", "outside the archive"),
        ("absolute", "absolute path"),
        ("symlink", "is a link"),
        ("hardlink", "is a link"),
    ],
)
def test_hostile_archives_are_refused_whole(tmp_path: Path, kind: str, message: str) -> None:
    def add(tar: tarfile.TarFile) -> None:
        if kind in ("dotdot", "absolute"):
            payload = b"pwned"
            info = tarfile.TarInfo("../evil.txt" if kind == "dotdot" else "/tmp/evil.txt")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        else:
            info = tarfile.TarInfo("./model_weights.ckpt")
            info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)

    bad = _tar_with(tmp_path / "", "bad.nemo", add)
    with pytest.raises(UnsafeCheckpointError, match=message):
        NemoArchive(bad)
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(bad)
    assert not (tmp_path.parent / "evil.txt").exists()


def test_truncated_archive_and_missing_config(tmp_path: Path) -> None:
    good = tmp_path / "good.nemo"
    save_checkpoint(synthetic(SINGLE), good, Format.NEMO)
    truncated = tmp_path / "truncated.nemo"
    with tarfile.open(good) as tar:
        weights = tar.getmember("./model_weights.ckpt")
    truncated.write_bytes(good.read_bytes()[: weights.offset_data + weights.size // 2])  # cut inside the weights
    with pytest.raises(CheckpointFormatError, match="truncated|corrupt|not a .nemo"):
        load_checkpoint(truncated)
    no_config = tmp_path / "noconfig.nemo"
    with tarfile.open(no_config, "w:") as tar:
        info = tarfile.TarInfo("./model_weights.ckpt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(ConfigError, match="model_config.yaml is missing"):
        load_checkpoint(no_config)


def _legacy_ranks(tp: int, pp: int) -> dict[tuple[int, int], dict]:
    """Legacy GPT rank files: the embedding on the first stage, split in row blocks over TP."""
    full = torch.arange(16 * 2, dtype=torch.float32).reshape(16, 2)
    ranks: dict[tuple[int, int], dict] = {}
    for t in range(tp):
        for p in range(pp):
            state: dict = {f"model.language_model.encoder.layers.{p}.mlp.weight": torch.full((2, 2), float(t))}
            if p == 0:
                state["model.language_model.embedding.word_embeddings.weight"] = full.chunk(tp)[t].clone()
            ranks[(t, p)] = state
    return ranks


@pytest.mark.parametrize(("tp", "pp", "layout"), [(2, 1, "mp_rank"), (2, 2, "tp_pp_rank")])
def test_legacy_rank_layouts_read_resize_and_write(tmp_path: Path, tp: int, pp: int, layout: str) -> None:
    from nemo_vocab_ext.core.rows import Init
    from nemo_vocab_ext.vocab import apply_resize, plan_resize, vocab_table_shapes, vocab_tables

    ranks = _legacy_ranks(tp, pp)
    ckpt = Checkpoint(ranks[(0, 0)], {"tensor_model_parallel_size": tp}, layout, rank_tensors=ranks)
    src = tmp_path / "legacy.nemo"
    save_checkpoint(ckpt, src, Format.NEMO)
    with tarfile.open(src) as tar:
        names = set(tar.getnames())
    expected = (
        "./mp_rank_01/model_weights.ckpt" if layout == "mp_rank" else "./tp_rank_01_pp_rank_001/model_weights.ckpt"
    )
    assert expected in names
    back, _ = load_checkpoint(src)
    assert back.layout == layout and back.rank_tensors is not None and set(back.rank_tensors) == set(ranks)
    table = vocab_tables(back)["model.language_model.embedding.word_embeddings.weight"]
    assert np.array_equal(table, np.arange(32, dtype=np.float32).reshape(16, 2))  # rank blocks joined
    # The shapes the plan uses, without joining (or reading) the blocks.
    assert vocab_table_shapes(back) == {k: (t.shape, dtype_of(torch.float32)) for k, t in vocab_tables(back).items()}
    plan = plan_resize(back, 10, 20, tensor_parallel=tp, divisible_by=4, init=Init.ZEROS, padding_init=Init.MEAN)
    grown, _ = apply_resize(back, plan)
    assert grown.rank_tensors is not None
    blocks = [grown.rank_tensors[(t, 0)]["model.language_model.embedding.word_embeddings.weight"] for t in range(tp)]
    assert [b.shape[0] for b in blocks] == [12, 12]  # 24 rows re-split: every rank's range moved
    assert torch.equal(torch.cat(blocks)[:10], torch.from_numpy(table[:10]))
    if pp > 1:  # other stages' files are untouched
        later = grown.rank_tensors[(1, 1)]
        assert set(later) == set(ranks[(1, 1)]) and all(torch.equal(later[k], v) for k, v in ranks[(1, 1)].items())


def test_tar_gz_and_zarr(tmp_path: Path) -> None:
    plain = tmp_path / "m.nemo"
    save_checkpoint(synthetic(SINGLE), plain, Format.NEMO)
    old_style = tmp_path / "old.nemo"  # archives older than NeMo 1.7 are gzipped
    with tarfile.open(plain) as src, tarfile.open(old_style, "w:gz") as dst:
        for member in src.getmembers():
            dst.addfile(member, src.extractfile(member) if member.isfile() else None)
    verify_written(synthetic(SINGLE), load_checkpoint(old_style)[0], old_style, bitwise=True)

    zarr = tmp_path / "zarr.nemo"
    with tarfile.open(zarr, "w:") as tar:
        for name, data in [
            ("./model_config.yaml", b"a: 1\n"),
            ("./model_weights/metadata.json", b'{"sharded_backend": "zarr"}'),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    from nemo_vocab_ext.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match="convert_zarr_to_torch_dist"):
        load_checkpoint(zarr)


def test_config_is_dumped_as_omegaconf_dumps_it(nemo_tied_dist: Path, nemo_untied_single: Path) -> None:
    """A .nemo's config is written by libyaml, byte for byte what NeMo's OmegaConf.to_yaml writes for a
    config NeMo saved; a config holding OmegaConf's own containers is dumped by OmegaConf."""
    from omegaconf import OmegaConf

    from nemo_vocab_ext.formats.nemo import dump_config, parse_config

    for nemo in (nemo_tied_dist, nemo_untied_single):
        config = load_checkpoint(nemo)[0].config
        assert dump_config(config) == OmegaConf.to_yaml(OmegaConf.create(config)).encode()
    with_containers = {"tokenizer": OmegaConf.create({"library": "megatron"}), "precision": "bf16-mixed"}
    dumped = dump_config(with_containers)
    assert parse_config(dumped, "test") == {"tokenizer": {"library": "megatron"}, "precision": "bf16-mixed"}
