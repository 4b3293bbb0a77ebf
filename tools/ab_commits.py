"""A/B of one nemo-vocab-ext command at two versions of the library, in interleaved pairs.

    python tools/ab_commits.py --base HEAD~1 --pairs 20 -- resize RUN OUT --tokenizer TOK

Runs ``python -m nemo_vocab_ext.cli ARGS`` alternately with the library of ``--base`` (``git
archive`` of that commit, put first on ``PYTHONPATH``) and with this checkout's (as installed),
starting each pair with a different one; ``OUT`` (the argument after the source) is removed before
every run. Prints each side's wall-time median, quartiles and range, and the median of the pairs'
differences: on a shared machine only differences within pairs, and their spread, say anything.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def run_once(args: list[str], out: Path, pythonpath: str | None, cwd: Path) -> float:
    remove(out)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | (
        {"PYTHONPATH": pythonpath} if pythonpath else {}
    )
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "nemo_vocab_ext.cli", *args], cwd=cwd, env=env, capture_output=True)
    wall = time.perf_counter() - start
    if done.returncode:
        said = done.stderr.decode(errors="replace").strip().splitlines() or [""]
        raise SystemExit(f"{args[0]} exited {done.returncode}: {said[-1]}")  # the error's own line
    return wall


def summary(name: str, walls: list[float]) -> str:
    q1, _, q3 = statistics.quantiles(walls, n=4)
    return (
        f"{name:5s} median {statistics.median(walls):.3f} s  quartiles {q1:.3f}-{q3:.3f}  "
        f"range {min(walls):.3f}-{max(walls):.3f}  ({len(walls)} runs)"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="the commit to compare with")
    p.add_argument("--pairs", type=int, default=10)
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the CLI's arguments")
    options = p.parse_args(argv)
    args = options.command[1:] if options.command[:1] == ["--"] else options.command
    if options.pairs < 2:
        p.error("--pairs: at least 2 (quartiles need two values)")
    if len(args) < 3:
        p.error("give the command after --: e.g. -- resize SRC OUT --tokenizer TOK")
    out = Path(args[2]).resolve()
    args = [*args[:2], str(out), *args[3:]]
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", options.base, "nemo_vocab_ext"], capture_output=True
        )
        if archive.returncode:
            raise SystemExit(archive.stderr.decode().strip())
        base, cwd = Path(tmp) / "base", Path(tmp) / "cwd"
        base.mkdir()
        cwd.mkdir()
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive.stdout, check=True)
        # Run in an empty folder: `-m` puts the working folder first on sys.path.
        sides = {"base": str(base), "this": None}
        walls: dict[str, list[float]] = {name: [] for name in sides}
        for pair in range(options.pairs):
            for name in sorted(sides, reverse=bool(pair % 2)):
                walls[name].append(run_once(args, out, sides[name], cwd))
        remove(out)
    print(f"base = {options.base}, this = the checkout as installed; {options.pairs} interleaved pairs")
    for name, measured in walls.items():
        print(summary(name, measured))
    differences = [b - t for b, t in zip(walls["base"], walls["this"], strict=True)]
    q1, _, q3 = statistics.quantiles(differences, n=4)
    print(f"base - this, per pair: median {statistics.median(differences):+.3f} s, quartiles {q1:+.3f} to {q3:+.3f}")


if __name__ == "__main__":
    main()
