"""The whole localization workflow on an embedded default: English base GPT -> Thai vocabulary extension.

    python tools/demo.py [--workdir demo_run] [--steps 250] [--continual-steps 125] [--seed 1234]

1. train a ~2000-token English GPT-2 BPE on Python's own docs (``pydoc_data``), some held out;
2. tokenize English into a Megatron indexed dataset and pretrain a tiny GPT from scratch with the
   stock ``megatron_gpt_pretraining.py`` call sequence, saving ``base.nemo``;
3. train a Thai BPE on pythainlp's Wikipedia titles, merge it into the base tokenizer, check it;
4. tokenize English+Thai with the merged tokenizer; ``validate`` the base model against it (fails:
   the embedding has too few rows) and show the ``resize`` plan;
5. continue pretraining through the stock restore path with ``+model.vocab_extension`` (the plugin);
6. restore the result with the merged tokenizer and no plugin, and ``validate`` it.

Every NeMo process's full log lands in the workdir; stdout gets short, step-numbered lines. Any
step that misbehaves stops the demo with its log tail and a non-zero exit.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import checkout_root  # noqa: F401 (the harness)
import numpy as np
import torch
from omegaconf import OmegaConf

from harness.runs import PROBE_ENV, stock_job, write_pretraining_config
from harness.tiny import NemoJob, NemoRunError, cpu_env, offline_hf_home, run_concurrently
from nemo_vocab_ext.tokenization.load import EOS_TOKEN, TokenizerInfo, load_tokenizer

MARKER = ".nemo_vocab_ext_demo"  # only a folder holding this file is ever wiped by a rerun
EMBEDDING = "model.embedding.word_embeddings.weight"
BASE_VOCAB = 2000
THAI_VOCAB = 2000
THAI_TITLES = 60_000  # of ~470k: plenty for a 2000-token BPE
THAI_DATA_TITLES = 12_000  # about as many tokens (merged tokenizer) as the English training text
TITLES_PER_DOC = 40
DIVISIBLE_BY = 128
# Small enough for a few hundred steps in a few minutes on 2 CPU cores, big enough to learn something.
MODEL: dict[str, Any] = {
    "num_layers": 4,
    "hidden_size": 128,
    "ffn_hidden_size": 512,
    "num_attention_heads": 4,
    "encoder_seq_length": 128,
    "max_position_embeddings": 128,
    "micro_batch_size": 16,
    "global_batch_size": 16,
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
}
BASE_LR = 2e-3  # from scratch, a tiny model takes a high rate
CONTINUAL_LR = 1e-3  # lower: the English rows are already trained


class DemoError(RuntimeError):
    """A step misbehaved; ``log`` is the file that shows why."""

    def __init__(self, message: str, log: Path | None = None):
        super().__init__(message)
        self.log = log


class Paths:
    """Where each artifact of the demo lives inside the workdir."""

    def __init__(self, root: Path):
        self.root = root
        self.en_train = root / "text" / "en_train.txt"
        self.en_heldout = root / "text" / "en_heldout.txt"
        self.th_train = root / "text" / "th_train.txt"
        self.th_heldout = root / "text" / "th_heldout.txt"
        self.base_tok = root / "tok_base"  # vocab.json + merges.txt
        self.th_tok = root / "tok_th"
        self.merged_tok = root / "tok_merged"
        self.en_data = root / "data" / "en_text_document"  # Megatron prefixes: .bin + .idx
        self.mixed_data = root / "data" / "mixed_text_document"
        self.index_cache = root / "data" / "index_cache"  # megatron's sample index files
        self.base_nemo = root / "base.nemo"
        self.final_nemo = root / "final.nemo"
        self.cli_log = root / "cli.log"

    def rel(self, path: Path) -> str:
        """Paths as printed and as given to the CLI, which runs in the workdir."""
        return os.path.relpath(path, self.root)


def say(step: int | str, message: str) -> None:
    print(f"[{step}] {message}", flush=True)


def indent(text: str) -> None:
    for line in text.rstrip("\n").splitlines():
        print(f"      {line}", flush=True)


# ---------------------------------------------------------------------------------------------- text


def english_topics() -> list[list[str]]:
    """Python's documentation topics (shipped with CPython), each as its non-empty paragraphs, one line each."""
    from pydoc_data.topics import topics

    docs = []
    for key in sorted(topics):  # sorted: dict order is not part of the data's contract
        paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", topics[key])]
        docs.append([p for p in paragraphs if p])
    return docs


def thai_titles(limit: int) -> list[str]:
    """The first ``limit`` Thai Wikipedia titles of pythainlp's corpus (a file inside the installed package)."""
    import pythainlp.corpus

    path = Path(pythainlp.corpus.__file__).with_name("wikipedia_titles_th.txt")
    if not path.is_file():
        raise DemoError(f"{path} not found: install pythainlp (tools/setup_env.sh does)")
    titles = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                titles.append(line)
                if len(titles) == limit:
                    break
    return titles


def write_lines(path: Path, lines: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def build_dataset(prefix: Path, docs: Sequence[str], tok: TokenizerInfo) -> int:
    """A real Megatron indexed dataset (what ``preprocess_data_for_megatron.py --append-eod`` writes).

    Returns the token count.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    eod = tok.token_to_id(EOS_TOKEN)
    if eod is None:
        raise DemoError(f"{tok.path}: no {EOS_TOKEN} token")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)  # megatron's choice below 65500 ids
    total = 0
    for ids in tok.encode_batch(list(docs)):
        if ids and max(ids) >= tok.vocab_size:
            raise DemoError(f"{tok.path} produced id {max(ids)} >= its size {tok.vocab_size}")
        builder.add_item(torch.tensor([*ids, eod], dtype=torch.int64))
        builder.end_document()
        total += len(ids) + 1
    builder.finalize(f"{prefix}.idx")
    return total


# ------------------------------------------------------------------------------------------ commands


def run_cli(step: int, args: list[str], root: Path, log: Path, *, expect: int = 0) -> str:
    """``nemo-vocab-ext ARGS`` in ``root``; its stdout is printed indented, its whole output goes to ``log``."""
    say(step, "$ nemo-vocab-ext " + shlex.join(args))
    proc = subprocess.run(
        [sys.executable, "-m", "nemo_vocab_ext.cli", *args], cwd=root, capture_output=True, text=True, timeout=600
    )
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"$ nemo-vocab-ext {shlex.join(args)}\n{proc.stdout}{proc.stderr}(exit {proc.returncode})\n\n")
    indent(proc.stdout)
    if proc.returncode != expect:
        raise DemoError(f"nemo-vocab-ext {args[0]} exited {proc.returncode}, expected {expect}:\n{proc.stderr}", log)
    return proc.stdout


def run_nemo(job: NemoJob, env: dict[str, str], steps: int = 0) -> float:
    """One NeMo subprocess (its log in ``job.log``); returns its wall time."""
    start = time.monotonic()
    # Generous: a hung run is killed, never a slow one (about 1 s a step on a busy 2-core machine).
    (error,) = run_concurrently([job], env, timeout=600 + 10 * steps)
    if error is not None:
        raise DemoError(f"NeMo run failed (exit {error.returncode})", job.log)
    return time.monotonic() - start


def pretraining_config(
    path: Path, vocab_dir: Path, exp_dir: Path, *, steps: int, lr: float, seed: int, gpu: bool, cache: Path
) -> Path:
    """The tests' tiny CPU config (stock keys, stock exp_manager saving a .nemo at train end), grown for the demo."""
    write_pretraining_config(path, vocab_dir, exp_dir=exp_dir, max_steps=steps)
    cfg = OmegaConf.load(path)
    cfg.model.merge_with(MODEL)
    cfg.model.seed = seed
    cfg.model.optim = {
        "name": "adamw",
        "lr": lr,
        "weight_decay": 0.01,
        "betas": [0.9, 0.98],
        "sched": {
            "name": "CosineAnnealing",
            "warmup_steps": max(1, steps // 10),
            "constant_steps": 0,
            "min_lr": lr / 10,
        },
    }
    # Real data. NeMo needs a non-empty validation split: one batch of it runs at the end (and as sanity check).
    cfg.model.data.merge_with({"data_impl": "mmap", "splits_string": "95,5,0", "index_mapping_dir": str(cache)})
    cfg.trainer.limit_val_batches = 1
    cfg.trainer.log_every_n_steps = max(1, steps // 20)
    if gpu:  # the stock default; fp32 and no clipping (NeMo clips with apex on a GPU) keep runs comparable
        cfg.trainer.accelerator = "gpu"
    OmegaConf.save(cfg, path)
    return path


def read_probe(folder: Path, log: Path, steps: int) -> list[float]:
    """The training losses the Probe recorded: one finite loss per step, or the run misbehaved."""
    path = folder / "probe.pt.rank0"
    if not path.is_file():
        raise DemoError(f"{path}: the run left no probe record", log)
    losses: list[float] = torch.load(path, map_location="cpu")["losses"]
    if len(losses) != steps:  # e.g. a run stopped early by a signal exits 0
        raise DemoError(f"{len(losses)} training steps recorded, expected {steps}", log)
    if not all(math.isfinite(x) for x in losses):
        raise DemoError(f"losses not finite: {losses[:5]} ... {losses[-5:]}", log)
    return losses


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def loss_line(losses: Sequence[float]) -> str:
    return (
        f"loss at step 1: {losses[0]:.3f}, at step {len(losses)}: {losses[-1]:.3f} "
        f"(mean of the first/last 10 steps: {mean(losses[:10]):.3f} -> {mean(losses[-10:]):.3f})"
    )


def saved_nemo(folder: Path, log: Path, dest: Path) -> None:
    """Copy the .nemo that exp_manager saved at train end to ``dest``."""
    src = folder / "exp" / "checkpoints" / "megatron_gpt.nemo"
    if not src.is_file():
        raise DemoError(f"{src}: no .nemo saved at train end", log)
    shutil.copyfile(src, dest)


def padded(vocab: int, divisible_by: int = DIVISIBLE_BY) -> int:
    return -(-vocab // divisible_by) * divisible_by


# ------------------------------------------------------------------------------------------------ steps


@dataclass(frozen=True)
class Demo:
    p: Paths
    steps: int
    continual_steps: int
    seed: int
    gpu: bool
    env: dict[str, str]  # for the training runs: the GPU visible when there is one
    cpu_env: dict[str, str]  # for the restore check: CPU only, exactly as the tests restore

    def cli(self, step: int, *args: str | Path, expect: int = 0) -> str:
        """``nemo-vocab-ext ARGS`` in the workdir (paths shown relative to it)."""
        words = [self.p.rel(a) if isinstance(a, Path) else a for a in args]
        return run_cli(step, words, self.p.root, self.p.cli_log, expect=expect)

    def config(self, name: str, steps: int, lr: float) -> tuple[Path, Path]:
        """A run folder and its YAML; the base tokenizer in it is overridden on the command line when needed."""
        folder = self.p.root / name
        config = pretraining_config(
            folder / "conf" / "gpt.yaml",
            self.p.base_tok,
            folder / "exp",
            steps=steps,
            lr=lr,
            seed=self.seed,
            gpu=self.gpu,
            cache=self.p.index_cache,
        )
        return folder, config

    def step1_base_tokenizer(self) -> list[str]:
        topics = english_topics()
        # Every 10th topic is held out whole: text that neither the tokenizer nor the model has seen.
        train = [t for i, t in enumerate(topics) if i % 10]
        heldout = [t for i, t in enumerate(topics) if not i % 10]
        write_lines(self.p.en_train, [line for t in train for line in t])
        write_lines(self.p.en_heldout, [line for t in heldout for line in t])
        size = self.p.en_train.stat().st_size
        say(1, f"English: {len(train)} pydoc topics for training ({size:,} bytes), {len(heldout)} held out")
        self.cli(1, "tokenizer", "train", self.p.en_train, self.p.base_tok, "--vocab-size", str(BASE_VOCAB))
        return ["\n".join(t) for t in train]

    def step2_pretrain_base(self, en_docs: list[str]) -> None:
        tokens = build_dataset(self.p.en_data, en_docs, load_tokenizer(self.p.base_tok))
        say(2, f"Megatron dataset {self.p.rel(self.p.en_data)}: {len(en_docs)} documents, {tokens:,} tokens")
        folder, config = self.config("base_run", self.steps, lr=BASE_LR)
        job = stock_job(config, [f"model.data.data_prefix=[1.0,{self.p.en_data}]"], folder)
        shape = ", ".join(f"{k} {MODEL[k]}" for k in ("num_layers", "hidden_size", "encoder_seq_length"))
        say(
            2,
            f"pretraining a GPT from scratch ({shape}, batch {MODEL['global_batch_size']}) for {self.steps} "
            f"steps on {'GPU' if self.gpu else 'CPU'}; log: {self.p.rel(job.log)}",
        )
        took = run_nemo(job, self.env, self.steps)
        losses = read_probe(folder, job.log, self.steps)
        # From scratch the loss starts near ln(2048) = 7.6 and must clearly fall.
        if not mean(losses[-10:]) < mean(losses[:10]) - 0.5:
            raise DemoError(f"English loss did not fall: {loss_line(losses)}", job.log)
        say(2, f"English {loss_line(losses)}; {took:.0f} s")
        saved_nemo(folder, job.log, self.p.base_nemo)
        say(2, f"saved {self.p.rel(self.p.base_nemo)} (exp_manager save_nemo_on_train_end)")

    def step3_thai_tokenizer(self) -> list[str]:
        titles = thai_titles(THAI_TITLES)
        train = [t for i, t in enumerate(titles) if i % 10]
        heldout = [t for i, t in enumerate(titles) if not i % 10]
        write_lines(self.p.th_train, train)
        write_lines(self.p.th_heldout, heldout)
        say(3, f"Thai: {len(train):,} Wikipedia titles (pythainlp corpus) for training, {len(heldout):,} held out")
        self.cli(3, "tokenizer", "train", self.p.th_train, self.p.th_tok, "--vocab-size", str(THAI_VOCAB))
        self.cli(3, "tokenizer", "merge", self.p.base_tok, self.p.th_tok, self.p.merged_tok)
        out = self.cli(
            3,
            "tokenizer",
            "check",
            self.p.base_tok,
            self.p.merged_tok,
            "--text",
            self.p.en_heldout,
            "--text",
            self.p.th_heldout,
        )
        # English must encode exactly as before (the ids the model was trained on); Thai must get cheaper.
        en = re.search(r"en_heldout\.txt: (\d+) of \d+ lines", out)
        th = re.search(r"th_heldout\.txt: .*tokens per character ([\d.]+) -> ([\d.]+)", out)
        if en is None or th is None or int(en.group(1)) != 0 or not float(th.group(2)) < float(th.group(1)):
            raise DemoError("tokenizer check: English encodes differently or Thai got no cheaper", self.p.cli_log)
        # Titles joined into documents: a title alone is much shorter than a training sequence.
        data = train[:THAI_DATA_TITLES]
        return ["\n".join(data[i : i + TITLES_PER_DOC]) for i in range(0, len(data), TITLES_PER_DOC)]

    def step4_mixed_data(self, en_docs: list[str], th_docs: list[str]) -> None:
        docs = en_docs + th_docs
        random.Random(self.seed).shuffle(docs)  # megatron shuffles samples too; this just mixes the file
        tokens = build_dataset(self.p.mixed_data, docs, load_tokenizer(self.p.merged_tok))
        say(
            4,
            f"mixed dataset {self.p.rel(self.p.mixed_data)} with the merged tokenizer: "
            f"{len(en_docs)} English + {len(th_docs)} Thai documents, {tokens:,} tokens",
        )
        out = self.cli(
            4, "validate", self.p.base_nemo, "--tokenizer", self.p.merged_tok, "--data", self.p.mixed_data, expect=1
        )
        # It must fail for the table size alone: ids, data, artifacts and weights are all fine.
        if [line.split()[1:3] for line in out.splitlines() if "✗" in line] != [["✗", "embedding"]]:
            raise DemoError("validate failed on something other than the embedding rows", self.p.cli_log)
        say(4, "expected FAILURE: base.nemo has rows for the base tokenizer only; the plugin grows them at restore")
        dst = self.p.root / "x.nemo"
        self.cli(4, "resize", self.p.base_nemo, dst, "--tokenizer", self.p.merged_tok, "--dry-run")  # default init: fvt
        if dst.exists():
            raise DemoError("resize --dry-run wrote x.nemo", self.p.cli_log)

    def step5_continual(self) -> None:
        folder, config = self.config("continual_run", self.continual_steps, lr=CONTINUAL_LR)
        overrides = [
            f"model.restore_from_path={self.p.base_nemo}",
            f"model.tokenizer.vocab_file={self.p.merged_tok}/vocab.json",
            f"model.tokenizer.merge_file={self.p.merged_tok}/merges.txt",
            f"model.data.data_prefix=[1.0,{self.p.mixed_data}]",
            "+model.vocab_extension.init=fvt",  # the default, spelled out
            "+model.vocab_extension.check_data=true",
        ]
        job = stock_job(config, overrides, folder)
        say(
            5,
            f"continual pretraining for {self.continual_steps} steps, stock restore path; log: "
            f"{self.p.rel(job.log)}; overrides:",
        )
        indent(" ".join(o.replace(f"{self.p.root}/", "") for o in overrides))
        took = run_nemo(job, self.env, self.continual_steps)
        log = job.log.read_text(errors="replace")
        report = [line[line.index("[vocab_extension]") :] for line in log.splitlines() if "[vocab_extension]" in line]
        if not any("resized the vocabulary" in line for line in report):
            raise DemoError("the plugin did not resize the vocabulary", job.log)
        say(5, "plugin report:")
        indent("\n".join(report).replace(f"{self.p.root}/", ""))

        record = torch.load(folder / "probe.pt.rank0", map_location="cpu")
        base_vocab = load_tokenizer(self.p.base_tok).vocab_size
        merged_vocab = load_tokenizer(self.p.merged_tok).vocab_size
        self.check_rows(record, base_vocab, merged_vocab, job.log)
        say(
            5,
            f"before step 1: rows 0..{base_vocab - 1} bit-identical to base.nemo, "
            f"rows {base_vocab}..{merged_vocab - 1} each the mean of its pieces' rows under the base tokenizer (fvt), "
            f"rows {merged_vocab}..{record['padded_vocab_size'] - 1} (padding) the mean of the old rows",
        )
        losses = read_probe(folder, job.log, self.continual_steps)
        if not mean(losses[-10:]) < mean(losses[:10]):
            raise DemoError(f"English+Thai loss did not fall: {loss_line(losses)}", job.log)
        say(5, f"English+Thai {loss_line(losses)}; {took:.0f} s")
        saved_nemo(folder, job.log, self.p.final_nemo)
        say(5, f"saved {self.p.rel(self.p.final_nemo)}")

    def check_rows(self, record: dict[str, Any], base_vocab: int, merged_vocab: int, log: Path) -> None:
        """The tables the continual run started from, against base.nemo as saved (read without NeMo)."""
        from nemo_vocab_ext.io import load_checkpoint

        old = load_checkpoint(self.p.base_nemo)[0].tensors[EMBEDDING]
        start = record["start"][EMBEDDING]
        rows = padded(merged_vocab)
        if record["tokenizer_vocab_size"] != merged_vocab or tuple(start.shape) != (rows, old.shape[1]):
            raise DemoError(
                f"model built with {record['tokenizer_vocab_size']} tokens and a {tuple(start.shape)} table; "
                f"expected {merged_vocab} tokens in {rows} rows",
                log,
            )
        if not torch.equal(start[:base_vocab], old[:base_vocab]):
            raise DemoError("the extension changed old rows", log)
        # fvt, computed here on its own: each new token's row is the mean of the rows of the pieces the
        # base tokenizer splits it into (the old rows' mean where it has none); padding rows the mean.
        from nemo_vocab_ext.tokenization.pieces import pieces_under

        avg = old[:base_vocab].double().mean(0)
        base_tok, merged_tok = load_tokenizer(self.p.base_tok), load_tokenizer(self.p.merged_tok)
        pieces = pieces_under(base_tok, merged_tok, range(base_vocab, merged_vocab))
        rows_of = [old[ids].double().mean(0) if ids and max(ids) < base_vocab else avg for ids in pieces]
        expected = torch.stack([*rows_of, *[avg] * (rows - merged_vocab)]).to(old.dtype)
        if not torch.allclose(start[base_vocab:], expected, rtol=0, atol=1e-6):
            raise DemoError("new rows are not fvt's (the mean of each token's pieces' rows)", log)

    def step6_restore(self) -> None:
        folder = self.p.root / "restore_final"
        dump = folder / "d.pt"
        args = ["--nemo", str(self.p.final_nemo), "--vocab-dir", str(self.p.merged_tok), "--dump", str(dump)]
        job = NemoJob.module("harness.restore", args, folder)
        say(6, f"restoring final.nemo with the merged tokenizer, without the plugin; log: {self.p.rel(job.log)}")
        run_nemo(job, self.cpu_env)
        restored = torch.load(dump, map_location="cpu")
        vocab = load_tokenizer(self.p.merged_tok).vocab_size
        table = restored["state_dict"][EMBEDDING]
        sizes = (restored["vocab_size"], restored["padded_vocab_size"], table.shape[0])
        if sizes != (vocab, padded(vocab), padded(vocab)):
            raise DemoError(f"restored (tokenizer size, padded size, rows) = {sizes}", job.log)
        if not all(torch.isfinite(v).all() for v in restored["state_dict"].values() if v.is_floating_point()):
            raise DemoError("restored weights hold NaN/Inf", job.log)
        say(
            6,
            f"restored: tokenizer vocab size {sizes[0]}, padded vocab size {sizes[1]}, embedding {tuple(table.shape)}",
        )
        self.cli(6, "validate", self.p.final_nemo, "--data", self.p.mixed_data)


def log_tail(text: str, size: int = 4000) -> str:
    """The part of a log that tells why: from just before its last traceback (NeMo flushes warnings after it)."""
    at = text.rfind("Traceback (most recent call last)")
    return text[-size:] if at < 0 else text[max(0, at - size // 4) : at + size]


def prepare_workdir(root: Path) -> None:
    """Start from an empty folder; a previous demo's folder (marked) is replaced, anything else refused."""
    if root.exists() and any(root.iterdir()):
        if not (root / MARKER).is_file():
            raise DemoError(f"{root} exists and is not a demo folder; pass an empty or new --workdir")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text("made by tools/demo.py; removed and rebuilt on the next run\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("demo_run"), help="output folder (default ./demo_run)")
    p.add_argument("--steps", type=int, default=250, help="base pretraining steps (default 250)")
    p.add_argument("--continual-steps", type=int, help="continual pretraining steps (default: half of --steps)")
    p.add_argument("--seed", type=int, default=1234, help="model, data and mixing seed (default 1234)")
    args = p.parse_args(argv)
    if args.continual_steps is None:
        args.continual_steps = max(20, args.steps // 2)
    if args.steps < 20 or args.continual_steps < 20:
        p.error("--steps and --continual-steps must be at least 20 (the loss checks compare first and last 10 steps)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    root = args.workdir.resolve()
    gpu = torch.cuda.is_available()
    try:
        prepare_workdir(root)
        cpu_only = cpu_env(offline_hf_home(root / "hf_home"))  # NeMo's GPT2BPETokenizer asks the hub for 'gpt2'
        env = dict(cpu_only, **{PROBE_ENV: "probe.pt"})  # the Probe's record, in each run's folder
        if gpu:
            del env["CUDA_VISIBLE_DEVICES"]  # cpu_env hides the GPU
        demo = Demo(Paths(root), args.steps, args.continual_steps, args.seed, gpu, env, cpu_only)
        print(f"workdir {root}; seed {args.seed}; {'GPU' if gpu else 'CPU'}", flush=True)
        en_docs = demo.step1_base_tokenizer()
        demo.step2_pretrain_base(en_docs)
        th_docs = demo.step3_thai_tokenizer()
        demo.step4_mixed_data(en_docs, th_docs)
        demo.step5_continual()
        demo.step6_restore()
    except (DemoError, NemoRunError) as e:
        print(f"DEMO FAILED: {e}", flush=True)
        log = getattr(e, "log", None)
        if isinstance(log, Path) and log.is_file():
            print(f"--- tail of {log} ---", flush=True)
            print(log_tail(log.read_text(errors="replace")), flush=True)
        return 1
    say("ok", f"demo finished in {time.monotonic() - started:.0f} s; everything is in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
