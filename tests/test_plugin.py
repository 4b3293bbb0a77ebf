"""``+model.vocab_extension`` through the stock continual-pretraining call sequence, with real NeMo on a CPU.

Every run goes through NeMo's own ``hydra_runner`` (so the plugin is discovered exactly as in the
stock script), ``merge_cfg_with`` and ``MegatronGPTModel.restore_from(..., NLPSaveRestoreConnector())``.
The runs are started together once per module; each test reads what its run left behind.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BASE_VOCAB, LARGER_VOCAB, NemoRestorer, dead_pid, english_texts

from harness.runs import PROBE_ENV, stock_job, write_pretraining_config
from harness.tiny import NemoRunError, run_concurrently
from nemo_vocab_ext.checkpoint import Checkpoint
from nemo_vocab_ext.core.rows import Init
from nemo_vocab_ext.tokenization.load import load_tokenizer
from nemo_vocab_ext.tokenization.pieces import pieces_under
from nemo_vocab_ext.tokenization.train import train_bpe
from nemo_vocab_ext.vocab import apply_resize, plan_resize

pytestmark = pytest.mark.nemo

EMBEDDING = "model.embedding.word_embeddings.weight"
OUTPUT_LAYER = "model.output_layer.weight"
STEPS = 3
NORMAL_SEED = 7
SMALLER_VOCAB = 300  # padded to 384 rows


def tokenizer_args(vocab_dir: Path) -> list[str]:
    return [f"model.tokenizer.vocab_file={vocab_dir}/vocab.json", f"model.tokenizer.merge_file={vocab_dir}/merges.txt"]


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A Megatron dataset holding one id at or above the merged tokenizer's size."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
    from make_indexed_data import write_dataset

    prefix = str(tmp_path_factory.mktemp("data") / "bad_text_document")
    write_dataset(prefix, 5000, LARGER_VOCAB, bad=1, seed=0)
    return prefix


@pytest.fixture(scope="module")
def runs(
    tmp_path_factory: pytest.TempPathFactory,
    nemo_models: dict[str, Path],
    base_tokenizer: Path,
    larger_tokenizer: Path,
    nemo_env: dict[str, str],
    bad_data: str,
) -> dict[str, tuple[Path, NemoRunError | None]]:
    root = tmp_path_factory.mktemp("plugin_runs")
    smaller = train_bpe(english_texts(), root / "tok_smaller", SMALLER_VOCAB)
    foreign = train_bpe([t[::-1] for t in english_texts()], root / "tok_foreign", 600)  # other ids
    untied = ["model.share_embeddings_and_output_weights=False"]
    work_dir = root / "work_dir"
    work_dir.mkdir()
    # What a run killed before its cleanup leaves (its process is gone): the next run removes it.
    (work_dir / f"nemo_vocab_ext.{dead_pid()}.x1y2.tmp").mkdir()
    plans: dict[str, tuple[Path, list[str], list[str], int]] = {
        "fvt_tied_dist": (
            nemo_models["tied_dist"],
            tokenizer_args(larger_tokenizer),
            ["+model.vocab_extension.init=fvt"],
            1,
        ),
        "preset_zeros_untied_single": (
            nemo_models["untied_single"],
            tokenizer_args(larger_tokenizer) + untied,
            ["+vocab_extension@model.vocab_extension=zeros"],
            1,
        ),
        "inert_tied_dist": (nemo_models["tied_dist"], tokenizer_args(larger_tokenizer), [], 1),
        "shrink_refused": (nemo_models["tied_dist"], tokenizer_args(smaller), ["+model.vocab_extension.init=mean"], 1),
        "moved_ids_refused": (
            nemo_models["tied_dist"],
            tokenizer_args(foreign),
            ["+model.vocab_extension.init=mean"],
            1,
        ),
        "data_check": (
            nemo_models["tied_dist"],
            tokenizer_args(larger_tokenizer)
            + ["model.data.data_impl=mmap", f"model.data.data_prefix=[1.0,{bad_data}]"],
            ["+model.vocab_extension.init=mean", "+model.vocab_extension.check_data=true"],
            1,
        ),
        "tp2_mean_untied_dist": (
            nemo_models["untied_dist"],
            tokenizer_args(larger_tokenizer) + untied,
            ["+model.vocab_extension.init=mean"],
            2,
        ),
        # Every other key in one run: normal init with its seed, zero padding, no report, own work_dir.
        "keys_normal_tied_dist": (
            nemo_models["tied_dist"],
            tokenizer_args(larger_tokenizer),
            [
                "+model.vocab_extension.init=normal",
                f"+model.vocab_extension.seed={NORMAL_SEED}",
                "+model.vocab_extension.padding_init=zeros",
                "+model.vocab_extension.report=false",
                f"+model.vocab_extension.work_dir={work_dir}",
            ],
            1,
        ),
        "shrink_allowed": (
            nemo_models["tied_dist"],
            tokenizer_args(smaller),
            ["+model.vocab_extension.init=mean", "+model.vocab_extension.allow_shrink=true"],
            1,
        ),
        "override_vocab_size_refused": (
            nemo_models["tied_dist"],
            tokenizer_args(larger_tokenizer) + ["+model.override_vocab_size=1024"],
            ["+model.vocab_extension.init=mean"],
            1,
        ),
    }
    env = dict(nemo_env, **{PROBE_ENV: "probe.pt"})
    jobs = []
    for name, (nemo, run_args, extension, nproc) in plans.items():
        folder = root / name
        config = write_pretraining_config(
            folder / "conf" / "gpt.yaml", base_tokenizer, exp_dir=folder / "exp", max_steps=STEPS, tp=nproc
        )
        jobs.append(stock_job(config, [f"model.restore_from_path={nemo}", *run_args, *extension], folder, nproc=nproc))
    errors = run_concurrently(jobs, env, timeout=1200)
    return {name: (job.folder, err) for name, job, err in zip(plans, jobs, errors, strict=True)}


def ok_run(runs: dict, name: str) -> Path:
    folder, error = runs[name]
    if error is not None:
        raise AssertionError(f"{name} failed: {error}")
    return folder


def failed_run(runs: dict, name: str) -> str:
    folder, error = runs[name]
    assert error is not None, f"{name} was expected to fail"
    return error.log


def probe(folder: Path, rank: int = 0) -> dict:
    return torch.load(folder / f"probe.pt.rank{rank}")


def test_fvt_extension_keeps_old_rows_and_trains(
    runs: dict,
    nemo_tied_dist: Path,
    saved_state: Callable[[Path], dict],
    base_tokenizer: Path,
    larger_tokenizer: Path,
) -> None:
    folder = ok_run(runs, "fvt_tied_dist")
    log = (folder / "run.log").read_text()
    assert "[vocab_extension] tokenizer size: 500 -> 700" in log and "rows: 512 -> 768" in log
    record = probe(folder)
    old = saved_state(nemo_tied_dist)["state_dict"][EMBEDDING]
    start = record["start"][EMBEDDING]
    assert start.shape == (768, old.shape[1]) and record["padded_vocab_size"] == 768
    assert torch.equal(start[:BASE_VOCAB], old[:BASE_VOCAB])  # before the first step
    pieces = pieces_under(
        load_tokenizer(base_tokenizer), load_tokenizer(larger_tokenizer), range(BASE_VOCAB, LARGER_VOCAB)
    )
    for i, ids in enumerate(pieces):
        expected = old[ids].double().mean(0).to(old.dtype)
        assert torch.equal(start[BASE_VOCAB + i], expected), f"new token {BASE_VOCAB + i}"
    assert len(record["losses"]) == STEPS and all(np.isfinite(record["losses"]))


def test_trained_extension_restores_without_the_plugin(
    runs: dict, larger_tokenizer: Path, restore_nemo: NemoRestorer
) -> None:
    saved = ok_run(runs, "fvt_tied_dist") / "exp" / "checkpoints" / "megatron_gpt.nemo"
    result = restore_nemo(saved, larger_tokenizer)
    assert (result["vocab_size"], result["padded_vocab_size"]) == (LARGER_VOCAB, 768)
    assert result["state_dict"][EMBEDDING].shape[0] == 768


def test_preset_from_conf_overrides_zero_pads_untied_single_file(
    runs: dict, nemo_untied_single: Path, saved_state: Callable[[Path], dict]
) -> None:
    folder = ok_run(runs, "preset_zeros_untied_single")
    record = probe(folder)
    saved = saved_state(nemo_untied_single)["state_dict"]
    for key in (EMBEDDING, OUTPUT_LAYER):
        start, old = record["start"][key], saved[key]
        assert torch.equal(start[:BASE_VOCAB], old[:BASE_VOCAB]), key
        assert torch.equal(start[BASE_VOCAB:LARGER_VOCAB], torch.zeros(LARGER_VOCAB - BASE_VOCAB, old.shape[1]))
        pad = old[:BASE_VOCAB].double().mean(0).to(old.dtype)  # its own table's mean
        assert torch.equal(start[LARGER_VOCAB:], pad.expand(768 - LARGER_VOCAB, -1)), key


def test_without_the_override_the_plugin_is_inert(
    runs: dict, nemo_tied_dist: Path, saved_state: Callable[[Path], dict]
) -> None:
    folder = ok_run(runs, "inert_tied_dist")
    lines = [line for line in (folder / "run.log").read_text().splitlines() if "[vocab_extension]" in line]
    assert len(lines) == 1 and "[vocab_extension] plugin loaded" in lines[0]  # loaded, then nothing
    start = probe(folder)["start"][EMBEDDING]
    old = saved_state(nemo_tied_dist)["state_dict"][EMBEDDING]
    # Stock NeMo: stored rows loaded as they are (old padding rows included), the rest silently zero.
    assert torch.equal(start[:512], old) and not start[512:].any()


def test_shrink_is_refused(runs: dict) -> None:
    log = failed_run(runs, "shrink_refused")
    assert "trained rows would be dropped" in log and "+model.vocab_extension.allow_shrink=true" in log


def test_tokenizer_that_moved_ids_is_refused(runs: dict) -> None:
    log = failed_run(runs, "moved_ids_refused")
    assert "base token ids moved" in log and "pretrained rows would be scrambled" in log
    assert "tokenizer merge" in log


def test_data_check_fails_before_training(runs: dict, bad_data: str) -> None:
    log = failed_run(runs, "data_check")
    assert f">= vocab size {LARGER_VOCAB}" in log and "re-tokenize" in log
    assert "reduced_train_loss" not in log and not (runs["data_check"][0] / "probe.pt.rank0").exists()


def test_tensor_parallel_2_each_rank_gets_its_rows(
    runs: dict, nemo_untied_dist: Path, saved_state: Callable[[Path], dict]
) -> None:
    folder = ok_run(runs, "tp2_mean_untied_dist")
    saved = saved_state(nemo_untied_dist)["state_dict"]
    for key in (EMBEDDING, OUTPUT_LAYER):
        old = saved[key]
        mean = old[:BASE_VOCAB].double().mean(0).to(old.dtype)
        expected = torch.cat([old[:BASE_VOCAB], mean.expand(768 - BASE_VOCAB, -1)])
        blocks = [probe(folder, rank)["start"][key] for rank in range(2)]
        assert [b.shape[0] for b in blocks] == [384, 384]
        assert torch.equal(torch.cat(blocks), expected), key


def test_normal_seed_padding_report_and_work_dir_keys(
    runs: dict, nemo_tied_dist: Path, saved_state: Callable[[Path], dict]
) -> None:
    folder = ok_run(runs, "keys_normal_tied_dist")
    log = (folder / "run.log").read_text()
    assert "[vocab_extension] tokenizer size" not in log and "expected cost" not in log  # report=false
    work_dir = folder.parent / "work_dir"
    assert f"successfully restored from {work_dir}/nemo_vocab_ext." in log  # the resized copy lay there
    assert not any(work_dir.iterdir())  # and was removed at exit, with a killed run's leftover
    start = probe(folder)["start"][EMBEDDING]
    old = saved_state(nemo_tied_dist)["state_dict"][EMBEDDING]
    assert start.shape == (768, old.shape[1]) and torch.equal(start[:BASE_VOCAB], old[:BASE_VOCAB])
    assert not start[LARGER_VOCAB:].any()  # padding_init=zeros
    # The new rows are the normal init's draws for seed 7 (and not seed 0's, the default).
    ckpt = Checkpoint({EMBEDDING: old}, {}, "distributed")
    plan = plan_resize(
        ckpt, BASE_VOCAB, LARGER_VOCAB, tensor_parallel=1, divisible_by=128, init=Init.NORMAL, padding_init=Init.MEAN
    )
    drawn = {seed: apply_resize(ckpt, plan, seed=seed)[0].tensors[EMBEDDING] for seed in (NORMAL_SEED, 0)}
    assert torch.equal(start[BASE_VOCAB:LARGER_VOCAB], drawn[NORMAL_SEED][BASE_VOCAB:LARGER_VOCAB])
    assert not torch.equal(start[BASE_VOCAB:LARGER_VOCAB], drawn[0][BASE_VOCAB:LARGER_VOCAB])


def test_allow_shrink_drops_the_rows_past_the_smaller_tokenizer(
    runs: dict, nemo_tied_dist: Path, saved_state: Callable[[Path], dict]
) -> None:
    folder = ok_run(runs, "shrink_allowed")
    log = (folder / "run.log").read_text()
    assert f"[vocab_extension] tokenizer size: {BASE_VOCAB} -> {SMALLER_VOCAB}" in log
    record = probe(folder)
    start = record["start"][EMBEDDING]
    old = saved_state(nemo_tied_dist)["state_dict"][EMBEDDING]
    assert (record["tokenizer_vocab_size"], record["padded_vocab_size"]) == (SMALLER_VOCAB, 384)
    assert start.shape == (384, old.shape[1]) and torch.equal(start[:SMALLER_VOCAB], old[:SMALLER_VOCAB])
    mean = old[:BASE_VOCAB].double().mean(0).to(old.dtype)  # padding: the mean of the trained rows
    assert torch.equal(start[SMALLER_VOCAB:], mean.expand(384 - SMALLER_VOCAB, -1))
    assert len(record["losses"]) == STEPS


def test_a_conflicting_override_vocab_size_is_refused(runs: dict) -> None:
    log = failed_run(runs, "override_vocab_size_refused")
    assert "override_vocab_size=1024 disagrees with the padded size 768; unset it" in log
    assert "reduced_train_loss" not in log and not (runs["override_vocab_size_refused"][0] / "probe.pt.rank0").exists()
