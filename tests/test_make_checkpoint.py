"""tools/make_checkpoint.py: generated checkpoints store what NeMo stores, and NeMo restores them.

The reference is the session's NeMo-built tiny models (``nemo_models``: same config, same
500-token tokenizer); the generated ones are written through the project's own writers.
"""

from __future__ import annotations

import pickle
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import BASE_VOCAB, NemoRestorer
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
import make_checkpoint as mc  # noqa: E402

from nemo_vocab_ext.tokenization.check import check_ids_preserved  # noqa: E402
from nemo_vocab_ext.tokenization.load import load_tokenizer  # noqa: E402

TINY = mc.SIZES["tiny"]
# fixture name in conftest.NEMO_MODELS -> (layout, tied)
MODELS = {
    "tied_dist": ("distributed", True),
    "untied_dist": ("distributed", False),
    "tied_single": ("single", True),
    "untied_single": ("single", False),
}


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory, base_tokenizer: Path) -> dict[str, Path]:
    """The tiny shape in each layout, tied and untied, as .nemo files with ``base_tokenizer`` embedded."""
    root = tmp_path_factory.mktemp("generated")
    return {
        name: mc.write_checkpoint(
            root / f"{name}.nemo", "nemo", TINY, layout=layout, tied=tied, tokenizer_dir=base_tokenizer
        )
        for name, (layout, tied) in MODELS.items()
    }


def distributed_blobs(nemo: Path, tmp: Path) -> dict[str, bytes]:
    """The byte entries of a distributed .nemo, read straight from the .distcp files (no library reader)."""
    with tarfile.open(nemo) as tar:
        tar.extractall(tmp, filter="data")
    folder = tmp / "model_weights"
    metadata = pickle.loads((folder / ".metadata").read_bytes())  # files built in this session
    blobs = {}
    for index, info in metadata.storage_data.items():
        if isinstance(metadata.state_dict_metadata[index.fqn], BytesStorageMetadata):
            with open(folder / info.relative_path, "rb") as f:
                f.seek(info.offset)
                blobs[index.fqn] = f.read(info.length)
    return blobs


@pytest.mark.nemo
@pytest.mark.parametrize("name", MODELS)
def test_entries_are_those_nemo_stores(
    name: str, nemo_models: dict[str, Path], generated: dict[str, Path], tmp_path: Path
) -> None:
    real = mc.stored_entries(nemo_models[name])
    ours = mc.stored_entries(generated[name])
    assert sorted(ours) == sorted(real)
    for key, entry in real.items():
        assert (ours[key].kind, ours[key].shape) == (entry.kind, entry.shape), key
    assert {e.dtype for e in ours.values() if e.kind == "tensor"} == {"bfloat16"}
    if MODELS[name][0] == "distributed":  # megatron's blob for an empty extra state, byte for byte
        real_blobs = distributed_blobs(nemo_models[name], tmp_path / "real")
        assert real_blobs and distributed_blobs(generated[name], tmp_path / "ours") == real_blobs


@pytest.mark.nemo
def test_nemo_restores_the_generated_values(generated: dict[str, Path], restore_nemo: NemoRestorer) -> None:
    results = restore_nemo.many([(path, None) for path in generated.values()])
    for (name, (_, tied)), result in zip(MODELS.items(), results, strict=True):
        assert not isinstance(result, Exception), f"{name}: {result}"
        assert (result["vocab_size"], result["padded_vocab_size"]) == (BASE_VOCAB, TINY.padded_vocab)
        expected = {k: v for k, v in mc.generate_tensors(TINY, "single", tied) if isinstance(v, torch.Tensor)}
        state = result["state_dict"]
        assert sorted(state) == sorted(expected), name
        for key, value in expected.items():  # NeMo's model is float32; bf16 -> float32 is exact
            assert torch.equal(state[key], value.float()), f"{name}: {key}"


@pytest.mark.parametrize("layout", ["distributed", "single"])
def test_every_format_stores_the_same_tensors(layout: str, base_tokenizer: Path, tmp_path: Path) -> None:
    outs = {
        fmt: mc.write_checkpoint(
            tmp_path / name, fmt, TINY, layout=layout, tied=False, tokenizer_dir=base_tokenizer, seed=3
        )
        for fmt, name in (("nemo", "m.nemo"), ("safetensors", "m.safetensors"), ("ckpt", "m.ckpt"))
    }
    entries = {fmt: mc.stored_entries(path) for fmt, path in outs.items()}
    tensors = {fmt: {k: e for k, e in es.items() if e.kind == "tensor"} for fmt, es in entries.items()}
    assert tensors["safetensors"] == tensors["nemo"] == tensors["ckpt"]
    assert (tmp_path / "m.ckpt").is_dir() == (layout == "distributed")  # NeMo's training-checkpoint folder
    largest = max(e.nbytes for e in tensors["nemo"].values())
    assert {mc.largest_stored_tensor_bytes(path) for path in outs.values()} == {largest}


def test_values_are_seeded_and_the_same_in_both_layouts() -> None:
    single = dict(mc.generate_tensors(TINY, "single", tied=False, seed=7))
    dist = dict(mc.generate_tensors(TINY, "distributed", tied=False, seed=7))
    stacked = dist["model.decoder.layers.mlp.linear_fc1.layer_norm_weight"]
    for i in range(TINY.num_layers):
        assert torch.equal(stacked[i], single[f"model.decoder.layers.{i}.pre_mlp_layernorm.weight"])
    assert torch.equal(dist[mc.OUTPUT_LAYER], single[mc.OUTPUT_LAYER])
    again = dict(mc.generate_tensors(TINY, "single", tied=False, seed=7))
    other = dict(mc.generate_tensors(TINY, "single", tied=False, seed=8))
    assert all(torch.equal(v, again[k]) for k, v in single.items() if isinstance(v, torch.Tensor))
    assert not torch.equal(single[mc.EMBEDDING], other[mc.EMBEDDING])
    assert not torch.equal(single[mc.EMBEDDING], single[mc.OUTPUT_LAYER])


def test_gpt_1_3b_shapes() -> None:
    shape = mc.SIZES["1.3b"]
    # 50304*2048 + 2048*2048 + 24 * (3*2048*2049 + 2048*2049 + 8192*2049 + 2048*8193 + 4*2048) + 2*2048
    assert shape.num_parameters(tied=True) == 1_315_819_520
    assert (shape.padded_vocab, shape.padded_new_vocab) == (50304, 57344)
    specs = {s.key: s for s in mc.key_specs(shape, "distributed", tied=True)}
    assert specs["model.decoder.layers.mlp.linear_fc1.weight"].shape == (24, 8192, 2048)
    assert sum(s.shape is None for s in specs.values()) == 4 * 24  # one extra-state blob per module and layer
    single = mc.key_specs(shape, "single", tied=False)
    assert len(single) == 2 + 24 * 16 + 2 + 2


def test_tokenizers_have_exactly_the_sizes_asked(tmp_path: Path) -> None:
    base = mc.make_base_tokenizer(300, tmp_path / "base")
    merged = mc.make_merged_tokenizer(base, 120, tmp_path / "merged")
    base_tok, merged_tok = load_tokenizer(base), load_tokenizer(merged)
    assert (base_tok.vocab_size, merged_tok.vocab_size) == (300, 420)
    assert check_ids_preserved(base_tok, merged_tok).ok
    stamp = (merged / "vocab.json").stat().st_mtime_ns
    mc.make_merged_tokenizer(base, 120, tmp_path / "merged")  # reused, not trained again
    assert (merged / "vocab.json").stat().st_mtime_ns == stamp
