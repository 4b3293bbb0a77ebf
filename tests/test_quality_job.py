"""The quality experiment's NeMo job on a tiny untied model: real forward passes, old logits kept, curve recorded."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import BASE_VOCAB, LARGER_VOCAB, english_texts

from harness.runs import write_pretraining_config
from harness.tiny import NemoJob, run_concurrently
from nemo_vocab_ext.tokenization.load import load_tokenizer

pytestmark = pytest.mark.nemo

SEQ = 64  # the tiny test model's sequence length


def _sequences(vocab_dir: Path, count: int) -> torch.Tensor:
    ids = [i for doc in load_tokenizer(vocab_dir).encode_batch(english_texts()[:40]) for i in doc]
    return torch.tensor([ids[k * (SEQ + 1) : (k + 1) * (SEQ + 1)] for k in range(count)])


def test_quality_job_measures_an_extended_untied_model(
    tmp_path: Path, nemo_untied_dist: Path, base_tokenizer: Path, larger_tokenizer: Path, nemo_env: dict[str, str]
) -> None:
    # "en": ids the base knows; "th": the same text under the larger tokenizer, which uses new ids.
    heldout = {"en": _sequences(base_tokenizer, 4), "th": _sequences(larger_tokenizer, 4)}
    assert int(heldout["en"].max()) < BASE_VOCAB <= int(heldout["th"].max())
    torch.save(heldout, tmp_path / "heldout.pt")
    config = tmp_path / "conf" / "gpt.yaml"
    write_pretraining_config(config, base_tokenizer, exp_dir=tmp_path / "exp", tied=False, max_steps=2, save_nemo=False)
    common = ["--config", str(config), "--nemo", str(nemo_untied_dist), "--heldout", str(tmp_path / "heldout.pt")]
    common += ["--base-logits", str(tmp_path / "base_logits.pt"), "--eval-every", "1"]
    module = "harness.quality_job"
    base = NemoJob.module(module, [*common, "--out", str(tmp_path / "base.json")], tmp_path / "base")
    assert run_concurrently([base], nemo_env) == [None]
    extended_args = ["--init", "fvt", "--vocab-dir", str(larger_tokenizer), "--out", str(tmp_path / "ext.json")]
    extended = NemoJob.module(module, [*common, *extended_args], tmp_path / "ext")
    (error,) = run_concurrently([extended], nemo_env)
    assert error is None, error

    base_result = json.loads((tmp_path / "base.json").read_text())
    assert base_result["vocab_size"] == BASE_VOCAB and math.isfinite(base_result["en"])
    result = json.loads((tmp_path / "ext.json").read_text())
    assert (result["vocab_size"], result["padded_vocab_size"]) == (LARGER_VOCAB, 768)
    assert result["old_logits_equal"] and result["old_logits_max_abs_diff"] == 0.0
    assert [p["step"] for p in result["curve"]] == [0, 1, 2] and len(result["train_losses"]) == 2
    step0 = result["curve"][0]
    assert all(math.isfinite(step0[k]) for k in ("en", "th", "p_new_en", "p_new_th"))
    assert 0.0 < step0["p_new_en"] < 1.0 and step0["p_new_th"] > 0.0
    log = (tmp_path / "ext" / "quality_job.log").read_text()
    assert "embedding and untied output layer, each with its own statistics" in log
    assert "init 'fvt'" in log
