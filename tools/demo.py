"""The whole localization workflow on an embedded default: English base GPT -> Thai vocabulary extension.

    python tools/demo.py [--workdir demo_run] [--steps 300] [--continual-steps 150] [--seed 1234]

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

import numpy as np
import torch
from omegaconf import OmegaConf

from nemo_vocab_ext.testing.runs import stock_job, write_pretraining_config
from nemo_vocab_ext.testing.stock_pretraining import PROBE_ENV
from nemo_vocab_ext.testing.tiny import NemoJob, NemoRunError, cpu_env, offline_hf_home, run_concurrently
from nemo_vocab_ext.tokenizer import EOS_TOKEN, TokenizerInfo, load_tokenizer

MARKER = ".nemo_vocab_ext_demo"  # only a folder holding this file is ever wiped by a rerun
EMBEDDING = "model.embedding.word_embeddings.weight"
BASE_VOCAB = 2000
THAI_VOCAB = 2000
THAI_TITLES = 60_000  # of ~470k: enough for a 2000-token BPE, and as many tokens as the English text
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
    "micro_batch_size": 8,
    "global_batch_size": 8,
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
}
NEMO_TIMEOUT = 1200.0


class DemoError(RuntimeError):
    """A step misbehaved; ``log`` is the file that shows why."""

    def __init__(self, message: str, log: Path | None = None):
        super().__init__(message)
        self.log = log


@dataclass(frozen=True)
class Paths:
    """Where each artifact of the demo lives inside the workdir."""

    root: Path

    @property
    def en_train(self) -> Path:
        return self.root / "text" / "en_train.txt"

    @property
    def en_heldout(self) -> Path:
        return self.root / "text" / "en_heldout.txt"

    @property
    def th_train(self) -> Path:
        return self.root / "text" / "th_train.txt"

    @property
    def th_heldout(self) -> Path:
        return self.root / "text" / "th_heldout.txt"

    @property
    def base_tok(self) -> Path:
        return self.root / "tok_base"

    @property
    def th_tok(self) -> Path:
        return self.root / "tok_th"

    @property
    def merged_tok(self) -> Path:
        return self.root / "tok_merged"

    @property
    def en_data(self) -> Path:  # a Megatron prefix: .bin + .idx
        return self.root / "data" / "en_text_document"

    @property
    def mixed_data(self) -> Path:
        return self.root / "data" / "mixed_text_document"

    @property
    def base_nemo(self) -> Path:
        return self.root / "base.nemo"

    @property
    def final_nemo(self) -> Path:
        return self.root / "final.nemo"


def say(step: int | str, message: str) -> None:
    print(f"[{step}] {message}", flush=True)


def indent(text: str) -> None:
    for line in text.rstrip("\n").splitlines():
        print(f"      {line}", flush=True)


def rel(path: Path, root: Path) -> str:
    return os.path.relpath(path, root)


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


def run_cli(args: list[str], root: Path, log: Path, *, expect: int = 0) -> str:
    """``nemo-vocab-ext ARGS`` in ``root``; its stdout is printed indented, its whole output goes to ``log``."""
    say("$", "nemo-vocab-ext " + shlex.join(args))
    proc = subprocess.run(
        [sys.executable, "-m", "nemo_vocab_ext.cli", *args], cwd=root, capture_output=True, text=True, timeout=600
    )
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"$ nemo-vocab-ext {shlex.join(args)}\n{proc.stdout}{proc.stderr}(exit {proc.returncode})\n\n")
    indent(proc.stdout)
    if proc.returncode != expect:
        raise DemoError(f"nemo-vocab-ext {args[0]} exited {proc.returncode}, expected {expect}:\n{proc.stderr}", log)
    return proc.stdout


def run_nemo(job: NemoJob, env: dict[str, str]) -> float:
    """One NeMo subprocess (its log in ``job.log``); returns its wall time."""
    start = time.monotonic()
    (error,) = run_concurrently([job], env, timeout=NEMO_TIMEOUT)
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
        "sched": {"name": "CosineAnnealing", "warmup_steps": max(1, steps // 10), "constant_steps": 0,
                  "min_lr": lr / 10},
    }
    # Real data. NeMo needs a non-empty validation split: one batch of it runs at the end (and as sanity check).
    cfg.model.data.merge_with({"data_impl": "mmap", "splits_string": "95,5,0", "index_mapping_dir": str(cache)})
    cfg.trainer.limit_val_batches = 1
    cfg.trainer.log_every_n_steps = max(1, steps // 20)
    if gpu:  # the stock defaults' accelerator; fp32 keeps GPU and CPU runs comparable
        cfg.trainer.accelerator = "gpu"
        cfg.trainer.gradient_clip_val = 1.0
    OmegaConf.save(cfg, path)
    return path


def read_probe(folder: Path, log: Path) -> dict[str, Any]:
    path = folder / "probe.pt.rank0"
    if not path.is_file():
        raise DemoError(f"{path}: the run left no probe record", log)
    record: dict[str, Any] = torch.load(path)
    losses = record["losses"]
    if not losses or not all(math.isfinite(x) for x in losses):
        raise DemoError(f"losses not finite: {losses[:5]} ... {losses[-5:]}", log)
    return record


def loss_line(losses: Sequence[float]) -> str:
    k = max(1, min(10, len(losses) // 10))
    head, tail = sum(losses[:k]) / k, sum(losses[-k:]) / k
    return (
        f"loss at step 1: {losses[0]:.3f}, at step {len(losses)}: {losses[-1]:.3f} "
        f"(mean of first/last {k}: {head:.3f} -> {tail:.3f})"
    )


def saved_nemo(exp_dir: Path, log: Path, dest: Path) -> Path:
    src = exp_dir / "checkpoints" / "megatron_gpt.nemo"
    if not src.is_file():
        raise DemoError(f"{src}: no .nemo saved at train end", log)
    shutil.copyfile(src, dest)
    return dest


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
    env: dict[str, str]

    @property
    def root(self) -> Path:
        return self.p.root

    @property
    def cli_log(self) -> Path:
        return self.root / "cli.log"

    def step1_base_tokenizer(self) -> list[str]:
        topics = english_topics()
        # Every 10th topic is held out whole, so the held-out text was never seen by tokenizer or model.
        train = [t for i, t in enumerate(topics) if i % 10]
        heldout = [t for i, t in enumerate(topics) if not i % 10]
        write_lines(self.p.en_train, [line for t in train for line in t])
        write_lines(self.p.en_heldout, [line for t in heldout for line in t])
        chars = self.p.en_train.stat().st_size
        say(1, f"English: {len(train)} pydoc topics for training ({chars:,} bytes), {len(heldout)} held out")
        run_cli(
            ["tokenizer", "train", rel(self.p.en_train, self.root), rel(self.p.base_tok, self.root),
             "--vocab-size", str(BASE_VOCAB)],
            self.root,
            self.cli_log,
        )
        return ["\n".join(t) for t in train]

    def step2_pretrain_base(self, en_docs: list[str]) -> None:
        base_tok = load_tokenizer(self.p.base_tok)
        tokens = build_dataset(self.p.en_data, en_docs, base_tok)
        say(2, f"Megatron dataset {rel(self.p.en_data, self.root)}: {len(en_docs)} documents, {tokens:,} tokens")
        folder = self.root / "base_run"
        config = pretraining_config(
            folder / "conf" / "gpt.yaml", self.p.base_tok, folder / "exp",
            steps=self.steps, lr=2e-3, seed=self.seed, gpu=self.gpu, cache=self.root / "data" / "index_cache",
        )
        overrides = [f"model.data.data_prefix=[1.0,{self.p.en_data}]"]
        desc = ", ".join(f"{k}={MODEL[k]}" for k in ("num_layers", "hidden_size", "encoder_seq_length"))
        say(2, f"pretraining a GPT from scratch ({desc}, batch {MODEL['global_batch_size']}) "
               f"for {self.steps} steps on {'GPU' if self.gpu else 'CPU'}; log: {rel(folder / 'run.log', self.root)}")
        job = stock_job(config, overrides, folder)
        took = run_nemo(job, self.env)
        losses = read_probe(folder, job.log)["losses"]
        if len(losses) != self.steps:
            raise DemoError(f"{len(losses)} training steps recorded, expected {self.steps}", job.log)
        if not sum(losses[-10:]) / len(losses[-10:]) < sum(losses[:10]) / len(losses[:10]) - 0.5:
            raise DemoError(f"English loss did not fall: {loss_line(losses)}", job.log)
        saved_nemo(folder / "exp", job.log, self.p.base_nemo)
        say(2, f"English {loss_line(losses)}; {took:.0f} s")
        say(2, f"saved {rel(self.p.base_nemo, self.root)} (exp_manager save_nemo_on_train_end)")

    def step3_thai_tokenizer(self) -> list[str]:
        titles = thai_titles(THAI_TITLES)
        train = [t for i, t in enumerate(titles) if i % 10]
        heldout = [t for i, t in enumerate(titles) if not i % 10]
        write_lines(self.p.th_train, train)
        write_lines(self.p.th_heldout, heldout)
        say(3, f"Thai: {len(train):,} Wikipedia titles (pythainlp corpus) for training, {len(heldout):,} held out")
        r = lambda p: rel(p, self.root)  # noqa: E731
        run_cli(["tokenizer", "train", r(self.p.th_train), r(self.p.th_tok), "--vocab-size", str(THAI_VOCAB)],
                self.root, self.cli_log)
        run_cli(["tokenizer", "merge", r(self.p.base_tok), r(self.p.th_tok), r(self.p.merged_tok)],
                self.root, self.cli_log)
        check = ["tokenizer", "check", r(self.p.base_tok), r(self.p.merged_tok),
                 "--text", r(self.p.en_heldout), "--text", r(self.p.th_heldout)]
        out = run_cli(check, self.root, self.cli_log)
        # English must encode exactly as before (the model's trained ids), Thai must get cheaper.
        en = re.search(r"en_heldout\.txt: (\d+) of \d+ lines", out)
        th = re.search(r"th_heldout\.txt: .*tokens per character ([\d.]+) -> ([\d.]+)", out)
        if en is None or th is None or int(en.group(1)) != 0 or not float(th.group(2)) < float(th.group(1)):
            raise DemoError("tokenizer check: English encodes differently or Thai got no cheaper", self.cli_log)
        # Thai titles joined into documents: a title alone is shorter than a training sequence.
        return ["\n".join(train[i : i + TITLES_PER_DOC]) for i in range(0, len(train), TITLES_PER_DOC)]

    def step4_mixed_data(self, en_docs: list[str], th_docs: list[str]) -> None:
        merged = load_tokenizer(self.p.merged_tok)
        docs = en_docs + th_docs
        random.Random(self.seed).shuffle(docs)  # megatron shuffles too; this just mixes the file
        tokens = build_dataset(self.p.mixed_data, docs, merged)
        say(4, f"mixed dataset {rel(self.p.mixed_data, self.root)} with the merged tokenizer: "
               f"{len(en_docs)} English + {len(th_docs)} Thai documents, {tokens:,} tokens")
        r = lambda p: rel(p, self.root)  # noqa: E731
        run_cli(["validate", r(self.p.base_nemo), "--tokenizer", r(self.p.merged_tok), "--data", r(self.p.mixed_data)],
                self.root, self.cli_log, expect=1)
        say(4, "expected FAILURE: base.nemo has rows for the base tokenizer only; the plugin grows them at restore")
        run_cli(["resize", r(self.p.base_nemo), "x.nemo", "--tokenizer", r(self.p.merged_tok), "--init", "mean",
                 "--dry-run"], self.root, self.cli_log)
        if (self.root / "x.nemo").exists():
            raise DemoError("resize --dry-run wrote x.nemo", self.cli_log)

    def step5_continual(self) -> None:
        folder = self.root / "continual_run"
        config = pretraining_config(
            folder / "conf" / "gpt.yaml", self.p.base_tok, folder / "exp",
            steps=self.continual_steps, lr=1e-3, seed=self.seed, gpu=self.gpu,
            cache=self.root / "data" / "index_cache",
        )
        overrides = [
            f"model.restore_from_path={self.p.base_nemo}",
            f"model.tokenizer.vocab_file={self.p.merged_tok}/vocab.json",
            f"model.tokenizer.merge_file={self.p.merged_tok}/merges.txt",
            f"model.data.data_prefix=[1.0,{self.p.mixed_data}]",
            "+model.vocab_extension.init=mean",
            "+model.vocab_extension.check_data=true",
        ]
        say(5, f"continual pretraining, {self.continual_steps} steps, stock restore path with:")
        indent(" ".join(o.replace(str(self.root) + "/", "") for o in overrides))
        job = stock_job(config, overrides, folder)
        took = run_nemo(job, self.env)
        log = job.log.read_text(errors="replace")
        report = [line[line.index("[vocab_extension]") :] for line in log.splitlines() if "[vocab_extension]" in line]
        if not any("resized the vocabulary" in line for line in report):
            raise DemoError("the plugin did not resize the vocabulary", job.log)
        say(5, f"plugin report (from {rel(job.log, self.root)}):")
        indent("\n".join(report))

        record = read_probe(folder, job.log)
        base_vocab = load_tokenizer(self.p.base_tok).vocab_size
        merged_vocab = load_tokenizer(self.p.merged_tok).vocab_size
        self.check_rows(record, base_vocab, merged_vocab, job.log)
        say(5, f"before step 1: rows 0..{base_vocab - 1} bit-identical to base.nemo, "
               f"rows {base_vocab}..{record['padded_vocab_size'] - 1} = mean of the old rows")
        losses = record["losses"]
        if len(losses) != self.continual_steps:
            raise DemoError(f"{len(losses)} training steps recorded, expected {self.continual_steps}", job.log)
        say(5, f"English+Thai {loss_line(losses)}; {took:.0f} s")
        saved_nemo(folder / "exp", job.log, self.p.final_nemo)
        say(5, f"saved {rel(self.p.final_nemo, self.root)}")

    def check_rows(self, record: dict[str, Any], base_vocab: int, merged_vocab: int, log: Path) -> None:
        from nemo_vocab_ext.io import load_checkpoint

        old = load_checkpoint(self.p.base_nemo)[0].weights()[EMBEDDING]
        start = record["start"][EMBEDDING]
        rows = padded(merged_vocab)
        if record["tokenizer_vocab_size"] != merged_vocab or tuple(start.shape) != (rows, old.shape[1]):
            raise DemoError(
                f"model built with {record['tokenizer_vocab_size']} tokens, table {tuple(start.shape)}; "
                f"expected {merged_vocab} tokens in {rows} rows",
                log,
            )
        if not torch.equal(start[:base_vocab], old[:base_vocab]):
            raise DemoError("old rows changed by the extension", log)
        mean = old[:base_vocab].double().mean(0).to(old.dtype)
        if not torch.allclose(start[base_vocab:], mean.expand(rows - base_vocab, -1), rtol=0, atol=1e-6):
            raise DemoError("new rows are not the mean of the old rows", log)

    def step6_restore(self) -> None:
        folder = self.root / "restore_final"
        dump = folder / "d.pt"
        args = ["--nemo", str(self.p.final_nemo), "--vocab-dir", str(self.p.merged_tok), "--dump", str(dump)]
        job = NemoJob.module("nemo_vocab_ext.testing.restore", args, folder)
        say(6, f"restoring final.nemo with the merged tokenizer, no plugin; log: {rel(job.log, self.root)}")
        run_nemo(job, self.env)
        restored = torch.load(dump)
        merged_vocab = load_tokenizer(self.p.merged_tok).vocab_size
        table = restored["state_dict"][EMBEDDING]
        sizes = (restored["vocab_size"], restored["padded_vocab_size"], table.shape[0])
        if sizes != (merged_vocab, padded(merged_vocab), padded(merged_vocab)):
            raise DemoError(f"restored sizes (tokenizer, padded, rows) {sizes}", job.log)
        if not all(torch.isfinite(v).all() for v in restored["state_dict"].values() if v.is_floating_point()):
            raise DemoError("restored weights hold NaN/Inf", job.log)
        say(6, f"restored: tokenizer vocab size {sizes[0]}, padded vocab size {sizes[1]}, "
               f"embedding {tuple(table.shape)}")
        r = lambda p: rel(p, self.root)  # noqa: E731
        run_cli(["validate", r(self.p.final_nemo), "--data", r(self.p.mixed_data)], self.root, self.cli_log)


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
    p.add_argument("--steps", type=int, default=300, help="base pretraining steps (default 300)")
    p.add_argument("--continual-steps", type=int, help="continual pretraining steps (default: half of --steps)")
    p.add_argument("--seed", type=int, default=1234, help="model, data and mixing seed (default 1234)")
    args = p.parse_args(argv)
    if args.continual_steps is None:
        args.continual_steps = max(1, args.steps // 2)
    if args.steps < 20 or args.continual_steps < 1:
        p.error("--steps must be at least 20 (the loss check compares the first and last 10 steps)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    root = args.workdir.resolve()
    gpu = torch.cuda.is_available()
    try:
        prepare_workdir(root)
        env = cpu_env(offline_hf_home(root / "hf_home"))  # NeMo's GPT2BPETokenizer asks the hub for 'gpt2'
        env[PROBE_ENV] = "probe.pt"  # relative to each run's folder
        if gpu:
            del env["CUDA_VISIBLE_DEVICES"]
        demo = Demo(Paths(root), args.steps, args.continual_steps, args.seed, gpu, env)
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
            print(log.read_text(errors="replace")[-4000:], flush=True)
        return 1
    say("ok", f"demo finished in {time.monotonic() - started:.0f} s; everything is in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
