"""Build a tiny MegatronGPTModel with real NeMo on a CPU and save it as a ``.nemo``.

    python -m harness.make_model --vocab-dir D --out X.nemo [--untied] [--single-file]
        [--seed N] [--train-steps 0] [--dump SAVED.pt]

``D`` holds a GPT-2 style ``vocab.json`` and ``merges.txt``. Run it with the environment of
:func:`harness.tiny.cpu_env` (offline Hugging Face hub), one output folder per
concurrent run (``save_to`` uses it as scratch space), and ``torchrun`` for ``--tp`` > 1.
Weights are megatron's random init (norms 1, biases 0), trained on mock data with ``--train-steps``.
``--dump`` writes what was saved in the format of :mod:`harness.restore`.
``python -m harness.make_model --serve`` imports NeMo once and runs jobs read from stdin,
each in a forked child (:class:`harness.tiny.ForkServer`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m harness.make_model", description=__doc__)
    p.add_argument("--vocab-dir", type=Path, required=True, help="folder with vocab.json and merges.txt")
    p.add_argument("--out", type=Path, required=True, help="the .nemo file to write")
    p.add_argument("--untied", action="store_true", help="own output layer (share_embeddings_and_output_weights=False)")
    p.add_argument(
        "--single-file", action="store_true", help="model_weights.ckpt instead of distributed model_weights/"
    )
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--train-steps", type=int, default=0, help="train this many steps on mock data before saving")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size (run under torchrun for more than 1)")
    p.add_argument("--dump", type=Path, help="also torch.save the saved tensors here, as the restore module does")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from harness.tiny import job_args

    args = parse_args(job_args(main, argv))
    from harness.cpu_nemo import apply_cpu_patches, init_cpu_process_group

    apply_cpu_patches()
    from lightning.pytorch import seed_everything
    from nemo.collections.nlp.models.language_modeling.megatron_gpt_model import MegatronGPTModel

    from harness.restore import dump_model
    from harness.tiny import cpu_trainer, fit_mock_data_to_vocab, save_nemo, tiny_model_config

    cfg = tiny_model_config(
        args.vocab_dir / "vocab.json", args.vocab_dir / "merges.txt", tied=not args.untied, tp=args.tp
    )
    cfg.seed = args.seed
    seed_everything(args.seed)
    init_cpu_process_group(args.tp)
    trainer = cpu_trainer(cfg, devices=args.tp, max_steps=args.train_steps)
    model = MegatronGPTModel(cfg, trainer)
    if args.train_steps > 0:
        fit_mock_data_to_vocab(model.tokenizer.vocab_size)
        trainer.fit(model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_nemo(model, args.out, single_file=args.single_file)
    if args.dump is not None:
        dump_model(model, args.dump)
    return 0


if __name__ == "__main__":  # save_to spawns a child process that re-imports the main module
    sys.exit(main())
