"""Build a tiny MegatronGPTModel with real NeMo on a CPU and save it as a ``.nemo``.

    python -m nemo_vocab_ext.testing.make_model --vocab-dir D --out X.nemo [--untied] [--single-file]
        [--seed N] [--train-steps 0]

``D`` holds a GPT-2 style ``vocab.json`` and ``merges.txt``. Run it with the environment of
:func:`nemo_vocab_ext.testing.tiny.cpu_env` (offline Hugging Face hub).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m nemo_vocab_ext.testing.make_model", description=__doc__)
    p.add_argument("--vocab-dir", type=Path, required=True, help="folder with vocab.json and merges.txt")
    p.add_argument("--out", type=Path, required=True, help="the .nemo file to write")
    p.add_argument("--untied", action="store_true", help="separate output layer (share_embeddings_and_output_weights=False)")
    p.add_argument("--single-file", action="store_true", help="model_weights.ckpt layout instead of distributed")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--train-steps", type=int, default=0, help="train this many steps on mock data before saving")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size (run under torchrun for >1)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from nemo_vocab_ext.testing.cpu_nemo import apply_cpu_patches, init_cpu_process_group

    apply_cpu_patches()
    # NeMo and megatron-core are imported after the patches on purpose.
    from lightning.pytorch import seed_everything
    from nemo.collections.nlp.models.language_modeling.megatron_gpt_model import MegatronGPTModel

    from nemo_vocab_ext.testing.tiny import cpu_trainer, fit_mock_data_to_vocab, tiny_model_config

    cfg = tiny_model_config(
        args.vocab_dir / "vocab.json",
        args.vocab_dir / "merges.txt",
        tied=not args.untied,
        tp=args.tp,
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
    if args.single_file:
        # NLPSaveRestoreConnector writes model_weights/ for every mcore model; for a model without a
        # sharded state dict it delegates to this base connector, which writes model_weights.ckpt.
        from nemo.core.connectors.save_restore_connector import SaveRestoreConnector

        model._save_restore_connector = SaveRestoreConnector()
    model.save_to(str(args.out))
    return 0


if __name__ == "__main__":  # save_to spawns a child process that re-imports the main module
    sys.exit(main())
