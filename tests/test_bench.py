"""tools/bench.py on the tiny shape: one command beside its floor, the memory budget from the files' metadata."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
import bench  # noqa: E402
import make_checkpoint as mc  # noqa: E402


def test_bench_measures_a_resize_against_its_floor(tmp_path: Path) -> None:
    work = tmp_path / "work"
    # The inputs written here, in this process, where the benchmark looks for them: it must reuse them.
    inp = bench.plan_inputs(work.resolve(), "tiny", True, 1.0)
    mc.make_base_tokenizer(inp.shape.vocab, inp.base_tokenizer)
    mc.make_merged_tokenizer(inp.base_tokenizer, inp.shape.new_tokens, inp.merged_tokenizer)
    mc.write_checkpoint(
        inp.dist_nemo, "nemo", inp.shape, layout="distributed", tied=True, tokenizer_dir=inp.base_tokenizer
    )
    out = tmp_path / "bench.json"
    argv = ["--workdir", str(work), "--size", "tiny", "--repeat", "1", "--skip-nemo", "--json", str(out)]
    bench.main([*argv, "--only", "resize .nemo (distributed)"])
    result = json.loads(out.read_text())
    assert result["generate_s"] == {}
    (row,) = result["rows"]
    assert row["name"] == "resize .nemo (distributed) fvt 512 -> 768 rows" and not row["errors"]
    assert row["wall_s"] > 0 and row["floor_s"] > 0 and row["peak_rss_mb"] > 0
    # The largest stored tensor is the resized embedding, read from the output's own metadata: 768 x 64 bf16.
    assert row["largest_stored_tensor_mb"] * bench.MIB == 768 * 64 * 2
    assert row["rss_budget_mb"] == 512 + 2 * 768 * 64 * 2 / bench.MIB
    names = [t["target"] for t in result["targets"]]
    assert names == [f"{row['name']}: time", f"{row['name']}: peak RSS"]
    assert result["library"]["commit"]


def test_data_rate_is_judged_on_the_scan_validate_times() -> None:
    both = bench.DataRate(whole=0.5e9, net=0.3e9, reported=4e9)
    assert both.judged == (4e9, "scan, as validate times and reports it")
    assert "net of validate without --data 0.30 GB/s" in both.text()  # the cross-check stays in view
    assert bench.DataRate(whole=0.5e9, net=2e9, reported=None).judged[0] == 2e9
    assert bench.DataRate(whole=0.5e9, net=None, reported=None).judged == (0.5e9, "whole command")


def test_peak_memory_is_the_commands_own(tmp_path: Path) -> None:
    """A child's peak RSS counts from its parent's memory at the fork; the launcher keeps that small."""
    ballast = bytearray(300 * bench.MIB)  # this process, much larger than the command it measures
    ballast[::4096] = b"1" * len(ballast[::4096])  # resident, not just reserved
    small = bench.run_measured([sys.executable, "-c", "pass"], tmp_path / "small.log", timeout=60)
    large = bench.run_measured(
        [sys.executable, "-c", "x = bytearray(200 * 2**20); x[::4096] = b'1' * len(x[::4096])"],
        tmp_path / "large.log",
        timeout=60,
    )
    del ballast
    assert small.returncode == 0 and large.returncode == 0
    assert small.maxrss_mb < 100
    assert 200 <= large.maxrss_mb < 300
    failing = bench.run_measured([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "f.log", timeout=60)
    assert failing.returncode == 3  # the command's exit status, not the launcher's
