"""The CLI on real NeMo files: round trips are bit-exact and what it writes restores in NeMo.

NeMo builds the fixtures and restores the outputs (subprocesses); the CLI itself never imports NeMo.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import BASE_VOCAB, LARGER_VOCAB, NEMO_MODELS, NemoRestorer, invoke_cli

from nemo_vocab_ext.io import load_checkpoint, verify_written

pytestmark = pytest.mark.nemo

EMBEDDING = "model.embedding.word_embeddings.weight"
OUTPUT_LAYER = "model.output_layer.weight"


def cli(*args: str | Path) -> str:
    result = invoke_cli(*args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def round_trip(src: Path, work: Path) -> Path:
    """.nemo -> safetensors -> .nemo -> .ckpt -> .nemo, each step verified by the CLI itself."""
    chain = [work / "a.safetensors", work / "b.nemo", work / "c.ckpt", work / "d.nemo"]
    previous = src
    for dst in chain:
        cli("convert", previous, dst)
        previous = dst
    return chain[-1]


@pytest.fixture(scope="module")
def converted(nemo_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {name: round_trip(path, tmp_path_factory.mktemp(name)) for name, path in nemo_models.items()}


@pytest.fixture(scope="module")
def resized(
    nemo_models: dict[str, Path], larger_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    out = {}
    for name, path in nemo_models.items():
        dst = tmp_path_factory.mktemp("resized") / f"{name}.nemo"
        cli("resize", path, dst, "--tokenizer", larger_tokenizer, "--init", "mean")
        out[name] = dst
    return out


# Each model written in the other layout (distributed <-> single file).
OTHER_LAYOUT = {name: "single" if name.endswith("_dist") else "distributed" for name in NEMO_MODELS}


@pytest.fixture(scope="module")
def relaid(nemo_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for name, path in nemo_models.items():
        out[name] = tmp_path_factory.mktemp("relaid") / f"{name}.nemo"
        cli("convert", path, out[name], "--layout", OTHER_LAYOUT[name])
    return out


@pytest.fixture(scope="module")
def restored(
    converted: dict[str, Path],
    resized: dict[str, Path],
    relaid: dict[str, Path],
    larger_tokenizer: Path,
    restore_nemo: NemoRestorer,
) -> dict[tuple[str, str], dict]:
    keys = [(name, kind) for kind in ("converted", "resized", "relaid") for name in NEMO_MODELS]
    sources = {"converted": converted, "resized": resized, "relaid": relaid}
    jobs = [(sources[kind][n], larger_tokenizer if kind == "resized" else None) for n, kind in keys]
    results = restore_nemo.many(jobs)
    for key, result in zip(keys, results, strict=True):
        if isinstance(result, Exception):
            raise AssertionError(f"{key} did not restore in NeMo: {result}")
    return dict(zip(keys, results, strict=True))  # type: ignore[arg-type]


@pytest.mark.parametrize("name", NEMO_MODELS)
def test_round_trip_is_bit_exact_on_every_tensor(
    nemo_models: dict[str, Path], converted: dict[str, Path], name: str
) -> None:
    source, _ = load_checkpoint(nemo_models[name])
    final, _ = load_checkpoint(converted[name])
    assert final.layout == source.layout
    verify_written(source, final, converted[name], bitwise=True)
    assert set(final.tensors) == set(source.tensors)


@pytest.mark.parametrize("kind", ["converted", "relaid"])
@pytest.mark.parametrize("name", NEMO_MODELS)
def test_round_trip_and_other_layout_restore_in_nemo_unchanged(
    nemo_models: dict[str, Path], saved_state: Callable[[Path], dict], restored: dict, name: str, kind: str
) -> None:
    saved = saved_state(nemo_models[name])["state_dict"]
    back = restored[(name, kind)]["state_dict"]
    assert set(back) == set(saved)
    for key, tensor in saved.items():
        assert torch.equal(back[key], tensor), key


@pytest.mark.parametrize("name", NEMO_MODELS)
def test_resized_restores_with_new_tokenizer_old_rows_identical(
    nemo_models: dict[str, Path], saved_state: Callable[[Path], dict], restored: dict, name: str
) -> None:
    saved = saved_state(nemo_models[name])["state_dict"]
    result = restored[(name, "resized")]
    assert (result["vocab_size"], result["padded_vocab_size"]) == (LARGER_VOCAB, 768)
    tables = [EMBEDDING] + ([OUTPUT_LAYER] if name.startswith("untied") else [])
    for key in tables:
        new, old = result["state_dict"][key], saved[key]
        assert new.shape == (768, old.shape[1])
        assert torch.equal(new[:BASE_VOCAB], old[:BASE_VOCAB])  # old rows bit-identical
        mean = old[:BASE_VOCAB].double().mean(0).to(old.dtype)  # the table's own old real rows
        assert torch.equal(new[BASE_VOCAB:], mean.expand(768 - BASE_VOCAB, -1))
    others = set(saved) - set(tables)
    assert all(torch.equal(result["state_dict"][k], saved[k]) for k in others)


@pytest.mark.parametrize("name", NEMO_MODELS)
def test_other_layout_is_written_as_asked(relaid: dict[str, Path], name: str) -> None:
    assert load_checkpoint(relaid[name])[0].layout == OTHER_LAYOUT[name]


def test_inspect_and_validate_on_nemo_files(
    nemo_tied_dist: Path, resized: dict[str, Path], larger_tokenizer: Path
) -> None:
    import json

    info = json.loads(cli("inspect", nemo_tied_dist, "--json"))
    assert (
        info["layout"] == "distributed" and info["embedding_rows"] == 512 and info["tokenizer_vocab_size"] == BASE_VOCAB
    )
    assert info["tied"] is True and info["has_output_layer"] is False
    result = invoke_cli("validate", nemo_tied_dist, "--tokenizer", larger_tokenizer, "--json")
    report = json.loads(result.output)
    assert result.exit_code == 1 and report["ok"] is False
    failed = [c["name"] for c in report["checks"] if not c["ok"]]
    assert failed == ["embedding rows"]
    assert cli("validate", resized["untied_dist"], "--tokenizer", larger_tokenizer).rstrip().endswith("ok")
