"""One run of the init-quality experiment (``tools/quality.py``) inside NeMo.

    python -m harness.quality_job --config gpt.yaml --nemo base.nemo --heldout heldout.pt \
        --out result.json [--init INIT --vocab-dir MERGED --seed N] [--base-logits base_logits.pt]

Without ``--init``: restore the base ``.nemo`` as it is, measure held-out English loss with real
forward passes and save the old-token logits of the first held-out sequences to ``--base-logits``.
With ``--init``: restore it with the merged tokenizer through ``VocabExtensionGPTModel`` (the
plugin's resize, ``model.vocab_extension.init=INIT``), check that every old-token logit equals the
base model's, measure held-out English and Thai loss, then continue pretraining on the config's
data with NeMo's training loop (``trainer.fit``), measuring again every ``--eval-every`` steps.
``python -m harness.quality_job --serve`` imports NeMo once and forks a child per job.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

# Sequences per forward pass when measuring held-out loss.
EVAL_BATCH = 16
# Held-out English sequences whose old-token logits are compared with the base model's.
LOGIT_CHECK_SEQS = 4


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m harness.quality_job", description=__doc__)
    p.add_argument("--config", type=Path, required=True, help="a complete pretraining YAML (trainer and model)")
    p.add_argument("--nemo", type=Path, required=True, help="the base .nemo")
    p.add_argument("--heldout", type=Path, required=True, help="torch file: {'en': ids [n, s+1], 'th': ...}")
    p.add_argument("--out", type=Path, required=True, help="where the JSON result goes")
    p.add_argument("--base-logits", type=Path, required=True, help="written (base run) or compared (extended)")
    p.add_argument("--init", help="extend with model.vocab_extension.init=INIT; without it, measure the base")
    p.add_argument("--vocab-dir", type=Path, help="the merged tokenizer (vocab.json, merges.txt)")
    p.add_argument("--seed", type=int, default=1, help="seed (positive) of the continual run and of the 'normal' init")
    p.add_argument("--eval-every", type=int, default=25, help="measure held-out loss every N steps")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    return p.parse_args(argv)


def gpt_module(model: Any) -> Any:
    """The megatron-core GPTModel inside a NeMo MegatronGPTModel."""
    inner = model.model
    return inner[0] if isinstance(inner, list) else inner


@torch.no_grad()
def measure(model: Any, seqs: torch.Tensor, old_vocab: int, new_vocab: int) -> dict[str, Any]:
    """Mean next-token loss over ``seqs`` (all padded logits, as NeMo's loss), probability on new ids, logits.

    A real forward pass of the model as it trains (megatron-core GPTModel with a causal mask).
    """
    gpt = gpt_module(model)
    was_training = gpt.training
    gpt.eval()
    nll, mass_new, count = 0.0, 0.0, 0
    first: torch.Tensor | None = None
    try:
        for chunk in seqs.split(EVAL_BATCH):
            tokens, labels = chunk[:, :-1], chunk[:, 1:]
            length = tokens.shape[1]
            position_ids = torch.arange(length).unsqueeze(0).expand_as(tokens)
            mask = torch.triu(torch.ones(1, 1, length, length, dtype=torch.bool), diagonal=1)  # True: masked
            logits = gpt(tokens, position_ids, mask).float()  # [batch, seq, padded vocab]
            if first is None:
                first = logits[:LOGIT_CHECK_SEQS, :, :old_vocab].clone()
            logp = logits.log_softmax(-1)
            nll -= float(logp.gather(-1, labels.unsqueeze(-1)).sum())
            if new_vocab > old_vocab:
                mass_new += float(logp[..., old_vocab:new_vocab].exp().sum())
            count += labels.numel()
    finally:
        gpt.train(was_training)
    assert first is not None
    return {"loss": nll / count, "p_new": mass_new / count, "logits": first}


def evaluate(model: Any, heldout: dict[str, torch.Tensor], old_vocab: int, new_vocab: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for lang, seqs in heldout.items():
        m = measure(model, seqs, old_vocab, new_vocab)
        out[lang] = m["loss"]
        out[f"p_new_{lang}"] = m["p_new"]
    return out


def _config(args: argparse.Namespace) -> Any:
    from omegaconf import OmegaConf, open_dict

    cfg = OmegaConf.load(args.config)
    with open_dict(cfg):
        cfg.model.seed = args.seed
        cfg.trainer.num_sanity_val_steps = 0  # the held-out measurements replace it
        if args.vocab_dir is not None:
            cfg.model.tokenizer.vocab_file = str((args.vocab_dir / "vocab.json").resolve())
            cfg.model.tokenizer.merge_file = str((args.vocab_dir / "merges.txt").resolve())
    return cfg


def run_base(args: argparse.Namespace, heldout: dict[str, torch.Tensor]) -> dict[str, Any]:
    from nemo.collections.nlp.models.language_modeling.megatron_gpt_model import MegatronGPTModel
    from nemo.collections.nlp.parts.nlp_overrides import NLPSaveRestoreConnector
    from omegaconf import open_dict

    from harness.tiny import cpu_trainer

    connector = NLPSaveRestoreConnector()
    conf = MegatronGPTModel.restore_from(str(args.nemo), return_config=True, save_restore_connector=connector)
    with open_dict(conf):
        conf.tensor_model_parallel_size = 1
    model = MegatronGPTModel.restore_from(
        str(args.nemo), override_config_path=conf, trainer=cpu_trainer(conf), save_restore_connector=connector
    )
    vocab = int(model.tokenizer.vocab_size)
    en = measure(model, heldout["en"], vocab, vocab)
    torch.save(en["logits"], args.base_logits)
    return {"vocab_size": vocab, "padded_vocab_size": int(model.padded_vocab_size), "en": en["loss"]}


def run_extended(args: argparse.Namespace, heldout: dict[str, torch.Tensor]) -> dict[str, Any]:
    from lightning.pytorch import Callback
    from nemo.collections.nlp.models.language_modeling.megatron_gpt_sft_model import MegatronGPTSFTModel
    from nemo.collections.nlp.parts.megatron_trainer_builder import MegatronTrainerBuilder
    from omegaconf import open_dict

    from nemo_vocab_ext.model import VocabExtensionGPTModel

    cfg = _config(args)
    trainer = MegatronTrainerBuilder(cfg).create_trainer()
    # The stock continual path: the restored config with the run's model keys on top.
    model_cfg = MegatronGPTSFTModel.merge_cfg_with(str(args.nemo), cfg)
    with open_dict(model_cfg):
        model_cfg.vocab_extension = {"init": args.init, "seed": args.seed, "work_dir": str(Path.cwd())}
    started = time.monotonic()
    model = VocabExtensionGPTModel.restore_from(str(args.nemo), override_config_path=model_cfg, trainer=trainer)
    base_logits: torch.Tensor = torch.load(args.base_logits)
    old_vocab = base_logits.shape[-1]
    new_vocab = int(model.tokenizer.vocab_size)

    step0 = measure(model, heldout["en"], old_vocab, new_vocab)
    ext_logits = step0["logits"]
    # Old tokens' logits on English text must not move: the resize only adds rows.
    diff = float((ext_logits - base_logits).abs().max())
    points = [{"step": 0, **evaluate(model, heldout, old_vocab, new_vocab)}]
    max_steps = int(cfg.trainer.max_steps)

    class HeldOut(Callback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.step = 0
            self.losses: list[float] = []

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.losses.append(float(loss))
            self.step += 1
            if self.step % args.eval_every == 0 or self.step == max_steps:
                points.append({"step": self.step, **evaluate(pl_module, heldout, old_vocab, new_vocab)})

    probe = HeldOut()
    trainer.callbacks.append(probe)
    if cfg.model.data.get("data_impl") == "mock":  # tests: megatron's mock ids must fit the tiny vocabulary
        from harness.tiny import fit_mock_data_to_vocab

        fit_mock_data_to_vocab(new_vocab)
    trainer.fit(model)
    if points[-1]["step"] != max_steps or not all(math.isfinite(x) for x in probe.losses):
        raise RuntimeError(f"the run stopped at step {points[-1]['step']} of {max_steps} or its loss is not finite")
    return {
        "init": args.init,
        "seed": args.seed,
        "vocab_size": new_vocab,
        "padded_vocab_size": int(model.padded_vocab_size),
        "old_logits_max_abs_diff": diff,
        "old_logits_equal": bool(torch.equal(ext_logits, base_logits)),
        "curve": points,
        "train_losses": probe.losses,
        "seconds": time.monotonic() - started,
    }


def main(argv: list[str] | None = None) -> int:
    from harness.tiny import job_args

    args = parse_args(job_args(main, argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    from harness.cpu_nemo import apply_cpu_patches, init_cpu_process_group

    apply_cpu_patches()
    init_cpu_process_group(1)
    heldout: dict[str, torch.Tensor] = torch.load(args.heldout)
    result = run_base(args, {"en": heldout["en"]}) if args.init is None else run_extended(args, heldout)
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":  # NeMo may spawn children that re-import the main module
    sys.exit(main())
