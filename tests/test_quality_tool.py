"""tools/quality.py's verdict: each init's costs against the base and zeros, and the two targets, per seed."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

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
