"""Resuming through the stock script with ``model.vocab_extension`` set: an extended run resumes
untouched, and a training checkpoint whose table does not fit the configured tokenizer is refused
(megatron would otherwise zero-fill or truncate the table and its optimizer moments silently)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from harness.runs import PROBE_ENV, stock_job, write_pretraining_config
from harness.tiny import NemoJob, NemoRunError, run_concurrently
from nemo_vocab_ext.formats.torch_dist import read_tensor_infos, read_torch_dist

pytestmark = pytest.mark.nemo

EMBEDDING = "model.embedding.word_embeddings.weight"
EXP_AVG = "optimizer.state.exp_avg." + EMBEDDING
SAVE = [
    "exp_manager.create_checkpoint_callback=True",
    "exp_manager.checkpoint_callback_params.save_top_k=1",
    "exp_manager.checkpoint_callback_params.save_last=True",
    "exp_manager.checkpoint_callback_params.save_nemo_on_train_end=False",
    # No validation runs: save by step (Lightning wants every_n_epochs off then).
    "+exp_manager.checkpoint_callback_params.every_n_train_steps=2",
    "+exp_manager.checkpoint_callback_params.every_n_epochs=null",
]


def tokenizer_args(vocab_dir: Path) -> list[str]:
    return [f"model.tokenizer.vocab_file={vocab_dir}/vocab.json", f"model.tokenizer.merge_file={vocab_dir}/merges.txt"]


def last_checkpoint(folder: Path) -> Path:
    (last,) = [p for p in (folder / "exp" / "checkpoints").iterdir() if p.name.endswith("-last")]
    return last


def check(errors: list[NemoRunError | None]) -> None:
    for error in errors:
        if error is not None:
            raise AssertionError(str(error))


@pytest.fixture(scope="module")
def resumed(
    tmp_path_factory: pytest.TempPathFactory,
    nemo_tied_dist: Path,
    base_tokenizer: Path,
    larger_tokenizer: Path,
    nemo_env: dict[str, str],
) -> dict[str, tuple[Path, NemoRunError | None]]:
    root = tmp_path_factory.mktemp("resume")
    env = dict(nemo_env, **{PROBE_ENV: "probe.pt"})
    restore = [f"model.restore_from_path={nemo_tied_dist}"]
    extension = ["+model.vocab_extension.init=mean"]

    def job(name: str, overrides: list[str], steps: int, log: str = "run.log") -> NemoJob:
        folder = root / name
        config = write_pretraining_config(
            folder / f"conf{steps}" / "gpt.yaml", base_tokenizer, exp_dir=folder / "exp", max_steps=steps
        )
        return dataclasses.replace(stock_job(config, overrides, folder), log_name=log)

    # Two training runs that save checkpoints: one extended by the plugin, one at the base size.
    first = [
        job("extended", restore + tokenizer_args(larger_tokenizer) + extension + SAVE, 2),
        job("base_size", restore + tokenizer_args(base_tokenizer) + SAVE, 2),
    ]
    check(run_concurrently(first, env))
    # What the extended run saved at step 2 (its "-last" is replaced by step 4's on resume), and its probe.
    saved = read_torch_dist(last_checkpoint(root / "extended"), [EMBEDDING, EXP_AVG])
    torch.save(saved, root / "extended" / "step2.pt")
    (root / "extended" / "probe.pt.rank0").rename(root / "extended" / "first_probe.pt")
    # The extended run goes on (resume_if_exists); the base-size checkpoint is loaded with the merged tokenizer.
    resume = ["exp_manager.resume_if_exists=True"]
    extended_again = job(
        "extended", restore + tokenizer_args(larger_tokenizer) + extension + SAVE + resume, 4, "resume.log"
    )
    mismatched = job(
        "mismatched",
        tokenizer_args(larger_tokenizer)
        + extension
        + [f"+model.restore_from_ckpt='{last_checkpoint(root / 'base_size')}'"],
        2,
    )
    errors = run_concurrently([extended_again, mismatched], env)
    return {"extended": (root / "extended", errors[0]), "mismatched": (root / "mismatched", errors[1])}


def test_an_extended_run_resumes_untouched(resumed: dict) -> None:
    folder, error = resumed["extended"]
    assert error is None, error
    stored = read_tensor_infos(last_checkpoint(folder))
    assert stored[EMBEDDING].shape == (768, 64)
    assert stored[EXP_AVG].shape == (768, 64)
    log = (folder / "resume.log").read_text()
    assert "Restoring states from the checkpoint path" in log or "Restored all states" in log
    record = torch.load(folder / "probe.pt.rank0")
    assert len(record["losses"]) == 2  # steps 3 and 4 of 4
    # The resumed run starts from the weights saved at step 2, not from a fresh extension of the base.
    step2 = torch.load(folder / "step2.pt")
    extended_at_start = torch.load(folder / "first_probe.pt")["start"][EMBEDDING]
    assert not torch.equal(step2[EMBEDDING], extended_at_start)  # two steps of training moved the table
    assert torch.equal(record["start"][EMBEDDING], step2[EMBEDDING])
    # and goes on training from there, moments included.
    step4 = read_torch_dist(last_checkpoint(folder), [EMBEDDING, EXP_AVG])
    assert not torch.equal(step4[EMBEDDING], step2[EMBEDDING])
    assert step2[EXP_AVG].abs().sum() > 0 and not torch.equal(step4[EXP_AVG], step2[EXP_AVG])


def test_a_training_checkpoint_of_another_size_is_refused(resumed: dict) -> None:
    _, error = resumed["mismatched"]
    assert error is not None
    assert "training checkpoint has 512 embedding rows but the model has 768" in error.log
    assert "nemo-vocab-ext convert" in error.log
