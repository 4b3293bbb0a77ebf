"""Configs and subprocess runs of the stock continual-pretraining path, for tests and the demo."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from harness.tiny import NemoJob, tiny_model_config, tiny_trainer_config

# Names a file (relative to the run's folder) for stock_pretraining's Probe: vocab tables at train start, losses.
PROBE_ENV = "NEMO_VOCAB_EXT_PROBE"


def write_pretraining_config(
    path: Path,
    vocab_dir: Path,
    *,
    exp_dir: Path,
    tied: bool = True,
    max_steps: int = 3,
    save_nemo: bool = True,
    tp: int = 1,
) -> Path:
    """A complete ``megatron_gpt_config``-style YAML (trainer, exp_manager, model) for a tiny CPU run."""
    model = tiny_model_config(vocab_dir / "vocab.json", vocab_dir / "merges.txt", tied=tied, tp=tp)
    model.restore_from_path = None
    exp_manager = {
        "explicit_log_dir": str(exp_dir),
        "exp_dir": None,
        "name": "megatron_gpt",
        "create_wandb_logger": False,
        "create_tensorboard_logger": False,
        "create_checkpoint_callback": save_nemo,
        "resume_if_exists": False,
        "checkpoint_callback_params": {
            "monitor": "reduced_train_loss",
            "save_top_k": 0,
            "save_last": False,
            "save_best_model": False,
            "always_save_nemo": False,
            "save_nemo_on_train_end": save_nemo,
            "filename": "megatron_gpt--{reduced_train_loss:.2f}-{step}",
            "model_parallel_size": tp,
        },
    }
    cfg = OmegaConf.create(
        {
            "name": "megatron_gpt",
            "trainer": tiny_trainer_config(devices=tp, max_steps=max_steps),
            "exp_manager": exp_manager,
            "model": model,
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, path)
    return path


def stock_job(config: Path, overrides: list[str], folder: Path, *, nproc: int = 1) -> NemoJob:
    """The stock call sequence on ``config`` with Hydra ``overrides``, under torchrun when ``nproc`` > 1."""
    module = ["-m", "harness.stock_pretraining"]
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    return NemoJob(
        [*launcher, *module, f"--config-path={config.parent}", f"--config-name={config.stem}", *overrides],
        folder,
        "run.log",
    )
