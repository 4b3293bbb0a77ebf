"""Time NeMo's own restore paths on a CPU, for ``tools/bench.py``.

    python -m harness.bench_nemo --mode stock|plugin|resave --nemo X.nemo --result R.json
        [--vocab-dir D] [--init fvt] [--work-dir W] [--out Y.nemo]

``stock``: ``MegatronGPTModel.restore_from`` (the tokenizer replaced by ``D`` when given, as a
continual-training run with a merged tokenizer does). ``plugin``: the same call through
``VocabExtensionGPTModel`` with ``model.vocab_extension = {init, work_dir}``. ``resave``: stock
restore, then ``save_to(Y)``. Only the restore (and save) calls are timed, inside the process,
so the ~15 s of NeMo imports do not dilute the comparison; ``R.json`` gets the seconds, the
process's peak RSS so far and the restored table's size. ``--serve`` runs jobs from stdin in
forked children (:class:`harness.tiny.ForkServer`), NeMo imported once.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m harness.bench_nemo", description=__doc__)
    p.add_argument("--mode", choices=["stock", "plugin", "resave"], required=True)
    p.add_argument("--nemo", type=Path, required=True)
    p.add_argument("--result", type=Path, required=True, help="JSON file for the timings")
    p.add_argument("--vocab-dir", type=Path, help="restore with this vocab.json and merges.txt")
    p.add_argument("--init", default="fvt", help="model.vocab_extension.init (plugin mode)")
    p.add_argument("--work-dir", type=Path, help="model.vocab_extension.work_dir (plugin mode)")
    p.add_argument("--out", type=Path, help="where resave mode saves the restored model")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from harness.tiny import job_args

    args = parse_args(job_args(main, argv))
    extension: dict[str, Any] | None = None
    if args.mode == "plugin":
        extension = {"init": args.init}
        if args.work_dir is not None:
            args.work_dir.mkdir(parents=True, exist_ok=True)
            extension["work_dir"] = str(args.work_dir)
    from harness.restore import prepare

    conf, model_class = prepare(args.nemo, vocab_dir=args.vocab_dir, extension=extension)
    from nemo.collections.nlp.parts.nlp_overrides import NLPSaveRestoreConnector

    from harness.tiny import cpu_trainer

    trainer = cpu_trainer(conf)
    start = time.perf_counter()
    model = model_class.restore_from(
        str(args.nemo), override_config_path=conf, trainer=trainer, save_restore_connector=NLPSaveRestoreConnector()
    )
    result = {"restore_s": time.perf_counter() - start}
    if args.mode == "resave":
        if args.out is None:
            raise SystemExit("--mode resave needs --out")
        start = time.perf_counter()
        model.save_to(str(args.out))
        result["save_s"] = time.perf_counter() - start
    result.update(
        {
            # ru_maxrss is KiB on Linux; a forked job's count includes what the server had imported.
            "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "vocab_size": int(model.tokenizer.vocab_size),
            "padded_vocab_size": int(model.padded_vocab_size),
            "embedding_rows": int(model.model.embedding.word_embeddings.weight.shape[0]),
        }
    )
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":  # save_to spawns a child process that re-imports the main module
    sys.exit(main())
