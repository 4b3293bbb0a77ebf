"""Which init to use when extending a vocabulary: measured on two base styles, several bases each, one CPU thread.

    python tools/quality.py [--workdir quality_run] [--bases 1,2,3] [--base-steps 400] [--steps 120] [--publish]

For each style (``harness/quality_lab.py``: a GPT-2 style model with a byte-level BPE and tied embeddings,
a Llama style model with a SentencePiece-style BPE and an untied output layer):

1. an English tokenizer of that style trained on Python's documentation topics (``pydoc_data``, every
   5th topic held out), a Thai one on pythainlp's Wikipedia titles, merged with
   ``nemo-vocab-ext tokenizer merge``;
2. one base model per ``--bases`` seed (weights and batches drawn from it), pretrained from scratch on
   the English text and saved as a Hugging Face folder;
3. per base and init: ``nemo-vocab-ext resize BASE OUT --tokenizer MERGED --init X``, loaded with
   ``AutoModelForCausalLM``; its logits over the old ids checked bit-identical to the base's on every
   held-out sequence (the English ones, and the Thai ones as the base tokenizer encodes them);
   held-out loss (nats per token and bits per byte) before and during continual pretraining on an
   English+Thai mix (the same batches for every init of a base). On the Llama style, also fvt input
   rows with the output layer's new rows set to the old rows' mean or to zeros (no product option;
   the measurement says whether one would help).

Then per style and init the mean over bases with a 95% t-interval (paired by base where two inits are
compared), the verdict on the product default (``options.DEFAULTS.init``) against the targets, and
``quality.json`` (every number), ``measured.json`` (the packaged file's form; ``--publish`` writes it over
``nemo_vocab_ext/measured/quality.json`` and ``quality.png`` over ``docs/quality.png``) and ``quality.png``
in the workdir. Exit 0: the default meets the targets on every style; 1: it does not; 2: the run failed.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import checkout_root  # noqa: F401 (the harness)
import torch
from demo import TITLES_PER_DOC, english_topics, say, thai_titles

from harness import quality_lab as lab
from nemo_vocab_ext import init_costs
from nemo_vocab_ext.core.rows import Init
from nemo_vocab_ext.options import DEFAULTS
from nemo_vocab_ext.tokenization.load import load_tokenizer

MARKER = ".nemo_vocab_ext_quality"  # only a folder holding this file is ever wiped by a rerun
REPO = Path(__file__).resolve().parents[1]
PACKAGED_RESULT = REPO / "nemo_vocab_ext" / init_costs.RESULT_FILE
PACKAGED_PLOT = REPO / "docs" / "quality.png"
BASE_VOCAB = 2000
THAI_VOCAB = 2000
THAI_TITLES = 60_000  # every 10th held out
THAI_DATA_TITLES = 12_000  # about as many tokens as the English training text
BASE_LR = 2e-3  # from scratch, a tiny model takes a high rate
CONTINUAL_LR = 1e-3
EN_STEP0_TARGET = 0.03  # the default's English step-0 cost, upper end of its 95% interval, nats
MOONSHOT_EN = 0.01  # an init's English step-0 cost (upper end), nats
MOONSHOT_TH = 0.05  # ... while its Thai loss after the mixed run beats fvt's by this much (upper end)
HELDOUT_PRECISION = 0.01  # the difference the held-out sets should resolve, nats per token
# Output-layer inits tried on the untied style beside the product's: fvt input rows, another output init.
OUTPUT_TRIALS = {"fvt+out-mean": "mean", "fvt+out-zeros": "zeros"}
METRICS = (
    "en_step0_cost",
    "en_step0_cost_bpb",
    "p_new_en_step0",
    "th_step0",
    "en_final_cost",
    "th_final",
    "th_final_bpb",
)


class QualityError(RuntimeError):
    """The run could not produce a result."""


# ------------------------------------------------------------------------------------------ statistics


def t_quantile(df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def interval(values: Sequence[float]) -> dict[str, Any]:
    """Mean and 95% t-interval of ``values`` (one per base); a single value has no interval (its own ends)."""
    values = [float(v) for v in values]
    mean = statistics.fmean(values)
    half = t_quantile(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0
    return {"by_base": values, "mean": mean, "lo": mean - half, "hi": mean + half}


def base_metrics(base: dict[str, Any], run: dict[str, Any]) -> dict[str, float]:
    """One run's numbers: costs against its own base, losses at step 0 and after the mixed run."""
    first, last = run["curve"][0], run["curve"][-1]
    return {
        "en_step0_cost": first["en"] - base["en"],
        "en_step0_cost_bpb": first["en_bpb"] - base["en_bpb"],
        "p_new_en_step0": first["p_new_en"],
        "th_step0": first["th"],
        "en_final_cost": last["en"] - base["en"],
        "th_final": last["th"],
        "th_final_bpb": last["th_bpb"],
    }


def summarise(bases: dict[int, dict[str, Any]], runs: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """Per init: each metric's mean and interval over the bases (``runs[init][base seed]``)."""
    out = {}
    for init, by_seed in runs.items():
        per_base = [base_metrics(bases[seed], by_seed[seed]) for seed in sorted(by_seed)]
        out[init] = {m: interval([p[m] for p in per_base]) for m in METRICS}
    return out


def paired(summary: dict[str, Any], a: str, b: str, metric: str = "th_final") -> dict[str, Any]:
    """``a`` minus ``b`` base by base, with its interval (both were run on the same bases)."""
    xs, ys = summary[a][metric]["by_base"], summary[b][metric]["by_base"]
    return interval([x - y for x, y in zip(xs, ys, strict=True)])


def style_verdict(summary: dict[str, Any], default: str) -> dict[str, Any]:
    """The targets on one style: the default's step-0 English cost within EN_STEP0_TARGET (upper end of its
    interval), and no other init learning Thai better (the paired difference's interval wholly below zero)."""
    others = [i for i in summary if i != default]

    def ahead_of(init: str) -> list[str]:  # the inits that beat ``init`` on Thai beyond the interval
        return [o for o in summary if o != init and paired(summary, o, init)["hi"] < 0]

    en = summary[default]["en_step0_cost"]
    beaten_by = ahead_of(default)
    meeting = [
        i for i in summary if summary[i]["en_step0_cost"]["hi"] <= EN_STEP0_TARGET and not ahead_of(i)
    ]  # every init that would pass in the default's place
    return {
        "en_step0_cost_hi": en["hi"],
        "en_ok": en["hi"] <= EN_STEP0_TARGET,
        "th_beaten_by": beaten_by,
        "th_ok": not beaten_by,
        "th_vs_default": {o: paired(summary, o, default) for o in others},
        "inits_meeting_targets": meeting,
    }


def verdict(summaries: dict[str, dict[str, Any]], default: str) -> dict[str, Any]:
    """The default against the targets on every style, the moonshot, and each style's passing inits."""
    styles = {style: style_verdict(s, default) for style, s in summaries.items()}
    common = set.intersection(*(set(s) for s in summaries.values()))
    moonshot = [
        init
        for init in next(iter(summaries.values()))
        if init in common
        and init != str(Init.FVT)
        and all(
            s[init]["en_step0_cost"]["hi"] <= MOONSHOT_EN and paired(s, init, str(Init.FVT))["hi"] <= -MOONSHOT_TH
            for s in summaries.values()
        )
    ]
    return {
        "default": default,
        "default_meets_targets": all(v["en_ok"] and v["th_ok"] for v in styles.values()),
        "styles": styles,
        "moonshot": moonshot,
    }


def heldout_precision(
    seq_nats: Sequence[Sequence[float]], references: Sequence[Sequence[float]], seq_tokens: int
) -> dict[str, float]:
    """How finely the held-out set resolves a paired difference: per sequence, a model's mean loss minus a
    reference's on the same sequence; the 95% half-width of their mean, and the tokens a half-width of
    HELDOUT_PRECISION takes. The worst of the pairs given."""
    worst = 0.0
    n = len(seq_nats[0])
    for a, b in zip(seq_nats, references, strict=True):
        diffs = [(x - y) / seq_tokens for x, y in zip(a, b, strict=True)]
        worst = max(worst, statistics.stdev(diffs))
    z = 1.96
    return {
        "sequences": n,
        "tokens": n * seq_tokens,
        "half_width": z * worst / math.sqrt(n),
        "tokens_for_precision": math.ceil((z * worst / HELDOUT_PRECISION) ** 2) * seq_tokens,
    }


def exit_code(v: dict[str, Any]) -> int:
    return 0 if v["default_meets_targets"] else 1


# ------------------------------------------------------------------------------------------- the run


def cli(args: Sequence[str | Path], log: Path) -> str:
    """``nemo-vocab-ext ARGS``; its output appended to ``log``."""
    words = [str(a) for a in args]
    proc = subprocess.run(
        [sys.executable, "-m", "nemo_vocab_ext.cli", *words], capture_output=True, text=True, timeout=600
    )
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"$ nemo-vocab-ext {' '.join(words)}\n{proc.stdout}{proc.stderr}(exit {proc.returncode})\n\n")
    if proc.returncode != 0:
        raise QualityError(f"nemo-vocab-ext {words[0]} {words[1]} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


class Style:
    """One base style's tokenizers, data and held-out sets."""

    def __init__(self, style: str, root: Path, text: dict[str, list[str]], heldout_seqs: int | None) -> None:
        self.style, self.root, self.log = style, root, root / "cli.log"
        root.mkdir(parents=True)
        self.base_tok = lab.train_tokenizer(style, text["en_train"], BASE_VOCAB, root / "base_tok")
        th_tok = lab.train_tokenizer(style, text["th_tok"], THAI_VOCAB, root / "th_tok")
        cli(["tokenizer", "merge", self.base_tok, th_tok, root / "merged_tok"], self.log)
        merged_path = root / "merged_tok"
        self.merged_tok = merged_path / "tokenizer.json" if self.base_tok.is_file() else merged_path
        base, merged = load_tokenizer(self.base_tok), load_tokenizer(self.merged_tok)
        self.old_vocab, self.vocab = base.vocab_size, merged.vocab_size
        eos = base.token_to_id(lab.EOS[style])
        if eos is None:
            raise QualityError(f"{style}: the base tokenizer has no {lab.EOS[style]}")
        self.eos = eos
        self.base_bytes, self.bytes = lab.token_byte_counts(base, style), lab.token_byte_counts(merged, style)
        self.en_train = lab.token_stream(merged, text["en_train_docs"], style)
        if not torch.equal(self.en_train, lab.token_stream(base, text["en_train_docs"], style)):
            raise QualityError(f"{style}: the merged tokenizer encodes English differently from the base one")
        self.th_train = lab.token_stream(merged, text["th_train_docs"], style)
        self.en_heldout = lab.chunks(lab.token_stream(merged, text["en_heldout"], style), heldout_seqs)
        if int(self.en_heldout.max()) >= self.old_vocab:
            raise QualityError(f"{style}: held-out English holds new ids")
        n = len(self.en_heldout)
        self.th_heldout = lab.chunks(lab.token_stream(merged, text["th_heldout"], style), n)
        # Thai as the base reads it: for the old-logit check and the base's own Thai loss.
        self.th_heldout_base = lab.chunks(lab.token_stream(base, text["th_heldout"], style), n)

    def pretraining_batch(self, gen: torch.Generator) -> torch.Tensor:
        return lab.sample(self.en_train, gen, lab.BATCH)

    def mixed_batch(self, gen: torch.Generator) -> torch.Tensor:
        half = lab.BATCH // 2
        return torch.cat([lab.sample(self.en_train, gen, half), lab.sample(self.th_train, gen, lab.BATCH - half)])


def measure_point(s: Style, model: Any, step: int) -> tuple[dict[str, Any], lab.Measured, lab.Measured]:
    en = lab.measure(model, s.en_heldout, s.bytes, s.old_vocab, digests=step == 0)
    th = lab.measure(model, s.th_heldout, s.bytes, s.old_vocab)
    point = {"step": step, "en": en.nats, "en_bpb": en.bpb, "p_new_en": en.p_new, "th": th.nats, "th_bpb": th.bpb}
    return point, en, th


def run_base(s: Style, seed: int, steps: int) -> dict[str, Any]:
    """Pretrain one base on English; its held-out numbers and the digests of its logits."""
    model = lab.new_model(s.style, s.old_vocab, seed, s.eos)
    started = time.monotonic()
    losses = lab.train(model, s.pretraining_batch, steps, BASE_LR, seed)
    took = time.monotonic() - started
    folder = s.root / f"base{seed}"
    lab.save_model(model, s.base_tok, folder)
    model = lab.load_model(folder)  # measured as saved, as every extended model is
    en = lab.measure(model, s.en_heldout, s.base_bytes, s.old_vocab, digests=True)
    th = lab.measure(model, s.th_heldout_base, s.base_bytes, s.old_vocab, digests=True)
    say(
        s.style,
        f"base {seed}: {steps} steps in {took:.0f} s, train loss {losses[0]:.2f} -> {losses[-1]:.2f}, "
        f"held-out English {en.nats:.3f} nats ({en.bpb:.3f} bits/byte)",
    )
    return {
        "seed": seed, "folder": folder, "en": en.nats, "en_bpb": en.bpb, "th_base_tokenizer": th.nats,
        "th_base_tokenizer_bpb": th.bpb, "pretraining_seconds": took, "first_loss": losses[0],
        "last_loss": losses[-1], "_en": en, "_th_digests": th.digests,
    }  # fmt: skip


def run_extended(s: Style, base: dict[str, Any], name: str, steps: int, eval_every: int) -> dict[str, Any]:
    """Extend ``base`` with the CLI, check old logits, measure, continue pretraining on the mix, measure."""
    init, output = (Init.FVT, OUTPUT_TRIALS[name]) if name in OUTPUT_TRIALS else (Init(name), None)
    out = s.root / f"ext_{name}_{base['seed']}"
    cli(["resize", base["folder"], out, "--tokenizer", s.merged_tok, "--init", init, "--seed", base["seed"]], s.log)
    model = lab.load_model(out)
    shutil.rmtree(out)
    if output is not None:
        lab.set_output_rows(model, s.old_vocab, output)
    point, en, th = measure_point(s, model, 0)
    th_base = lab.measure(model, s.th_heldout_base, s.base_bytes, s.old_vocab, digests=True)
    mine, theirs = en.digests + th_base.digests, base["_en"].digests + base["_th_digests"]
    checked = len(mine)
    moved = sum(a != b for a, b in zip(mine, theirs, strict=True))  # same sequences, same count
    if moved:
        raise QualityError(f"{s.style} {name} base {base['seed']}: old-token logits moved on {moved} of {checked}")
    curve: list[dict[str, Any]] = [point]
    th_last: list[lab.Measured] = []

    def at(step: int) -> None:
        point, _, th = measure_point(s, model, step)
        curve.append(point)
        th_last[:] = [th]

    started = time.monotonic()
    # Every init of a base sees the same batches (drawn from the base's seed).
    lab.train(model, s.mixed_batch, steps, CONTINUAL_LR, base["seed"], every=eval_every, callback=at)
    took = time.monotonic() - started
    return {
        "init": name, "seed": base["seed"], "curve": curve, "old_logits_identical": checked,
        "en_seq_step0": en.seq_nats, "th_seq_final": th_last[0].seq_nats, "continual_seconds": took,
    }  # fmt: skip


def texts(thai_limit: int = THAI_TITLES) -> dict[str, list[str]]:
    """The English and Thai text, split into training and held-out parts once for both styles."""
    topics = english_topics()
    train = [t for i, t in enumerate(topics) if i % 5]  # every 5th topic held out whole
    heldout = [t for i, t in enumerate(topics) if not i % 5]
    titles = thai_titles(thai_limit)
    th_train = [t for i, t in enumerate(titles) if i % 10]
    th_heldout = [t for i, t in enumerate(titles) if not i % 10]
    data = th_train[:THAI_DATA_TITLES]

    def docs(lines: list[str]) -> list[str]:  # titles joined into documents: one alone is short
        return ["\n".join(lines[i : i + TITLES_PER_DOC]) for i in range(0, len(lines), TITLES_PER_DOC)]

    return {
        "en_train": [line for t in train for line in t],
        "en_train_docs": ["\n".join(t) for t in train],
        "en_heldout": ["\n".join(t) for t in heldout],
        "th_tok": th_train,
        "th_train_docs": docs(data),
        "th_heldout": docs(th_heldout),
    }


def run_style(style: str, root: Path, text: dict[str, list[str]], args: argparse.Namespace) -> dict[str, Any]:
    """Every base and init of one style: the raw numbers, the summary and the held-out precision."""
    s = Style(style, root / style, text, args.heldout)
    say(
        style,
        f"{s.old_vocab} English + {s.vocab - s.old_vocab} Thai tokens; held-out {len(s.en_heldout)} sequences "
        f"({s.en_heldout.numel():,} tokens) per language",
    )
    names = [str(i) for i in args.inits]
    if style == "llama" and args.output_trials:
        names += list(OUTPUT_TRIALS)
    bases, runs = {}, {n: {} for n in names}  # type: ignore[var-annotated]
    for seed in args.bases:
        base = run_base(s, seed, args.base_steps)
        bases[seed] = base
        for name in names:
            r = run_extended(s, base, name, args.steps, args.eval_every)
            runs[name][seed] = r
            m = base_metrics(base, r)
            say(
                style,
                f"  {name:<14} base {seed}: English {m['en_step0_cost']:+.3f} at step 0, Thai "
                f"{m['th_step0']:.2f} -> {m['th_final']:.3f}; {r['continual_seconds']:.0f} s",
            )
        shutil.rmtree(base["folder"])
    product = {n: runs[n] for n in names if n not in OUTPUT_TRIALS}
    default = str(DEFAULTS.init)
    every = summarise(bases, runs)
    summary = {n: every[n] for n in product}
    trials = {n: dict(every[n], th_vs_default=paired(every, n, default)) for n in names if n in OUTPUT_TRIALS}
    precision: dict[str, Any] = {}
    if default in runs:
        en0 = [runs[default][b]["en_seq_step0"] for b in args.bases]
        precision["en_step0_cost"] = heldout_precision(en0, [bases[b]["_en"].seq_nats for b in args.bases], lab.SEQ)
        pairs = [(runs[default][b]["th_seq_final"], runs[o][b]["th_seq_final"]) for b in args.bases for o in product]
        pairs = [p for p in pairs if p[0] is not p[1]]
        if pairs:
            a, b = zip(*pairs, strict=True)
            precision["th_final_vs_default"] = heldout_precision(a, b, lab.SEQ)
    return {
        "label": lab.STYLE_LABELS[style],
        "base_vocab": s.old_vocab,
        "new_tokens": s.vocab - s.old_vocab,
        "heldout_tokens": s.en_heldout.numel(),
        "bases": {
            seed: {k: v for k, v in b.items() if not k.startswith("_") and k != "folder"} for seed, b in bases.items()
        },
        "runs": [r for by_seed in runs.values() for r in by_seed.values()],
        "summary": summary,
        "output_trials": trials if style == "llama" and args.output_trials else {},
        "heldout_precision": precision,
    }


def rounded(x: Any, digits: int = 4) -> Any:
    if isinstance(x, float):
        return round(x, digits)
    if isinstance(x, dict):
        return {k: rounded(v, digits) for k, v in x.items()}
    if isinstance(x, list):
        return [rounded(v, digits) for v in x]
    return x


def measured_result(
    styles: dict[str, Any], v: dict[str, Any], args: argparse.Namespace, seconds: float
) -> dict[str, Any]:
    """The packaged file's form: per init and style each metric's interval over the bases, what it was
    measured on, the verdict and how long the run took."""
    first = next(iter(styles.values()))
    return rounded({
        "what": "held-out loss of a model whose vocabulary was extended with each init, before and after continual "
        "pretraining on a mix of the base and the new language; per style the mean over independently pretrained "
        "bases with a 95% t-interval (by_base: each base's value); costs are against the unextended base",
        "source": f"tools/quality.py --bases {','.join(map(str, args.bases))} --base-steps {args.base_steps} "
        f"--steps {args.steps}",
        "model": dict(lab.MODEL, llama_ffn=lab.LLAMA_FFN),
        "data": {
            "base": {"language": "English", "text": "Python's documentation topics (pydoc_data)"},
            "new": {"language": "Thai", "text": "pythainlp's Thai Wikipedia titles"},
            "heldout_tokens_per_language": {s: r["heldout_tokens"] for s, r in styles.items()},
        },
        "styles": {
            s: {
                "label": r["label"],
                "base_vocab": r["base_vocab"],
                "new_tokens": r["new_tokens"],
                "base_en_loss": interval([b["en"] for b in r["bases"].values()]),
                "base_en_bpb": interval([b["en_bpb"] for b in r["bases"].values()]),
                "heldout_precision": r["heldout_precision"],
            }
            for s, r in styles.items()
        },
        "pretraining_steps": args.base_steps,
        "continual_steps": args.steps,
        "bases": args.bases,
        "inits": {init: {s: r["summary"][init] for s, r in styles.items()} for init in first["summary"]},
        "output_trials": {s: r["output_trials"] for s, r in styles.items() if r["output_trials"]},
        "targets": {"en_step0_cost_hi": EN_STEP0_TARGET, "moonshot_en": MOONSHOT_EN, "moonshot_th_vs_fvt": MOONSHOT_TH},
        "verdict": v,
        "runtime_seconds": round(seconds),
        "threads": 1,
    })  # fmt: skip


def compact_json(obj: Any) -> str:
    """JSON, one key a line but each list of numbers on one line: a file small enough to read in a diff."""
    text = json.dumps(obj, indent=1)
    numbers = re.compile(r"\[\s*(-?[\d.e+-]+(?:,\s*-?[\d.e+-]+)*)\s*\]")
    text = numbers.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)
    flat = re.compile(r'\{\n\s*((?:"\w+": (?:-?[\d.e+-]+|\[[^\]\[\n]*\]),?\n\s*)+)\}')  # an interval's dict
    return flat.sub(lambda m: "{" + " ".join(m.group(1).split()) + "}", text) + "\n"


def plot(styles: dict[str, Any], path: Path) -> None:
    """Per style: English cost over the base and Thai loss against continual step, mean over bases per init."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(styles), 2, figsize=(11, 4 * len(styles)), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, (style, r) in enumerate(styles.items()):
        names = list(dict.fromkeys(x["init"] for x in r["runs"]))
        base_en = {b["seed"]: b["en"] for b in r["bases"].values()}
        for k, name in enumerate(names):
            mine = [x for x in r["runs"] if x["init"] == name]
            steps = [p["step"] for p in mine[0]["curve"]]
            en = [statistics.fmean(x["curve"][i]["en"] - base_en[x["seed"]] for x in mine) for i in range(len(steps))]
            th = [statistics.fmean(x["curve"][i]["th"] for x in mine) for i in range(len(steps))]
            style_ = "--" if name in OUTPUT_TRIALS else "-"
            for ax, ys in ((axes[row][0], en), (axes[row][1], th)):
                ax.plot(steps, ys, style_, color=colours[k % len(colours)], label=name, linewidth=1.4, marker=".")
        tail = [p["th"] for x in r["runs"] for p in x["curve"] if p["step"] > 0]
        axes[row][1].set_ylim(min(tail) - 0.05, max(tail) + 0.2)
        axes[row][0].set_title(f"{style}: English loss over the unextended base (nats)", fontsize=10)
        axes[row][1].set_title(f"{style}: Thai loss (nats); step 0 above the chart", fontsize=10)
        for ax in axes[row]:
            ax.set_xlabel("continual pretraining step (English+Thai mix)")
            ax.grid(alpha=0.3)
        axes[row][0].axhline(0, color="black", linewidth=0.8)
        axes[row][0].legend(fontsize=8)
    bases = len(next(iter(styles.values()))["bases"])
    fig.suptitle(f"Init of new token rows: mean over {bases} bases per style", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


README = REPO / "README.md"
README_START, README_END = "<!-- measured: generated by tools/quality.py -->", "<!-- end of measured -->"
REPORT_LINE = re.compile(r"(expected cost of '([a-z-]+)': ).*$", re.MULTILINE)


def render_readme(text: str, result: dict[str, Any]) -> str:
    """``text`` (the README) with its measured block and the resize report's example lines from ``result``."""
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    text = f"{head}{README_START}\n" + "\n".join(init_costs.readme_block(result)) + f"\n{README_END}{tail}"
    return REPORT_LINE.sub(lambda m: m.group(1) + init_costs.expected_cost(Init(m.group(2)), result), text)


def prepare_workdir(root: Path) -> None:
    if root.exists() and any(root.iterdir()):
        if not (root / MARKER).is_file():
            raise QualityError(f"{root} exists and is not a quality-run folder; pass an empty or new --workdir")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text("made by tools/quality.py; removed and rebuilt on the next run\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("quality_run"), help="output folder (default ./quality_run)")
    p.add_argument("--styles", default=",".join(lab.STYLES), help="comma-separated (default: gpt2,llama)")
    p.add_argument("--inits", default=",".join(i.value for i in Init), help="comma-separated (default: all)")
    p.add_argument("--bases", default="1,2,3", help="pretraining seeds, one base each (default 1,2,3)")
    p.add_argument("--base-steps", type=int, default=400, help="base pretraining steps (default 400)")
    p.add_argument("--steps", type=int, default=80, help="continual pretraining steps per run (default 80)")
    p.add_argument("--eval-every", type=int, default=40, help="held-out measurement interval (default 40)")
    p.add_argument("--heldout", type=int, default=None, help="held-out sequences per language (default: all)")
    p.add_argument("--thai-titles", type=int, default=THAI_TITLES, help=f"Thai text used (default {THAI_TITLES:,})")
    p.add_argument("--no-output-trials", dest="output_trials", action="store_false", help="skip the output inits")
    p.add_argument(
        "--publish",
        action="store_true",
        help=f"write measured.json over {PACKAGED_RESULT}, the plot over {PACKAGED_PLOT} and the README's numbers",
    )
    p.add_argument(
        "--readme-only", action="store_true", help="only rewrite the README's numbers from the packaged file"
    )
    args = p.parse_args(argv)
    args.styles = args.styles.split(",")
    args.inits = [Init(i) for i in args.inits.split(",")]
    args.bases = [int(s) for s in args.bases.split(",")]
    return args


def print_summary(result: dict[str, Any]) -> None:
    for style, s in result["styles"].items():
        say("ok", f"{style}: {s['label']}; held-out English of the bases {s['base_en_loss']['mean']:.3f} nats")
        head = f"{'init':<14}{'EN cost @0 [95%]':>26}{'p(new)':>8}{'TH end [95%]':>24}{'TH vs default':>24}"
        print(f"      {head}", flush=True)
        rows = {**result["inits"], **{k: {style: v} for k, v in result["output_trials"].get(style, {}).items()}}
        for name, by_style in rows.items():
            m = by_style[style]
            vs = result["verdict"]["styles"][style]["th_vs_default"].get(name)
            c, t = m["en_step0_cost"], m["th_final"]
            print(
                f"      {name:<14}{c['mean']:>+8.3f} [{c['lo']:+.3f},{c['hi']:+.3f}]{m['p_new_en_step0']['mean']:>8.1%}"
                f"{t['mean']:>8.3f} [{t['lo']:.3f},{t['hi']:.3f}]"
                + (f"{vs['mean']:>+8.3f} [{vs['lo']:+.3f},{vs['hi']:+.3f}]" if vs else ""),
                flush=True,
            )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.readme_only:
        README.write_text(render_readme(README.read_text(encoding="utf-8"), init_costs.measured()), encoding="utf-8")
        return 0
    started = time.monotonic()
    torch.set_num_threads(1)
    root = args.workdir.resolve()
    try:
        prepare_workdir(root)
        text = texts(args.thai_titles)
        styles = {style: run_style(style, root, text, args) for style in args.styles}
        seconds = time.monotonic() - started
        v = verdict({s: r["summary"] for s, r in styles.items()}, str(DEFAULTS.init))
        (root / "quality.json").write_text(json.dumps({"styles": styles, "verdict": v, "seconds": seconds}, indent=1))
        result = measured_result(styles, v, args, seconds)
        measured = compact_json(result)
        (root / "measured.json").write_text(measured)
        plot(styles, root / "quality.png")
        if args.publish:
            PACKAGED_RESULT.write_text(measured)
            shutil.copy2(root / "quality.png", PACKAGED_PLOT)
            README.write_text(render_readme(README.read_text(encoding="utf-8"), result), encoding="utf-8")
        print_summary(result)
        say("ok", 'README block ("Which init: measured"):')
        print("\n".join(init_costs.readme_block(json.loads(measured))), flush=True)
    except (QualityError, lab.LabError) as e:
        print(f"QUALITY RUN FAILED: {e}", flush=True)
        return 2
    code = exit_code(v)
    for style, sv in v["styles"].items():
        say("verdict", f"{style}: default {v['default']} step-0 English cost upper end {sv['en_step0_cost_hi']:+.3f} "
            f"({'ok' if sv['en_ok'] else 'over'} {EN_STEP0_TARGET}); Thai beaten by {sv['th_beaten_by'] or 'none'}; "
            f"inits meeting both targets: {', '.join(sv['inits_meeting_targets']) or 'none'}")  # fmt: skip
    say("verdict", f"moonshot: {', '.join(v['moonshot']) or 'no init'}")
    say("verdict", f"default {v['default']} {'meets' if code == 0 else 'does NOT meet'} the targets; {seconds:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
