"""The genuine stock ``megatron_gpt_pretraining.py`` from a NeMo checkout, unmodified, with the plugin.

NeMo's ``examples/`` are not on PyPI: ``NEMO_EXAMPLES_DIR`` points at a NeMo checkout (2.4.x); it
defaults to ``<repo>/../shared/nemo-v2.4.0`` (an unmodified copy of the script and its config, laid
out as a checkout) when that folder exists. Without either the test is skipped and says why. The
override set is the one a user passes, plus the CPU preset from ``conf_overrides`` (``+platform=cpu``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import BASE_VOCAB, LARGER_VOCAB

from harness.tiny import NemoJob, run_concurrently
from nemo_vocab_ext.io import load_checkpoint

SCRIPT = "examples/nlp/language_modeling/megatron_gpt_pretraining.py"
DEFAULT_EXAMPLES_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "nemo-v2.4.0"
NEMO_EXAMPLES_DIR = os.environ.get("NEMO_EXAMPLES_DIR") or (
    str(DEFAULT_EXAMPLES_DIR) if DEFAULT_EXAMPLES_DIR.is_dir() else None
)

pytestmark = [
    pytest.mark.nemo,
    # Checked before any fixture is built, so a skip costs nothing.
    pytest.mark.skipif(
        not NEMO_EXAMPLES_DIR,
        reason=f"NEMO_EXAMPLES_DIR is not set and {DEFAULT_EXAMPLES_DIR} does not exist: "
        f"one must be a NeMo 2.4.x checkout with {SCRIPT}",
    ),
]
EMBEDDING = "model.embedding.word_embeddings.weight"


def stock_script() -> Path:
    script = Path(str(NEMO_EXAMPLES_DIR)) / SCRIPT
    if not script.is_file():
        pytest.fail(f"NEMO_EXAMPLES_DIR={NEMO_EXAMPLES_DIR} has no {SCRIPT}")
    return script


def test_genuine_stock_script_extends_with_the_plugin(
    tmp_path: Path,
    nemo_tied_dist: Path,
    larger_tokenizer: Path,
    saved_state: Callable[[Path], dict],
    nemo_env: dict[str, str],
) -> None:
    script = stock_script()
    overrides = [
        "+platform=cpu",
        f"model.restore_from_path={nemo_tied_dist}",
        f"model.tokenizer.vocab_file={larger_tokenizer}/vocab.json",
        f"model.tokenizer.merge_file={larger_tokenizer}/merges.txt",
        "+model.vocab_extension.init=mean",
        "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=256", "model.num_attention_heads=4",
        "model.encoder_seq_length=64", "model.micro_batch_size=2", "model.global_batch_size=2",
        "model.data.data_impl=mock", "model.data.data_prefix=[]", "model.data.num_workers=0",
        "model.optim.sched.warmup_steps=1",
        "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=0",
        f"exp_manager.explicit_log_dir={tmp_path / 'exp'}", "exp_manager.resume_if_exists=False",
        "exp_manager.checkpoint_callback_params.save_top_k=0",
        "exp_manager.checkpoint_callback_params.filename='megatron_gpt--{step}'",
        "exp_manager.checkpoint_callback_params.save_nemo_on_train_end=True",
        "exp_manager.checkpoint_callback_params.monitor=reduced_train_loss",
    ]  # fmt: skip
    job = NemoJob.module("harness.run_script", [str(script), *overrides], tmp_path)
    (error,) = run_concurrently([job], nemo_env)
    assert error is None, error
    log = job.log.read_text()
    assert f"[vocab_extension] tokenizer size: {BASE_VOCAB} -> {LARGER_VOCAB}" in log
    trained = tmp_path / "exp" / "checkpoints" / "megatron_gpt.nemo"
    ckpt, _ = load_checkpoint(trained)
    assert ckpt.tensors[EMBEDDING].shape[0] == 768  # type: ignore[union-attr]
    old = saved_state(nemo_tied_dist)["state_dict"][EMBEDDING]
    assert not torch.equal(ckpt.tensors[EMBEDDING][:BASE_VOCAB], old[:BASE_VOCAB])  # it trained  # type: ignore[index]
