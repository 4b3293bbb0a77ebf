"""A/B measurement of three choices in the 1.3B benchmark resize, each run in a pair with a ``cp``.

    python tools/bench.py --workdir /work/bench_run --only resize --skip-nemo --generate-only
    python tools/ab_resize.py --workdir /work/bench_run --pairs 8 --json /work/bench_run/ab.json

The choices, selected by environment variables that the library reads only in the commit
"Measurement switches NVE_BESIDE, NVE_SWITCH, NVE_EXIT" (measurement only; without it every variant
runs the default and the comparison means nothing):

- ``NVE_BESIDE=fork|thread|inline``: the tokenizer checks and new rows computed in a forked process
  (rows handed back through shared memory), on a thread, or in line before the copy;
- ``NVE_EXIT=os_exit|normal``: the console script ends with ``os._exit`` or with the interpreter's
  teardown;
- ``NVE_SWITCH=short|default``: ``sys.setswitchinterval(2e-4)`` or Python's 5 ms.

Each pair is ``cp --reflink=never`` of the source .nemo and the resize of it (fvt, as ``bench.py``
runs it), in alternating order, each started with the source just read through (warm page cache)
and after a ``sync``; variants are interleaved (ABC ABC ...) so that the machine's load drifts over
all of them alike. Wall time and peak RSS come from ``bench.py``'s launcher (``wait4``); the
resize's CPU time (user + system, its forked child included) from ``/usr/bin/time``, which the
load of other processes on the machine inflates far less than it does wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))

from bench import Run, cli_command, compile_library, plan_inputs, read_through, remove, run_measured, settle  # noqa: E402

DEFAULT = {"NVE_BESIDE": "fork", "NVE_EXIT": "os_exit", "NVE_SWITCH": "short"}
VARIANTS: dict[str, dict[str, str]] = {
    "default": {},  # fork, os_exit, short switch
    "beside=thread": {"NVE_BESIDE": "thread"},
    "beside=inline": {"NVE_BESIDE": "inline"},
    "exit=normal": {"NVE_EXIT": "normal"},
    "switch=default": {"NVE_SWITCH": "default"},
    "beside=thread+switch=default": {"NVE_BESIDE": "thread", "NVE_SWITCH": "default"},
}


@dataclass
class Pair:
    cp: Run
    resize: Run
    resize_cpu_s: float  # user + system of the resize and its children (/usr/bin/time): less sensitive to load

    @property
    def ratio(self) -> float:
        return self.resize.wall_s / self.cp.wall_s


@dataclass
class Variant:
    name: str
    env: dict[str, str]
    pairs: list[Pair] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        walls = [p.resize.wall_s for p in self.pairs]
        cps = [p.cp.wall_s for p in self.pairs]
        return {
            "median_s": statistics.median(walls),
            "min_s": min(walls),
            "max_s": max(walls),
            "cp_median_s": statistics.median(cps),
            "cp_min_s": min(cps),
            "cp_max_s": max(cps),
            "median_ratio": statistics.median(p.ratio for p in self.pairs),
            "min_ratio": min(p.ratio for p in self.pairs),
            "max_ratio": max(p.ratio for p in self.pairs),
            "cpu_median_s": statistics.median(p.resize_cpu_s for p in self.pairs),
            "cpu_min_s": min(p.resize_cpu_s for p in self.pairs),
            "cpu_max_s": max(p.resize_cpu_s for p in self.pairs),
            "peak_rss_mb": max(p.resize.maxrss_mb for p in self.pairs),
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, required=True, help="bench.py's --workdir, inputs generated")
    p.add_argument("--layout", choices=["distributed", "single"], default="distributed")
    p.add_argument("--pairs", type=int, default=6, help="cp + resize pairs per variant (default 6)")
    p.add_argument("--only", help=f"comma-separated variant names (default all: {','.join(VARIANTS)})")
    p.add_argument("--json", type=Path, help="write every run here")
    args = p.parse_args(argv)
    workdir = args.workdir.resolve()
    inp = plan_inputs(workdir, "1.3b", True, 1.0)
    src = inp.dist_nemo if args.layout == "distributed" else inp.single_nemo
    out, cp_out, logs = workdir / "ab_out.nemo", workdir / "cp_tmp", workdir / "logs"
    cpu_file = logs / "ab_resize.time"
    resize = ["/usr/bin/time", "-o", str(cpu_file), "-f", "%U %S"]
    resize += [*cli_command(), "--quiet", "resize", str(src), str(out)]
    resize += ["--tokenizer", str(inp.merged_tokenizer), "--init", "fvt"]
    chosen = [n.strip() for n in args.only.split(",")] if args.only else list(VARIANTS)
    if unknown := set(chosen) - set(VARIANTS):
        p.error(f"unknown variants: {', '.join(sorted(unknown))}")
    variants = [Variant(n, {**DEFAULT, **VARIANTS[n]}) for n in chosen]
    compile_library()
    read_through([src, inp.merged_tokenizer])
    started, load_start = time.time(), os.getloadavg()
    for rep in range(args.pairs):
        for i, v in enumerate(variants):
            runs: dict[str, Run] = {}
            for what in ("cp", "resize") if (rep + i) % 2 == 0 else ("resize", "cp"):
                read_through([src, inp.merged_tokenizer])
                settle()
                if what == "cp":
                    runs[what] = run_measured(
                        ["cp", "--reflink=never", str(src), str(cp_out)], logs / "ab_cp.log", timeout=600
                    )
                    remove(cp_out)
                else:
                    env = {**os.environ, **v.env}
                    runs[what] = run_measured(resize, logs / "ab_resize.log", timeout=600, env=env)
                    remove(out)
                if runs[what].returncode:
                    raise SystemExit(f"{what} failed ({v.name}): {(logs / f'ab_{what}.log').read_text()[-1500:]}")
            user, system = map(float, cpu_file.read_text().split()[-2:])
            v.pairs.append(Pair(runs["cp"], runs["resize"], user + system))
            pair = v.pairs[-1]
            print(
                f"[{rep + 1}/{args.pairs}] {v.name}: resize {pair.resize.wall_s:.2f} s, cp {pair.cp.wall_s:.2f} s, "
                f"{pair.ratio:.2f}x, cpu {pair.resize_cpu_s:.2f} s, {pair.resize.maxrss_mb:.0f} MB",
                flush=True,
            )
    print(
        f"\n{args.pairs} pairs per variant, {args.layout} .nemo; "
        f"load average {load_start[0]:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    print(
        "| variant | resize median (min-max) s | cp median (min-max) s | ratio median (min-max) "
        "| resize CPU median (min-max) s | peak RSS MB |"
    )
    print("|---|---|---|---|---|---|")
    for v in variants:
        s = v.summary()
        print(
            f"| {v.name} | {s['median_s']:.2f} ({s['min_s']:.2f}-{s['max_s']:.2f}) "
            f"| {s['cp_median_s']:.2f} ({s['cp_min_s']:.2f}-{s['cp_max_s']:.2f}) "
            f"| {s['median_ratio']:.2f}x ({s['min_ratio']:.2f}-{s['max_ratio']:.2f}) "
            f"| {s['cpu_median_s']:.2f} ({s['cpu_min_s']:.2f}-{s['cpu_max_s']:.2f}) | {s['peak_rss_mb']:.0f} |"
        )
    if args.json:
        result = {
            "layout": args.layout,
            "pairs": args.pairs,
            "loadavg": [load_start, os.getloadavg()],
            "elapsed_s": time.time() - started,
            "variants": [
                {"name": v.name, "env": v.env, "summary": v.summary(), "pairs": [asdict(p) for p in v.pairs]}
                for v in variants
            ],
        }
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
