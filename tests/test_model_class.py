"""``VocabExtensionGPTModel.restore_from`` called directly, as a user would from Python (real NeMo, CPU)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import BASE_VOCAB, LARGER_VOCAB

from harness.tiny import NemoJob, run_concurrently

pytestmark = pytest.mark.nemo

EMBEDDING = "model.embedding.word_embeddings.weight"


def restore_job(folder: Path, nemo: Path, vocab_dir: Path, init: str) -> NemoJob:
    args = ["--nemo", str(nemo), "--vocab-dir", str(vocab_dir), "--dump", str(folder / "dump.pt")]
    return NemoJob.module("harness.restore", [*args, "--vocab-extension", init], folder)


def test_subclass_extends_single_file_and_leaves_matching_sizes_alone(
    tmp_path: Path,
    nemo_tied_single: Path,
    nemo_tied_dist: Path,
    base_tokenizer: Path,
    larger_tokenizer: Path,
    saved_state: Callable[[Path], dict],
    nemo_env: dict[str, str],
) -> None:
    grow = restore_job(tmp_path / "grow", nemo_tied_single, larger_tokenizer, "mean")
    same = restore_job(tmp_path / "same", nemo_tied_dist, base_tokenizer, "mean")
    errors = run_concurrently([grow, same], nemo_env)
    assert errors == [None, None], errors

    grown = torch.load(tmp_path / "grow" / "dump.pt")
    old = saved_state(nemo_tied_single)["state_dict"][EMBEDDING]
    assert (grown["vocab_size"], grown["padded_vocab_size"]) == (LARGER_VOCAB, 768)
    table = grown["state_dict"][EMBEDDING]
    assert torch.equal(table[:BASE_VOCAB], old[:BASE_VOCAB])
    assert torch.equal(table[BASE_VOCAB:], old[:BASE_VOCAB].double().mean(0).to(old.dtype).expand(768 - BASE_VOCAB, -1))
    assert "[vocab_extension] resized the vocabulary before loading" in grow.log.read_text()

    untouched = torch.load(tmp_path / "same" / "dump.pt")["state_dict"]
    saved = saved_state(nemo_tied_dist)["state_dict"]
    assert all(torch.equal(untouched[k], v) for k, v in saved.items())
    assert "nothing to do" in same.log.read_text()
