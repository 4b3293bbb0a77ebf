"""Which init to use when extending a vocabulary: measured on a real NeMo GPT, on a CPU, in minutes.

    python tools/quality.py [--workdir quality_run] [--inits zeros,mean,...] [--seeds 1,2] [--steps 120]

1. the demo's pipeline (``tools/demo.py`` steps 1-4): an English BPE on Python's docs, a tiny GPT
   pretrained on it with the stock call sequence (``base.nemo``), a Thai BPE from pythainlp's
   Wikipedia titles merged into the base tokenizer with ``nemo-vocab-ext tokenizer merge``, and an
   English+Thai Megatron dataset;
2. held-out English (unseen pydoc topics) and Thai (unseen titles) loss of the base model;
3. for every init and seed: the base extended through the plugin's resize at restore
   (``VocabExtensionGPTModel``, ``model.vocab_extension.init``), its old-token logits checked equal
   to the base model's, held-out loss before training, then continual pretraining on the mix
   through NeMo's training loop, held-out loss every ``--eval-every`` steps.

Writes ``quality.json`` (every number), ``quality.png`` (held-out loss curves per init, both
languages) and ``measured.json`` (the means over seeds and what they were measured on, in the form of
the packaged ``nemo_vocab_ext/measured/quality.json`` that the resize report quotes; ``--publish``
replaces that file with it) in the workdir; prints a table and the README's rows. NeMo jobs run in
fork servers (NeMo imported once per server), ``--parallel`` of them at a time, one CPU thread each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import checkout_root  # noqa: F401 (the harness)
import torch
from demo import (
    CONTINUAL_LR,
    EMBEDDING,
    MODEL,
    TITLES_PER_DOC,
    Demo,
    DemoError,
    Paths,
    log_tail,
    pretraining_config,
    say,
)

from harness.runs import PROBE_ENV
from harness.tiny import ForkServer, NemoRunError, cpu_env, offline_hf_home
from nemo_vocab_ext import init_costs
from nemo_vocab_ext.core.rows import Init
from nemo_vocab_ext.tokenization.load import EOS_TOKEN, TokenizerInfo, load_tokenizer

MARKER = ".nemo_vocab_ext_quality"  # only a folder holding this file is ever wiped by a rerun
JOB_MODULE = "harness.quality_job"
SEQ = 128  # the demo model's sequence length
# Targets an init must meet on every seed to replace the default (zeros).
EN_STEP0_TARGET = 0.03  # nats of English loss at step 0 over the unextended model
TH_FINAL_TARGET = 0.01  # nats of Thai loss after the mixed run over zeros'


def heldout_ids(docs: Sequence[str], tok: TokenizerInfo, count: int) -> torch.Tensor:
    """``count`` sequences of SEQ+1 tokens, evenly spread over the documents encoded back to back."""
    eod = tok.token_to_id(EOS_TOKEN)
    assert eod is not None
    stream: list[int] = []
    for ids in tok.encode_batch(list(docs)):
        stream += [*ids, eod]
    chunks = len(stream) // (SEQ + 1)
    if chunks < count:
        raise DemoError(f"held-out text gives {chunks} sequences of {SEQ + 1} tokens; {count} needed")
    step = chunks // count
    return torch.tensor([stream[i * step * (SEQ + 1) : (i * step + 1) * (SEQ + 1)] for i in range(count)])


def write_heldout(p: Paths, path: Path, count: int) -> dict[str, int]:
    """Held-out English and Thai ids under the merged tokenizer (English encodes as under the base one)."""
    tok = load_tokenizer(p.merged_tok)
    en = p.en_heldout.read_text(encoding="utf-8").splitlines()
    th = p.th_heldout.read_text(encoding="utf-8").splitlines()
    th_docs = ["\n".join(th[i : i + TITLES_PER_DOC]) for i in range(0, len(th), TITLES_PER_DOC)]
    heldout = {"en": heldout_ids(en, tok, count), "th": heldout_ids(th_docs, tok, count)}
    if int(heldout["en"].max()) >= load_tokenizer(p.base_tok).vocab_size:
        raise DemoError("held-out English holds ids the base tokenizer does not have")
    torch.save(heldout, path)
    return {lang: int(t.numel()) for lang, t in heldout.items()}


def run_jobs(servers: list[ForkServer], jobs: list[tuple[list[str], Path]], timeout: float) -> None:
    """Run ``jobs`` on the servers, each taking the next job when free; the first failure raises."""
    queue = list(jobs)
    lock = threading.Lock()
    errors: list[tuple[Path, NemoRunError]] = []
    crashed: list[BaseException] = []

    def work(server: ForkServer) -> None:
        try:
            while True:
                with lock:
                    if not queue or errors:
                        return
                    job = queue.pop(0)
                (error,) = server.run([job], timeout=timeout)
                if error is not None:
                    with lock:
                        errors.append((job[1] / f"{server.name}.log", error))
        except BaseException as e:  # a stopped server: reported by the caller
            crashed.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in servers[: len(jobs)]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if crashed:
        raise DemoError(f"a NeMo job server stopped: {crashed[0]}")
    if errors:
        log, error = errors[0]
        raise DemoError(f"a NeMo job failed (exit {error.returncode})", log)


def summarise(base_en: float, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per init: each seed's step-0 English cost, final losses, Thai gap to zeros, and the targets."""
    final = {(r["init"], r["seed"]): r["curve"][-1] for r in runs}
    out: dict[str, Any] = {}
    for init in dict.fromkeys(r["init"] for r in runs):
        seeds = []
        for r in (r for r in runs if r["init"] == init):
            step0, last = r["curve"][0], r["curve"][-1]
            zeros = final.get(("zeros", r["seed"]))
            th_gap = None if zeros is None else last["th"] - zeros["th"]
            seeds.append(
                {
                    "seed": r["seed"],
                    "en_step0_cost": step0["en"] - base_en,
                    "p_new_en_step0": step0["p_new_en"],
                    "th_step0": step0["th"],
                    "en_final_cost": last["en"] - base_en,
                    "th_final": last["th"],
                    "th_final_vs_zeros": th_gap,
                    "meets_targets": th_gap is not None
                    and step0["en"] - base_en <= EN_STEP0_TARGET
                    and th_gap <= TH_FINAL_TARGET,
                }
            )
        mean = {
            k: statistics.mean(s[k] for s in seeds)
            for k in seeds[0]
            if k not in ("seed", "meets_targets") and all(s[k] is not None for s in seeds)
        }
        out[init] = {"seeds": seeds, "mean": mean, "meets_targets_every_seed": all(s["meets_targets"] for s in seeds)}
    return out


PACKAGED_RESULT = Path(__file__).resolve().parents[1] / "nemo_vocab_ext" / init_costs.RESULT_FILE
MODEL_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "encoder_seq_length")


def measured_result(
    summary: dict[str, Any], base_en: float, base_vocab: int, new_tokens: int, args: argparse.Namespace
) -> dict[str, Any]:
    """The means over seeds (each seed's kept beside) and what they were measured on: the packaged file's form."""
    return {
        "what": "held-out loss (nats) of a GPT whose vocabulary was extended with each init, before and after "
        "continual pretraining on a mix of the base and the new language; mean over seeds",
        "source": f"tools/quality.py --inits {','.join(summary)} --base-steps {args.base_steps} "
        f"--heldout {args.heldout} --model-seed {args.model_seed}",
        "model": {k: MODEL[k] for k in MODEL_KEYS},
        "base": {
            "language": "English",
            "data": "Python's documentation topics (pydoc_data)",
            "tokenizer": "BPE",
            "vocab_size": base_vocab,
            "pretraining_steps": args.base_steps,
            "heldout_en_loss": base_en,
        },
        "new": {"language": "Thai", "data": "pythainlp's Thai Wikipedia titles", "new_tokens": new_tokens},
        "continual_steps": args.steps,
        "seeds": args.seeds,
        "inits": {
            init: {**s["mean"], "meets_targets_every_seed": s["meets_targets_every_seed"], "per_seed": s["seeds"]}
            for init, s in summary.items()
        },
    }


def print_table(summary: dict[str, Any]) -> None:
    say("ok", "held-out loss (nats), mean over seeds; costs against the unextended base model:")
    head = f"{'init':<14}{'EN cost @0':>11}{'p(new) EN @0':>14}{'TH @0':>8}{'EN cost end':>13}{'TH end':>8}"
    print(f"      {head}{'TH vs zeros':>13}  both targets", flush=True)
    for init, s in summary.items():
        m = s["mean"]
        gap = m.get("th_final_vs_zeros")
        print(
            f"      {init:<14}{m['en_step0_cost']:>+11.3f}{m['p_new_en_step0']:>14.1%}{m['th_step0']:>8.3f}"
            f"{m['en_final_cost']:>+13.3f}{m['th_final']:>8.3f}{'' if gap is None else f'{gap:+.3f}':>13}"
            f"  {'yes' if s['meets_targets_every_seed'] else 'no'}",
            flush=True,
        )


def plot(result: dict[str, Any], path: Path) -> None:
    """Held-out loss against continual-pretraining step, one colour per init, one line style per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    inits = list(dict.fromkeys(r["init"] for r in result["runs"]))
    seeds = list(dict.fromkeys(r["seed"] for r in result["runs"]))
    for ax, lang, title in ((axes[0], "en", "English (base language)"), (axes[1], "th", "Thai (new language)")):
        for r in result["runs"]:
            steps = [p["step"] for p in r["curve"]]
            style = ("-", "--", ":", "-.")[seeds.index(r["seed"]) % 4]
            label = r["init"] if r["seed"] == seeds[0] else None
            ax.plot(
                steps,
                [p[lang] for p in r["curve"]],
                style,
                color=colours[inits.index(r["init"]) % len(colours)],
                label=label,
                linewidth=1.4,
            )
        if lang == "en":
            ax.axhline(result["base"]["en"], color="black", linewidth=0.8, linestyle=":", label="base (unextended)")
        else:  # step 0 is far above the rest: zoom on where the inits part (step 0 is in the table)
            tail = [
                p["th"] for r in result["runs"] for p in r["curve"] if p["step"] >= 2 * result["settings"]["eval_every"]
            ]
            ax.set_ylim(min(tail) - 0.05, max(tail) + 0.25)
            title += ", step 0 above the chart"
        ax.set_title(title)
        ax.set_xlabel("continual pretraining step (English+Thai mix)")
        ax.set_ylabel("held-out loss (nats)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Init of new token rows; seeds {', '.join(map(str, seeds))} (solid, dashed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def prepare_workdir(root: Path) -> None:
    if root.exists() and any(root.iterdir()):
        if not (root / MARKER).is_file():
            raise DemoError(f"{root} exists and is not a quality-run folder; pass an empty or new --workdir")
        import shutil

        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text("made by tools/quality.py; removed and rebuilt on the next run\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("quality_run"), help="output folder (default ./quality_run)")
    p.add_argument("--inits", default=",".join(i.value for i in Init), help="comma-separated (default: all)")
    p.add_argument("--seeds", default="1,2", help="continual-run seeds, comma-separated (default 1,2)")
    p.add_argument("--base-steps", type=int, default=400, help="base pretraining steps (default 400)")
    p.add_argument("--steps", type=int, default=120, help="continual pretraining steps per run (default 120)")
    p.add_argument("--eval-every", type=int, default=20, help="held-out measurement interval (default 20)")
    p.add_argument("--heldout", type=int, default=48, help="held-out sequences per language (default 48)")
    p.add_argument("--parallel", type=int, default=2, help="NeMo jobs at a time, one thread each (default 2)")
    p.add_argument("--model-seed", type=int, default=1234, help="base model, data and mixing seed (default 1234)")
    p.add_argument(
        "--publish", action="store_true", help=f"also write measured.json over {PACKAGED_RESULT} (the report quotes it)"
    )
    args = p.parse_args(argv)
    args.inits = [Init(i) for i in args.inits.split(",")]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    root = args.workdir.resolve()
    servers: list[ForkServer] = []
    try:
        prepare_workdir(root)
        env = cpu_env(offline_hf_home(root / "hf_home"))
        p = Paths(root)
        demo = Demo(p, args.base_steps, args.steps, args.model_seed, False, dict(env, **{PROBE_ENV: "probe.pt"}), env)
        print(f"workdir {root}; inits {', '.join(map(str, args.inits))}; seeds {args.seeds}", flush=True)
        # Servers import NeMo while the base model trains (their one thread each waits mostly on imports).
        job_env = dict(env, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        servers = [ForkServer.for_module(JOB_MODULE, job_env, root / f"server{i}") for i in range(args.parallel)]
        en_docs = demo.step1_base_tokenizer()
        demo.step2_pretrain_base(en_docs)
        th_docs = demo.step3_thai_tokenizer()
        demo.step4_mixed_data(en_docs, th_docs)
        heldout = root / "heldout.pt"
        sizes = write_heldout(p, heldout, args.heldout)
        say("q", f"held-out tokens: English {sizes['en']:,}, Thai {sizes['th']:,}")

        base_logits = root / "base_logits.pt"
        common = ["--nemo", str(p.base_nemo), "--heldout", str(heldout), "--base-logits", str(base_logits)]
        common += ["--eval-every", str(args.eval_every), "--threads", "1"]
        configs = {}
        for seed in args.seeds:
            folder = root / "runs" / f"conf_seed{seed}"
            config = pretraining_config(
                folder / "gpt.yaml",
                p.base_tok,
                folder / "exp",
                steps=args.steps,
                lr=CONTINUAL_LR,
                seed=seed,
                gpu=False,
                cache=folder / "index_cache",
            )
            text = config.read_text().replace("data_prefix: []", f"data_prefix: [1.0, {p.mixed_data}]")
            config.write_text(text)
            configs[seed] = config
        base_dir = root / "runs" / "base"
        run_jobs(
            servers[:1],
            [([*common, "--config", str(configs[args.seeds[0]]), "--out", str(base_dir / "r.json")], base_dir)],
            timeout=600,
        )
        base = json.loads((base_dir / "r.json").read_text())
        say("q", f"base model: held-out English loss {base['en']:.3f} ({base['vocab_size']} tokens)")

        jobs = []
        for seed in args.seeds:
            for init in args.inits:
                folder = root / "runs" / f"{init}_seed{seed}"
                # Each run its own copy of the config: megatron caches sample indices next to it.
                argv = [
                    *common,
                    "--config",
                    str(configs[seed]),
                    "--init",
                    str(init),
                    "--vocab-dir",
                    str(p.merged_tok),
                    "--seed",
                    str(seed),
                    "--out",
                    str(folder / "r.json"),
                ]
                jobs.append((argv, folder))
        say("q", f"{len(jobs)} continual runs of {args.steps} steps, {args.parallel} at a time; logs: runs/*/")
        prepared = time.monotonic()
        run_jobs(servers, jobs, timeout=600 + 10 * args.steps)
        runs = [json.loads((folder / "r.json").read_text()) for _, folder in jobs]
        for r in runs:
            if r["old_logits_max_abs_diff"] != 0.0:
                raise DemoError(
                    f"{r['init']} seed {r['seed']}: old-token logits moved by {r['old_logits_max_abs_diff']}"
                )
        say("q", f"old-token logits of all {len(runs)} extended models equal the base model's (bit for bit)")
        summary = summarise(base["en"], runs)
        result = {
            "model": MODEL,
            "base": base,
            "settings": {
                "base_steps": args.base_steps,
                "steps": args.steps,
                "eval_every": args.eval_every,
                "heldout_sequences": args.heldout,
                "seq_len": SEQ,
                "seeds": args.seeds,
                "lr": CONTINUAL_LR,
                "targets": {"en_step0_cost_max": EN_STEP0_TARGET, "th_final_vs_zeros_max": TH_FINAL_TARGET},
                "embedding": EMBEDDING,
            },
            "runs": runs,
            "summary": summary,
            "wall_seconds": time.monotonic() - started,
            "continual_seconds": time.monotonic() - prepared,
        }
        (root / "quality.json").write_text(json.dumps(result, indent=1))
        base_vocab = load_tokenizer(p.base_tok).vocab_size
        new_tokens = load_tokenizer(p.merged_tok).vocab_size - base_vocab
        measured = json.dumps(measured_result(summary, base["en"], base_vocab, new_tokens, args), indent=1) + "\n"
        (root / "measured.json").write_text(measured)
        if args.publish:
            PACKAGED_RESULT.write_text(measured)
        plot(result, root / "quality.png")
        print_table(summary)
        say("ok", 'README rows ("Which init: measured"):')
        print("\n".join(init_costs.readme_rows(json.loads(measured))), flush=True)
    except DemoError as e:
        print(f"QUALITY RUN FAILED: {e}", flush=True)
        if isinstance(e.log, Path) and e.log.is_file():
            print(f"--- tail of {e.log} ---\n{log_tail(e.log.read_text(errors='replace'))}", flush=True)
        return 1
    finally:
        for s in servers:
            s.close()
    say("ok", f"finished in {time.monotonic() - started:.0f} s; quality.json and quality.png in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
