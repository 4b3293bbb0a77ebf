"""tools/quality.py's verdict: each init's costs against the base and zeros, and the two targets, per seed."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from nemo_vocab_ext import init_costs
from nemo_vocab_ext.checkpoint import Checkpoint
from nemo_vocab_ext.core.rows import Init
from nemo_vocab_ext.vocab import plan_resize

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
quality = pytest.importorskip("quality")  # tools/quality.py (imports tools/demo.py; no NeMo)

BASE_EN = 5.0


def _run(init: str, seed: int, en0: float, th_end: float, en_end: float = 5.1) -> dict[str, Any]:
    curve = [
        {"step": 0, "en": en0, "th": 9.0, "p_new_en": 0.01, "p_new_th": 0.5},
        {"step": 20, "en": en_end, "th": th_end, "p_new_en": 0.01, "p_new_th": 0.9},
    ]
    return {"init": init, "seed": seed, "curve": curve}


def test_targets_are_met_only_within_both_margins_on_every_seed() -> None:
    runs = [
        _run("zeros", 1, 5.5, 6.0),
        _run("zeros", 2, 5.5, 6.2),
        _run("good", 1, 5.029, 6.009),  # just inside both margins
        _run("good", 2, 5.01, 6.0),
        _run("costly", 1, 5.04, 5.0),  # English cost over 0.03
        _run("costly", 2, 5.01, 5.0),
        _run("slow", 1, 5.0, 6.03),  # Thai 0.03 behind zeros
        _run("slow", 2, 5.0, 6.0),
    ]
    summary = quality.summarise(BASE_EN, runs)
    assert list(summary) == ["zeros", "good", "costly", "slow"]
    verdict = {init: [s["meets_targets"] for s in v["seeds"]] for init, v in summary.items()}
    assert verdict == {"zeros": [False, False], "good": [True, True], "costly": [False, True], "slow": [False, True]}
    assert [v["meets_targets_every_seed"] for v in summary.values()] == [False, True, False, False]
    good = summary["good"]["mean"]
    assert good["en_step0_cost"] == pytest.approx(0.0195) and good["th_final_vs_zeros"] == pytest.approx(-0.0955)
    assert good["en_final_cost"] == pytest.approx(0.1) and good["th_final"] == pytest.approx(6.0045)


def test_no_zeros_run_for_a_seed_means_no_verdict() -> None:
    summary = quality.summarise(BASE_EN, [_run("mean", 1, 5.0, 5.0)])
    assert summary["mean"]["seeds"][0]["th_final_vs_zeros"] is None
    assert not summary["mean"]["meets_targets_every_seed"]
    assert "th_final_vs_zeros" not in summary["mean"]["mean"]


# --- the packaged measurement: the README's table, the resize report and tools/quality.py agree -------------

README = Path(__file__).parents[1] / "README.md"
LABEL = "a 4-layer GPT (hidden 128) with a 2000-token English BPE + 1743 Thai tokens, 2 seeds"


def _readme_table() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Which init: measured") :]
    lines = section[section.index("| init |") :].splitlines()
    assert lines[1].startswith("|---")
    return list(itertools.takewhile(lambda line: line.startswith("|"), lines[2:]))


def test_the_readme_table_is_the_packaged_measurement() -> None:
    result = init_costs.measured()
    assert _readme_table() == init_costs.readme_rows(result)
    section = README.read_text(encoding="utf-8").split("### Which init: measured")[1].split("\n## ")[0]
    for fact in (
        f"held-out English loss is {result['base']['heldout_en_loss']:.2f} nats",
        f"({result['new']['new_tokens']} new",
        f"pretrained for {result['base']['pretraining_steps']} steps",
        f"{result['base']['vocab_size']}-token BPE",
        f"English after {result['continual_steps']} steps",
        f"{result['model']['num_layers']} layers, hidden {result['model']['hidden_size']}",
    ):
        assert fact in section, fact
    # The file is read from the package; the repository's copy is that file.
    packaged = Path(init_costs.__file__).parent / init_costs.RESULT_FILE
    assert json.loads(packaged.read_text(encoding="utf-8")) == result


def test_the_resize_report_quotes_the_packaged_measurement(tmp_path: Path) -> None:
    result = init_costs.measured()
    ckpt = Checkpoint({"model.embedding.word_embeddings.weight": torch.zeros(8, 2)}, {}, "distributed")
    for init in map(Init, result["inits"]):  # the others: tests/test_inits.py
        row = result["inits"][str(init)]
        lines = plan_resize(ckpt, 8, 12, tensor_parallel=1, divisible_by=4, init=init, padding_init=Init.MEAN).lines()
        (line,) = [line for line in lines if line.startswith(f"expected cost of '{init}': ")]
        assert line.endswith(init_costs.expected_cost(init))
        assert (
            "measured on a 4-layer GPT (hidden 128) with a 2000-token English BPE + 1743 Thai tokens, 2 seeds: " in line
        )
        assert f"{row['en_step0_cost']:+.2f} nats" in line and f"({row['p_new_en_step0']:.0%} of probability" in line
    readme = README.read_text(encoding="utf-8")
    assert readme.count(f"expected cost of 'mean': {init_costs.expected_cost(Init.MEAN)}\n") == 2  # both examples
    # Other numbers give another line: the report is not typed by hand.
    changed = json.loads(json.dumps(result))
    changed["inits"]["mean"]["en_step0_cost"] = 0.5
    changed["seeds"] = [7]
    other = init_costs.expected_cost(Init.MEAN, changed)
    assert "+0.50 nats" in other and "1 seed:" in other


def test_the_tool_writes_the_packaged_form() -> None:
    """tools/quality.py's measured.json has the packaged file's keys, and the report and README read it."""
    runs = [_run(init, seed, 5.1, 6.0 - 0.1 * k) for k, init in enumerate(i.value for i in Init) for seed in (1, 2)]
    args = quality.parse_args(["--seeds", "1,2"])
    written = quality.measured_result(quality.summarise(BASE_EN, runs), BASE_EN, 2000, 1743, args)
    written = json.loads(json.dumps(written))
    packaged = init_costs.measured()
    assert set(written) == set(packaged)
    for part in ("model", "base", "new"):
        assert set(written[part]) == set(packaged[part])
    assert list(written["inits"]) == [i.value for i in Init]
    assert list(packaged["inits"]) == [name for name in written["inits"] if name in packaged["inits"]]
    for init in map(Init, packaged["inits"]):
        assert set(packaged["inits"][str(init)]) <= set(written["inits"][str(init)])
        assert init_costs.expected_cost(init, written) != init_costs.expected_cost(init, packaged)
    assert len(init_costs.readme_rows(written)) == len(Init)
    last = list(Init)[-1]  # the lowest Thai loss above
    ahead = f"the best on the new one ({0.1 * (len(Init) - 1):.2f} nats ahead of zeros)"
    assert ahead in init_costs.expected_cost(last, written)
