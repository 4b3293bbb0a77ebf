"""Restore a ``.nemo`` with real NeMo on a CPU, as the stock continual-training path does, and dump it.

    python -m harness.restore --nemo X.nemo [--vocab-dir D] --dump OUT.pt

``--vocab-dir`` replaces the archived tokenizer by ``D/vocab.json`` and ``D/merges.txt``: how a
resized model is restored with its new tokenizer. ``OUT.pt`` holds ``{"state_dict": {name: tensor},
"vocab_size": int, "padded_vocab_size": int}`` (under torchrun, one ``OUT.rank<r>.pt`` per rank with
that rank's slices). Any load error propagates: the exit status is non-zero.
``python -m harness.restore --serve`` imports NeMo once and runs jobs read from stdin,
each in a forked child (:class:`harness.tiny.ForkServer`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m harness.restore", description=__doc__)
    p.add_argument("--nemo", type=Path, required=True, help="the .nemo archive to restore")
    p.add_argument("--vocab-dir", type=Path, help="restore with this vocab.json and merges.txt instead")
    p.add_argument("--dump", type=Path, required=True, help="where to torch.save the restored tensors")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size (run under torchrun for more than 1)")
    p.add_argument(
        "--vocab-extension",
        metavar="INIT",
        help="restore through VocabExtensionGPTModel with model.vocab_extension.init=INIT",
    )
    return p.parse_args(argv)


def dump_model(model: Any, path: Path) -> None:
    """``torch.save`` a MegatronGPTModel's tensors (no ``_extra_state``) and its vocabulary sizes."""
    tensors = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    dump = {
        "state_dict": tensors,
        "vocab_size": int(model.tokenizer.vocab_size),
        "padded_vocab_size": int(model.padded_vocab_size),
    }
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        path = path.with_name(f"{path.stem}.rank{torch.distributed.get_rank()}{path.suffix}")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dump, path)


def prepare(nemo: Path, *, vocab_dir: Path | None, extension: dict[str, Any] | None, tp: int = 1) -> tuple[Any, Any]:
    """CPU patches applied, process group up; NeMo's config of ``nemo`` pointed at ``vocab_dir`` and given
    ``model.vocab_extension`` (when set), and the model class that restores it: (config, class)."""
    from harness.cpu_nemo import apply_cpu_patches, init_cpu_process_group

    apply_cpu_patches()
    from nemo.collections.nlp.models.language_modeling.megatron_gpt_model import MegatronGPTModel
    from nemo.collections.nlp.parts.nlp_overrides import NLPSaveRestoreConnector
    from omegaconf import open_dict

    conf = MegatronGPTModel.restore_from(
        str(nemo), return_config=True, save_restore_connector=NLPSaveRestoreConnector()
    )
    with open_dict(conf):
        conf.tensor_model_parallel_size = tp
        if vocab_dir is not None:
            conf.tokenizer.vocab_file = str((vocab_dir / "vocab.json").resolve())
            conf.tokenizer.merge_file = str((vocab_dir / "merges.txt").resolve())
        if extension is not None:
            conf.vocab_extension = extension
    init_cpu_process_group(tp)
    if extension is None:
        return conf, MegatronGPTModel
    from nemo_vocab_ext.model import VocabExtensionGPTModel

    return conf, VocabExtensionGPTModel


def main(argv: list[str] | None = None) -> int:
    from harness.tiny import job_args

    args = parse_args(job_args(main, argv))
    extension = None if args.vocab_extension is None else {"init": args.vocab_extension}
    conf, model_class = prepare(args.nemo, vocab_dir=args.vocab_dir, extension=extension, tp=args.tp)
    from nemo.collections.nlp.parts.nlp_overrides import NLPSaveRestoreConnector

    from harness.tiny import cpu_trainer

    model = model_class.restore_from(
        str(args.nemo),
        override_config_path=conf,
        trainer=cpu_trainer(conf, devices=args.tp),
        save_restore_connector=NLPSaveRestoreConnector(),
    )
    dump_model(model, args.dump)
    return 0


if __name__ == "__main__":  # NeMo may spawn children that re-import the main module
    sys.exit(main())
