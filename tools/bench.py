"""Benchmark nemo-vocab-ext's convert, resize and validate on a real-shaped GPT against the I/O floor.

    python tools/bench.py --workdir bench_run --json bench.json
    python tools/bench.py --workdir bench_run --size tiny --repeat 1 --data-gb 0.01 --json smoke.json

Generates the inputs into ``--workdir`` once (``tools/make_checkpoint.py``: the same weights as a
distributed and a single-file .nemo, safetensors, a distributed training-checkpoint folder and a
Lightning file; a 50257-token tokenizer and a merged one with 7000 more; a Megatron .bin/.idx of
``--data-gb`` GB; ``tools/make_bench_folders.py``: a Llama-shaped ~1B bf16 Hugging Face folder in
two shards and a Megatron-LM run folder of the GPT's shape, at sizes tiny and 1.3b) and reuses them
on later runs. Then, in one run on those files, each command runs as a subprocess whose wall time
and peak RSS (``os.wait4``: that process and the children it reaped; started from a small launcher,
as a child's peak counts from its parent's memory) are measured, beside its I/O floor
(``cp --reflink=never`` of the bytes it reads), the two interleaved and repeated (median of ``--repeat``),
each started with its inputs just read through so that the page cache is warm for both, and with no
dirty pages left by earlier runs. Baselines: the seed's approach (``tools/seed_resize.py``), NeMo's
own ``restore_from`` + ``save_to``, and the plugin's ``restore_from`` against stock NeMo's on the
same checkpoint (timed inside forked NeMo processes, imports excluded), and transformers'
``from_pretrained`` + ``resize_token_embeddings`` + ``save_pretrained`` on the Hugging Face folder.

Targets, each printed PASS/FAIL: every convert and resize within 1.5x its floor; every CLI
command's peak RSS within 2 x the largest stored tensor (from the files' own metadata) + 512 MiB;
the plugin's restore within 10% of stock; a Megatron-LM run's resize within 0.2x ``cp -r`` of its
iteration folder and writing at most 1.1x the resized tables' bytes (its hard links not counted);
``validate --data`` at 1 GB/s or more (data bytes over the command's wall time). MB means MiB throughout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.path.insert(0, str(TOOLS))

import checkout_root  # noqa: E402, F401 (the harness)
from make_bench_folders import LLAMA_SHAPES  # noqa: E402
from make_checkpoint import (  # noqa: E402
    SIZES,
    ModelShape,
    base_tokenizer_dir,
    largest_stored_tensor_bytes,
    stored_entries,
)

MIB = 1 << 20
RATIO_TARGET = 1.5
RSS_SLACK = 512 * MIB
PLUGIN_OVERHEAD_TARGET = 0.10
MEGATRON_RATIO_TARGET = 0.2  # a run's resize hard-links the unchanged .distcp files
WRITTEN_TARGET = 1.1  # its new bytes over the resized tables' own
VALIDATE_TARGET = 1e9  # bytes/s


# ------------------------------------------------------------------------------------- measuring


@dataclass
class Run:
    wall_s: float
    maxrss_mb: float
    returncode: int


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it may have ended meanwhile
        os.killpg(pid, signal.SIGKILL)


# Linux counts a forked child's peak RSS from the parent's at the fork (ru_maxrss carries the old
# memory's high-water mark across exec), and this process holds a few hundred MB (torch, through
# make_checkpoint). So each command is started by this small launcher, whose own memory is what its
# child starts from; it reports the command's wall time and peak RSS from wait4.
_LAUNCHER = """
import os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{time.perf_counter() - start} {usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}")
"""


def run_measured(argv: Sequence[str], log: Path, *, timeout: float, env: dict[str, str] | None = None) -> Run:
    """Run ``argv`` with output to ``log``; wall time, and ``ru_maxrss`` from ``wait4`` on that command."""
    log.parent.mkdir(parents=True, exist_ok=True)
    measured = log.with_suffix(".measured")
    measured.unlink(missing_ok=True)
    with open(log, "wb") as out:
        # Its own session, so that a timeout kills the command's children too.
        launcher = [sys.executable, "-c", _LAUNCHER, str(measured), *argv]
        proc = subprocess.Popen(launcher, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        timer = threading.Timer(timeout, _kill_group, (proc.pid,))
        timer.start()
        try:
            proc.wait()
        finally:
            timer.cancel()
    if not measured.is_file():  # killed by the timeout
        return Run(timeout, 0.0, -signal.SIGKILL)
    wall, maxrss_kb, returncode = measured.read_text().split()
    return Run(float(wall), int(maxrss_kb) / 1024, int(returncode))


def file_paths(paths: Sequence[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        out += sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    return out


def total_bytes(paths: Sequence[Path]) -> int:
    return sum(p.stat().st_size for p in file_paths(paths))


def read_through(paths: Sequence[Path]) -> None:
    """Read every byte once, so that the op and its floor both start with the inputs in the page cache."""
    for p in file_paths(paths):
        with open(p, "rb", buffering=0) as f:
            while f.read(16 * MIB):
                pass


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


# -------------------------------------------------------------------------------------- the inputs


@dataclass
class Inputs:
    size: str
    shape: ModelShape
    tied: bool
    dist_nemo: Path
    single_nemo: Path
    dist_safetensors: Path
    dist_ckpt: Path
    single_ckpt: Path
    base_tokenizer: Path
    merged_tokenizer: Path
    data_prefix: Path
    hf_folder: Path
    megatron_run: Path
    generate_s: dict[str, float] = field(default_factory=dict)

    @property
    def megatron_iteration(self) -> Path:
        return self.megatron_run / "iter_0000001"

    @property
    def data_files(self) -> list[Path]:
        return [Path(f"{self.data_prefix}.bin"), Path(f"{self.data_prefix}.idx")]


def plan_inputs(workdir: Path, size: str, tied: bool, data_gb: float) -> Inputs:
    shape = SIZES[size]
    folder = workdir / f"gpt-{size}-{'tied' if tied else 'untied'}"
    tokenizers = workdir / "tokenizers"
    return Inputs(
        size=size,
        shape=shape,
        tied=tied,
        dist_nemo=folder / "base.dist.nemo",
        single_nemo=folder / "base.single.nemo",
        dist_safetensors=folder / "base.dist.safetensors",
        dist_ckpt=folder / "megatron_gpt--step=0-last",  # NeMo names these folders without a suffix
        single_ckpt=folder / "base.single.ckpt",
        base_tokenizer=base_tokenizer_dir(tokenizers, shape.vocab, 0),
        merged_tokenizer=tokenizers / f"bpe{shape.vocab}_plus{shape.new_tokens}_seed0",
        data_prefix=workdir / "data" / f"vocab{shape.vocab}_{data_gb:g}gb_text_document",
        hf_folder=workdir / f"llama-{size}-hf",
        megatron_run=folder / "megatron_run",
    )


def generate_inputs(inp: Inputs, needed: set[Path], workdir: Path, data_gb: float, *, timeout: float) -> None:
    """Write whichever of ``needed`` is missing (each file takes its name only once complete)."""
    tokenizers = inp.base_tokenizer.parent
    maker = [sys.executable, str(TOOLS / "make_checkpoint.py"), "--size", inp.size]
    maker += ["--tied" if inp.tied else "--untied", "--tokenizer-cache", str(tokenizers)]
    dist, single = [*maker, "--layout", "distributed"], [*maker, "--layout", "single"]
    folders = [sys.executable, str(TOOLS / "make_bench_folders.py"), "--size", inp.size]
    folders += ["--tokenizer", str(inp.base_tokenizer)]
    jobs: list[tuple[str, list[Path], list[str]]] = [
        (
            "tokenizers + distributed .nemo",
            [inp.dist_nemo, inp.merged_tokenizer, inp.base_tokenizer],
            [*dist, "--out", str(inp.dist_nemo), "--merged-tokenizer", str(inp.merged_tokenizer)],
        ),
        ("distributed safetensors", [inp.dist_safetensors], [*dist, "--out", str(inp.dist_safetensors)]),
        ("distributed training checkpoint", [inp.dist_ckpt], [*dist, "--format", "ckpt", "--out", str(inp.dist_ckpt)]),
        ("single-file .nemo", [inp.single_nemo], [*single, "--out", str(inp.single_nemo)]),
        ("Lightning .ckpt file", [inp.single_ckpt], [*single, "--out", str(inp.single_ckpt)]),
        (
            f"{data_gb:g} GB Megatron dataset",
            inp.data_files,
            [sys.executable, str(TOOLS / "make_indexed_data.py"), "--gb", str(data_gb)]
            + ["--vocab", str(inp.shape.vocab), "--out", str(inp.data_prefix)],
        ),
        *(
            (f"{what} folder", [out, *within], [*folders, kind, "--out", str(out)] + (["--tied"] * inp.tied))
            for what, kind, out, within in (
                ("Llama Hugging Face", "hf", inp.hf_folder, []),
                ("Megatron-LM run", "megatron", inp.megatron_run, [inp.megatron_iteration]),
            )
        ),
    ]
    for name, outputs, argv in jobs:
        if not needed & set(outputs) or all(p.exists() for p in outputs):
            continue
        print(f"generating {name} ...", flush=True)
        for p in outputs:
            if p not in (inp.base_tokenizer, inp.merged_tokenizer):
                remove(p)  # e.g. a dataset half written by an interrupted run
        log = workdir / "logs" / f"generate_{outputs[0].name}.log"
        run = run_measured(argv, log, timeout=timeout)
        if run.returncode:
            raise SystemExit(f"generating {name} failed (exit {run.returncode}); see {log}")
        inp.generate_s[f"{name} ({inp.size})"] = run.wall_s


# ---------------------------------------------------------------------------------------- the ops


@dataclass
class Op:
    """A command, what it reads (warmed, and copied by its floor) and what it writes (removed after)."""

    name: str
    argv: list[str]
    inputs: list[Path]
    output: Path
    checkpoints: list[Path]  # whose largest stored tensor sets the memory budget (the output too)
    checked: bool = True  # the ratio target applies (converts and resizes)
    cli: bool = True  # the memory target applies (the project's own commands)
    data: list[Path] = field(default_factory=list)  # validate --data: the dataset scanned
    floor: bool = True
    extra: bool = False  # only with --all
    baseline: str | None = None  # the same command without --data: its time is taken off for the data rate
    ratio_target: float = RATIO_TARGET
    stored_output: Path | None = None  # where the output's tensors are listed, when not at ``output`` itself
    links_from: Path | None = None  # the folder whose files the output hard-links: its new bytes are counted


def cli_command() -> list[str]:
    script = Path(sys.executable).with_name("nemo-vocab-ext")
    return [str(script)] if script.exists() else [sys.executable, "-m", "nemo_vocab_ext.cli"]


def make_ops(inp: Inputs, out: Path) -> list[Op]:
    cli = [*cli_command(), "--quiet"]
    rows = f"{inp.shape.padded_vocab} -> {inp.shape.padded_new_vocab} rows"
    resize = ["--tokenizer", str(inp.merged_tokenizer), "--init", "fvt"]
    data = inp.data_files
    validate_in = [inp.dist_nemo, inp.base_tokenizer]

    def convert(name: str, src: Path, dst: Path, extra: bool = False) -> Op:
        return Op(name, [*cli, "convert", str(src), str(dst)], [src], dst, [src], extra=extra)

    ops = [
        # What every checkpoint command pays before it touches a file (its imports; neither torch nor
        # numpy is among them: a resize imports numpy in the process computing beside the copy): part
        # of each ratio below.
        Op(
            "start-up: the CLI and the checkpoint library imported",
            [sys.executable, "-c", "import nemo_vocab_ext.cli, nemo_vocab_ext.io, nemo_vocab_ext.resize_job"],
            [],
            out / "nothing",
            [],
            checked=False,
            cli=False,
            floor=False,
        ),
        convert("convert .nemo (distributed) -> safetensors", inp.dist_nemo, out / "converted.safetensors"),
        convert("convert safetensors -> .nemo", inp.dist_safetensors, out / "converted.nemo"),
        convert("convert .ckpt (distributed folder) -> .nemo", inp.dist_ckpt, out / "converted.nemo"),
        convert("convert .ckpt (Lightning file) -> .nemo", inp.single_ckpt, out / "converted.nemo", extra=True),
        *(
            Op(
                f"resize .nemo ({layout}) fvt {rows}",
                [*cli, "resize", str(src), str(out / "resized.nemo"), *resize],
                [src, inp.merged_tokenizer],
                out / "resized.nemo",
                [src],
            )
            for layout, src in (("distributed", inp.dist_nemo), ("single file", inp.single_nemo))
        ),
        Op(
            f"seed: tar x, torch.load, torch.cat zeros, torch.save, tar c ({rows})",
            [sys.executable, str(TOOLS / "seed_resize.py"), str(inp.single_nemo), str(out / "seed.nemo")]
            + ["--rows", str(inp.shape.padded_new_vocab)],
            [inp.single_nemo],
            out / "seed.nemo",
            [inp.single_nemo],
            checked=False,
            cli=False,
        ),
        Op(
            "validate --data",
            [
                *cli,
                "validate",
                str(inp.dist_nemo),
                "--tokenizer",
                str(inp.base_tokenizer),
                "--data",
                str(inp.data_prefix),
            ],
            [*validate_in, *data],
            out / "nothing",
            [inp.dist_nemo],
            checked=False,
            data=data,
            baseline="validate (no --data)",
        ),
        Op(
            "validate (no --data)",
            [*cli, "validate", str(inp.dist_nemo), "--tokenizer", str(inp.base_tokenizer)],
            validate_in,
            out / "nothing",
            [inp.dist_nemo],
            checked=False,
            floor=False,
        ),
    ]
    return [*ops, *(folder_ops(inp, out, cli) if inp.size in LLAMA_SHAPES else [])]


def folder_ops(inp: Inputs, out: Path, cli: list[str]) -> list[Op]:
    """The Hugging Face folder's resize (and transformers' own route) and the Megatron-LM run's."""
    hf, run = inp.hf_folder, inp.megatron_run
    iteration = inp.megatron_iteration
    new = inp.shape.vocab + inp.shape.new_tokens
    resize_hf = [*cli, "resize", str(hf), str(out / "hf"), "--tokenizer", str(inp.merged_tokenizer)]
    transformers = (
        "import sys, torch, transformers as t; "
        "m = t.AutoModelForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.bfloat16); "
        "m.resize_token_embeddings(int(sys.argv[3])); m.save_pretrained(sys.argv[2])"
    )
    return [
        Op(f"resize hf folder (Llama, untied) {inp.shape.vocab} -> {new} rows", resize_hf, [hf], out / "hf", [hf]),
        Op(
            "hf transformers: from_pretrained, resize_token_embeddings, save_pretrained",
            [sys.executable, "-c", transformers, str(hf), str(out / "hf_transformers"), str(new)],
            [hf],
            out / "hf_transformers",
            [],  # no memory budget: not the project's command
            checked=False,
            cli=False,
        ),
        Op(
            f"resize megatron run {inp.shape.padded_vocab} -> {inp.shape.padded_new_vocab} rows",
            [*cli, "resize", str(run), str(out / "run"), "--tokenizer", str(inp.merged_tokenizer)],
            [iteration],
            out / "run",
            [iteration],
            ratio_target=MEGATRON_RATIO_TARGET,
            stored_output=out / "run" / iteration.name,
            links_from=iteration,
        ),
    ]


def new_bytes(folder: Path, source: Path) -> tuple[int, int]:
    """Bytes of ``folder``'s files that are no hard link of ``source``'s, and of its tensors whose size changed."""
    linked = {(st.st_dev, st.st_ino) for st in (p.stat() for p in file_paths([source]))}
    written = sum(st.st_size for st in (p.stat() for p in file_paths([folder])) if (st.st_dev, st.st_ino) not in linked)
    before = stored_entries(source)
    tables = sum(e.nbytes for k, e in stored_entries(folder).items() if k not in before or before[k] != e)
    return written, tables


@dataclass
class Row:
    name: str
    runs: list[Run] = field(default_factory=list)
    floors: list[Run] = field(default_factory=list)
    budget_mb: float | None = None
    largest_tensor_mb: float | None = None
    checked: bool = False
    cli: bool = False
    data_bytes: int = 0
    baseline: str | None = None
    reported_rates: list[float] = field(default_factory=list)
    input_bytes: int = 0
    note: str = ""
    errors: list[str] = field(default_factory=list)
    ratio_target: float = RATIO_TARGET
    written_bytes: int | None = None  # new blocks (hard links of the source not counted)
    table_bytes: int | None = None  # the resized tables' own bytes

    @property
    def wall_s(self) -> float | None:
        ok = [r.wall_s for r in self.runs if r.returncode == 0]
        return statistics.median(ok) if ok else None

    @property
    def floor_s(self) -> float | None:
        return statistics.median([r.wall_s for r in self.floors]) if self.floors else None

    @property
    def ratio(self) -> float | None:
        """Median of each run over the floor run beside it: load that comes and goes hits both of a pair."""
        if not self.floors:
            return None
        runs = zip(self.runs, self.floors, strict=True)
        pairs = [r.wall_s / f.wall_s for r, f in runs if r.returncode == 0 and f.wall_s > 0]
        return statistics.median(pairs) if pairs else None

    @property
    def maxrss_mb(self) -> float | None:
        return max((r.maxrss_mb for r in self.runs), default=None)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "wall_s": self.wall_s,
            "floor_s": self.floor_s,
            "ratio_to_floor": self.ratio,
            "peak_rss_mb": self.maxrss_mb,
            "rss_budget_mb": self.budget_mb,
            "largest_stored_tensor_mb": self.largest_tensor_mb,
            "input_bytes": self.input_bytes,
            "data_bytes": self.data_bytes or None,
            "note": self.note,
            "runs": [asdict(r) for r in self.runs],
            "floor_runs": [asdict(r) for r in self.floors],
            "errors": self.errors,
            "ratio_target": self.ratio_target,
            "written_bytes": self.written_bytes,
            "table_bytes": self.table_bytes,
        }


def rss_budget_mb(largest: int) -> float:
    return (2 * largest + RSS_SLACK) / MIB


def settle() -> None:
    """Write back what earlier runs left dirty, so that no run is throttled by another's writes: a
    command or ``cp`` that starts with gigabytes of dirty pages waits on their write-back."""
    os.sync()


def _measure_floor(op: Op, row: Row, floor_dir: Path, log: Path, timeout: float) -> None:
    floor_dir.mkdir(parents=True, exist_ok=True)
    read_through(op.inputs)
    argv = ["cp", "-r", "--reflink=never", *map(str, op.inputs), str(floor_dir)]
    settle()
    row.floors.append(run_measured(argv, log, timeout=timeout))
    remove(floor_dir)


_SCAN_RATE = re.compile(r"scanned at ([0-9.]+) GB/s")


def _measure_op(op: Op, row: Row, log: Path, timeout: float) -> None:
    read_through(op.inputs)
    settle()
    run = run_measured(op.argv, log, timeout=timeout)
    row.runs.append(run)
    if run.returncode:
        row.errors.append(f"exit {run.returncode}: {log.read_text(errors='replace')[-1500:]}")
    else:
        if op.data:  # validate prints its own scan rate: kept as a cross-check of the measured one
            row.reported_rates += [float(m) * 1e9 for m in _SCAN_RATE.findall(log.read_text(errors="replace"))]
    if (
        run.returncode == 0 and row.budget_mb is None and op.checkpoints
    ):  # from the inputs' and the output's own metadata
        written = op.stored_output or op.output
        largest = max(largest_stored_tensor_bytes(p) for p in [*op.checkpoints, written] if p.exists())
        row.largest_tensor_mb = largest / MIB
        row.budget_mb = rss_budget_mb(largest)
    if run.returncode == 0 and op.links_from is not None and op.stored_output is not None:
        row.written_bytes, row.table_bytes = new_bytes(op.stored_output, op.links_from)
    remove(op.output)


def bench_ops(ops: list[Op], repeat: int, workdir: Path, *, timeout: float) -> list[Row]:
    """Each op and its floor, alternating which goes first, ``repeat`` rounds over all ops."""
    rows = [
        Row(
            op.name,
            checked=op.checked,
            cli=op.cli,
            data_bytes=total_bytes(op.data),
            baseline=op.baseline,
            input_bytes=total_bytes(op.inputs),
            ratio_target=op.ratio_target,
        )
        for op in ops
    ]
    logs = workdir / "logs"
    for rep in range(repeat):
        for i, (op, row) in enumerate(zip(ops, rows, strict=True)):
            floor_first = rep % 2 == 0
            if op.floor and floor_first:
                _measure_floor(op, row, workdir / "out" / "floor", logs / f"floor_{i}_{rep}.log", timeout)
            _measure_op(op, row, logs / f"op_{i}_{rep}.log", timeout)
            if op.floor and not floor_first:
                _measure_floor(op, row, workdir / "out" / "floor", logs / f"floor_{i}_{rep}.log", timeout)
            print(f"  [{rep + 1}/{repeat}] {op.name}: {row.runs[-1].wall_s:.1f} s", flush=True)
    return rows


# ------------------------------------------------------------------------------------ NeMo itself


def nemo_env(workdir: Path) -> dict[str, str]:
    from harness.tiny import cpu_env, offline_hf_home

    return cpu_env(offline_hf_home(workdir / "hf_home"))


def bench_nemo_resave(inp: Inputs, workdir: Path, repeat: int, *, timeout: float) -> Row:
    """NeMo's restore_from + save_to as one process (imports included), beside cp of the same .nemo."""
    row = Row(f"NeMo restore_from + save_to ({inp.size}, whole process)", input_bytes=total_bytes([inp.dist_nemo]))
    out = workdir / "out" / "nemo_resave"
    inner: list[dict[str, float]] = []
    for rep in range(repeat):
        remove(out)
        result = out / "result.json"
        argv = [sys.executable, "-m", "harness.bench_nemo", "--mode", "resave"]
        argv += ["--nemo", str(inp.dist_nemo), "--out", str(out / "resaved.nemo"), "--result", str(result)]
        read_through([inp.dist_nemo])
        log = workdir / "logs" / f"nemo_resave_{rep}.log"
        out.mkdir(parents=True)
        run = run_measured(argv, log, timeout=timeout, env=nemo_env(workdir))
        row.runs.append(run)
        if run.returncode:
            row.errors.append(f"exit {run.returncode}: {log.read_text(errors='replace')[-1500:]}")
        else:
            inner.append(json.loads(result.read_text()))
        remove(out)
        out.mkdir(parents=True)
        read_through([inp.dist_nemo])
        row.floors.append(
            run_measured(
                ["cp", "--reflink=never", str(inp.dist_nemo), str(out)], log.with_suffix(".cp.log"), timeout=timeout
            )
        )
        remove(out)
        print(f"  [{rep + 1}/{repeat}] NeMo restore_from + save_to: {run.wall_s:.1f} s", flush=True)
    if inner:
        restore = statistics.median(r["restore_s"] for r in inner)
        save = statistics.median(r["save_s"] for r in inner)
        row.note = f"restore_from {restore:.1f} s + save_to {save:.1f} s in process"
    return row


@dataclass
class RestoreComparison:
    size: str
    stock: list[dict[str, float]] = field(default_factory=list)
    plugin: list[dict[str, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def median(self, mode: str) -> float | None:
        runs = getattr(self, mode)
        return statistics.median(r["restore_s"] for r in runs) if runs else None

    @property
    def overhead(self) -> float | None:
        """Median over repetitions of plugin / stock - 1 (the two run back to back in each)."""
        stock = {r["rep"]: r["restore_s"] for r in self.stock}
        pairs = [r["restore_s"] / stock[r["rep"]] - 1 for r in self.plugin if r["rep"] in stock]
        return statistics.median(pairs) if pairs else None


def bench_restore(inp: Inputs, workdir: Path, repeat: int, *, timeout: float) -> RestoreComparison:
    """Stock ``restore_from`` vs the plugin's, both with the merged tokenizer, alternating, in forked NeMo jobs."""
    from harness.tiny import ForkServer

    comparison = RestoreComparison(inp.size)
    root = workdir / "out" / "restore"
    remove(root)
    server = ForkServer.for_module("harness.bench_nemo", nemo_env(workdir), root)
    try:
        for rep in range(repeat):
            for mode in ("stock", "plugin") if rep % 2 == 0 else ("plugin", "stock"):
                folder = root / f"{mode}_{rep}"
                args = ["--mode", mode, "--nemo", str(inp.dist_nemo), "--vocab-dir", str(inp.merged_tokenizer)]
                args += ["--init", "fvt", "--work-dir", str(folder / "work"), "--result", str(folder / "result.json")]
                read_through([inp.dist_nemo])
                (error,) = server.run([(args, folder)], timeout=timeout)
                if error is not None:
                    comparison.errors.append(f"{mode}: {error}")
                else:
                    result = {**json.loads((folder / "result.json").read_text()), "rep": rep}
                    getattr(comparison, mode).append(result)
                    print(f"  [{rep + 1}/{repeat}] restore_from, {mode}: {result['restore_s']:.1f} s", flush=True)
                remove(folder / "work")  # the plugin's resized copy (a forked job skips atexit clean-ups)
                shutil.copy(folder / "bench_nemo.log", workdir / "logs" / f"restore_{mode}_{rep}.log")
    finally:
        server.close()
    return comparison


# ------------------------------------------------------------------------------------------ report


def _asdict_or_none(rate: DataRate | None) -> dict[str, Any] | None:
    return None if rate is None else {**asdict(rate), "judged": rate.judged[0], "judged_as": rate.judged[1]}


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


@dataclass
class DataRate:
    """validate --data's throughput three ways, in bytes/s."""

    whole: float  # data bytes over the whole command's time (start-up and checkpoint checks included)
    net: float | None  # over what --data adds: median of (with - without) over adjacent pairs of runs
    reported: float | None  # the rate the command prints for its own scan

    @property
    def judged(self) -> tuple[float, str]:
        """The rate the target is judged on: the scan's own, as validate times and reports it.

        The net rate is a cross-check only: it is the difference of two ~10 s commands (most of it
        the finite check of every weight), which swings by seconds on a shared machine while the
        scan of 1 GB takes a fraction of one.
        """
        if self.reported is not None:
            return self.reported, "scan, as validate times and reports it"
        if self.net is not None:
            return self.net, "net of validate without --data"
        return self.whole, "whole command"

    def text(self) -> str:
        rate, how = self.judged
        parts = [f"{rate / 1e9:.2f} GB/s {how}", f"whole command {self.whole / 1e9:.2f} GB/s"]
        if self.net is not None and not how.startswith("net"):
            parts.append(f"net of validate without --data {self.net / 1e9:.2f} GB/s")
        return parts[0] + " (" + "; ".join(parts[1:]) + ")"


def data_rate(row: Row, rows: list[Row]) -> DataRate | None:
    if not row.data_bytes or not row.wall_s:
        return None
    base = next((r for r in rows if r.name == row.baseline), None)
    extra = (
        []
        if base is None
        else [
            a.wall_s - b.wall_s
            for a, b in zip(row.runs, base.runs, strict=True)
            if a.returncode == 0 and b.returncode == 0
        ]
    )
    net_s = statistics.median(extra) if extra else None
    reported = statistics.median(row.reported_rates) if row.reported_rates else None
    return DataRate(row.data_bytes / row.wall_s, row.data_bytes / net_s if net_s and net_s > 0 else None, reported)


def evaluate(rows: list[Row], comparison: RestoreComparison | None) -> list[dict[str, Any]]:
    """Every target with its measured value and PASS/FAIL."""
    targets: list[dict[str, Any]] = []

    def add(name: str, value: str, limit: str, ok: bool | None) -> None:
        targets.append({"target": name, "value": value, "limit": limit, "pass": ok})

    for row in rows:
        if row.errors and row.wall_s is None:
            add(f"{row.name}: runs", f"failed ({len(row.errors)} errors)", "exit 0", False)
            continue
        if row.checked:
            ok = row.ratio is not None and row.ratio <= row.ratio_target
            add(f"{row.name}: time", f"{fmt(row.ratio, '.2f')}x cp", f"<= {row.ratio_target}x", ok)
        if row.written_bytes is not None and row.table_bytes is not None:
            limit = WRITTEN_TARGET * row.table_bytes
            add(
                f"{row.name}: bytes written",
                f"{row.written_bytes / MIB:.0f} MB (new tables {row.table_bytes / MIB:.0f} MB)",
                f"<= {WRITTEN_TARGET}x the new tables",
                row.written_bytes <= limit,
            )
        if row.cli and row.budget_mb is not None and row.maxrss_mb is not None:
            add(
                f"{row.name}: peak RSS",
                f"{row.maxrss_mb:.0f} MB",
                f"<= {row.budget_mb:.0f} MB",
                row.maxrss_mb <= row.budget_mb,
            )
        rate = data_rate(row, rows)
        if rate is not None:
            add(f"{row.name}: data rate", rate.text(), ">= 1 GB/s", rate.judged[0] >= VALIDATE_TARGET)
    if comparison is not None:
        over = comparison.overhead
        add(
            f"plugin restore_from vs stock ({comparison.size}, fvt, merged tokenizer)",
            "failed" if over is None else f"{over * 100:+.1f}%",
            f"<= +{PLUGIN_OVERHEAD_TARGET * 100:.0f}%",
            over is not None and over <= PLUGIN_OVERHEAD_TARGET,
        )
    return targets


def table(rows: list[Row], comparison: RestoreComparison | None) -> str:
    head = ("command", "wall s", "floor s", "ratio", "peak RSS MB", "budget MB", "result")
    lines: list[tuple[str, ...]] = []
    for row in rows:
        verdicts = []
        if row.wall_s is None:
            verdicts.append("ERROR")
        if row.checked and row.ratio is not None:
            verdicts.append("time ok" if row.ratio <= row.ratio_target else "TIME FAIL")
        if row.written_bytes is not None and row.table_bytes is not None:
            ok = row.written_bytes <= WRITTEN_TARGET * row.table_bytes
            verdicts.append(f"wrote {row.written_bytes / MIB:.0f} MB " + ("ok" if ok else "FAIL"))
        if row.cli and row.budget_mb is not None and row.maxrss_mb is not None:
            verdicts.append("mem ok" if row.maxrss_mb <= row.budget_mb else "MEM FAIL")
        rate = data_rate(row, rows)
        if rate is not None:
            judged = rate.judged[0]
            verdicts.append(f"data {judged / 1e9:.2f} GB/s " + ("ok" if judged >= VALIDATE_TARGET else "FAIL"))
        if not (row.checked or row.cli):
            verdicts.append("reference")
        lines.append(
            (
                row.name,
                fmt(row.wall_s, ".1f"),
                fmt(row.floor_s, ".1f"),
                fmt(row.ratio, ".2f"),
                fmt(row.maxrss_mb, ".0f"),
                fmt(row.budget_mb, ".0f"),
                ", ".join(verdicts) + (f" ({row.note})" if row.note else ""),
            )
        )
    if comparison is not None:
        for mode in ("stock", "plugin"):
            runs = getattr(comparison, mode)
            rss = max((r["maxrss_mb"] for r in runs), default=None)
            label = "stock MegatronGPTModel" if mode == "stock" else "plugin (vocab_extension.init=fvt)"
            verdict = "reference"
            if mode == "plugin" and comparison.overhead is not None:
                ok = comparison.overhead <= PLUGIN_OVERHEAD_TARGET
                verdict = f"{comparison.overhead * 100:+.1f}% vs stock " + ("ok" if ok else "FAIL")
            lines.append(
                (
                    f"restore_from, {label} ({comparison.size}, in process)",
                    fmt(comparison.median(mode), ".1f"),
                    "-",
                    "-",
                    fmt(rss, ".0f"),
                    "-",
                    verdict,
                )
            )
    widths = [max(len(r[c]) for r in [head, *lines]) for c in range(len(head) - 1)]
    out = []
    for r in [head, *lines]:
        cells = [r[0].ljust(widths[0]), *(r[c].rjust(widths[c]) for c in range(1, len(widths))), r[-1]]
        out.append("  ".join(cells))
    out.insert(1, "-" * len(out[0]))
    return "\n".join(out)


def library_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "nemo_vocab_ext")
    return {"commit": git("log", "-1", "--oneline"), "library_uncommitted_changes": bool(dirty)}


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--workdir", type=Path, default=REPO / "bench_run", help="inputs and scratch (default bench_run)")
    p.add_argument("--json", type=Path, help="write the results here (default WORKDIR/bench.json)")
    p.add_argument("--size", choices=sorted(SIZES), default="1.3b", help="the checkpoint benchmarked (default 1.3b)")
    p.add_argument("--untied", action="store_true", help="benchmark an untied model (default tied)")
    p.add_argument("--repeat", type=int, default=3, help="runs per command and floor (median; default 3)")
    p.add_argument("--data-gb", type=float, default=1.0, help="size of the validate --data dataset (default 1)")
    p.add_argument(
        "--nemo-size", choices=sorted(SIZES), help="size for NeMo's restore_from runs (default: --size, at most 350m)"
    )
    p.add_argument("--nemo-repeat", type=int, default=1, help="runs of NeMo's restore_from + save_to (default 1)")
    p.add_argument("--restore-repeat", type=int, default=3, help="runs of each restore_from mode (default 3)")
    p.add_argument("--skip-nemo", action="store_true", help="no NeMo baselines (no NeMo needed)")
    p.add_argument("--only", help="comma-separated words; run only the commands whose name contains one")
    p.add_argument("--all", action="store_true", help="also convert the Lightning .ckpt file")
    p.add_argument("--generate-only", action="store_true", help="write the inputs into --workdir and stop")
    p.add_argument("--timeout", type=float, default=1800, help="seconds before a command is killed")
    return p.parse_args(argv)


def compile_library() -> None:
    """Byte-compile the library, as pip does when it installs a package: an editable install under
    PYTHONDONTWRITEBYTECODE would compile its modules again in every measured run (about 0.07 s)."""
    import compileall

    import nemo_vocab_ext

    compileall.compile_dir(Path(nemo_vocab_ext.__file__).parent, quiet=1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    remove(workdir / "out")
    load_before = os.getloadavg()
    lib_before = library_commit()
    inp = plan_inputs(workdir, args.size, not args.untied, args.data_gb)
    ops = [op for op in make_ops(inp, workdir / "out") if args.all or not op.extra]
    if args.only:
        words = [w.strip() for w in args.only.split(",")]
        ops = [op for op in ops if any(w in op.name for w in words)]
    # NeMo builds a float32 model on the CPU: above ~400M parameters, six restores take too long.
    nemo_size = args.nemo_size or (args.size if inp.shape.num_parameters(True) < 4e8 else "350m")
    nemo_inp = inp if nemo_size == args.size else plan_inputs(workdir, nemo_size, not args.untied, args.data_gb)
    needed = {p for op in ops for p in [*op.inputs, *op.checkpoints]}
    if not args.skip_nemo:
        needed |= {nemo_inp.dist_nemo, nemo_inp.merged_tokenizer}
    for i in [inp] if nemo_inp is inp else [inp, nemo_inp]:
        generate_inputs(i, needed, workdir, args.data_gb, timeout=args.timeout)
    if args.generate_only:
        return 0
    (workdir / "out").mkdir(parents=True, exist_ok=True)
    print(f"benchmarking {len(ops)} commands x {args.repeat} on GPT-{args.size} ...", flush=True)
    compile_library()
    rows = bench_ops(ops, args.repeat, workdir, timeout=args.timeout)
    comparison = None
    if not args.skip_nemo:
        print(f"NeMo baselines on GPT-{nemo_inp.size} ...", flush=True)
        if args.nemo_repeat > 0:
            rows.append(bench_nemo_resave(nemo_inp, workdir, args.nemo_repeat, timeout=args.timeout))
        if args.restore_repeat > 0:
            comparison = bench_restore(nemo_inp, workdir, args.restore_repeat, timeout=args.timeout)
    targets = evaluate(rows, comparison)
    report = table(rows, comparison)
    lib = library_commit()
    lib["commit_at_start"] = lib_before["commit"]
    lib["library_uncommitted_changes"] |= lib_before["library_uncommitted_changes"]
    print()
    print(
        f"GPT-{args.size} ({'untied' if args.untied else 'tied'}, bf16, "
        f"{inp.shape.num_parameters(inp.tied) / 1e9:.2f}B parameters), median of {args.repeat}; "
        f"library at {lib['commit']}"
        + ("" if lib["commit"] == lib_before["commit"] else f" (at the start: {lib_before['commit']})")
        + (" + uncommitted changes" if lib["library_uncommitted_changes"] else "")
    )
    print(report)
    print(
        "wall and floor: medians; ratio: median over repetitions of the command's time over the cp run beside it; "
        "peak RSS: the largest of the runs; budget: 2 x largest stored tensor + 512 MB (MB = MiB)"
    )
    print("\ntargets:")
    for t in targets:
        print(f"  [{'PASS' if t['pass'] else 'FAIL'}] {t['target']}: {t['value']} ({t['limit']})")
    for row in rows:
        for error in row.errors[:1]:
            print(f"\n{row.name} failed: {error}")
    if comparison is not None:
        for error in comparison.errors[:2]:
            print(f"\nrestore failed: {error[-1500:]}")
    elapsed = time.time() - started
    generate_s = inp.generate_s if nemo_inp is inp else {**inp.generate_s, **nemo_inp.generate_s}
    generated = sum(generate_s.values())
    print(
        f"\ntook {elapsed / 60:.1f} min (generating inputs {generated / 60:.1f} min); "
        f"load average {load_before[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end"
    )
    json_path = args.json or workdir / "bench.json"
    result = {
        "size": args.size,
        "tied": not args.untied,
        "parameters": inp.shape.num_parameters(inp.tied),
        "repeat": args.repeat,
        "library": lib,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_start": load_before,
            "loadavg_end": os.getloadavg(),
        },
        "inputs": {
            name: {
                "path": str(p),
                "bytes": total_bytes([p]),
                "largest_stored_tensor_bytes": largest_stored_tensor_bytes(p) if name != "data" else None,
            }
            for name, p in [
                ("dist_nemo", inp.dist_nemo),
                ("single_nemo", inp.single_nemo),
                ("dist_safetensors", inp.dist_safetensors),
                ("dist_ckpt", inp.dist_ckpt),
                ("single_ckpt", inp.single_ckpt),
                ("data", inp.data_files[0]),
                ("hf_folder", inp.hf_folder),
                ("megatron_run", inp.megatron_iteration),
            ]
            if p.exists()
        },
        "generate_s": generate_s,
        "rows": [{**r.to_json(), "data_rate": _asdict_or_none(data_rate(r, rows))} for r in rows],
        "restore_comparison": None
        if comparison is None
        else {
            "size": comparison.size,
            "stock": comparison.stock,
            "plugin": comparison.plugin,
            "overhead": comparison.overhead,
            "errors": comparison.errors,
        },
        "targets": targets,
        "table": report,
        "elapsed_s": elapsed,
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2))
    print(f"wrote {json_path}")
    return 0 if all(t["pass"] for t in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
