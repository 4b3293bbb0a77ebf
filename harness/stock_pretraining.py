"""The call sequence of NeMo's stock ``megatron_gpt_pretraining.py`` (v2.4), for CPU tests and the demo.

NeMo's ``examples/`` are not on PyPI, so this module repeats the stock ``main`` step by step:
``MegatronTrainerBuilder``, ``exp_manager``, ``MegatronGPTSFTModel.merge_cfg_with`` and
``MegatronGPTModel.restore_from(..., NLPSaveRestoreConnector())`` for ``model.restore_from_path``,
``trainer.ckpt_path`` for ``model.restore_from_ckpt``, then ``trainer.fit``. The only additions are
the CPU patches (before NeMo is imported; a GPU machine needs none), mock data kept inside a tiny
vocabulary, and, when
``NEMO_VOCAB_EXT_PROBE`` names a file, a callback that records the vocab tables before the first
step and the training losses, so tests can check what the plugin did.

    python -m harness.stock_pretraining --config-path DIR --config-name NAME [overrides]
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from harness.cpu_nemo import apply_cpu_patches, init_cpu_process_group
from harness.runs import PROBE_ENV
from harness.tiny import fit_mock_data_to_vocab

apply_cpu_patches()

import torch  # noqa: E402
from lightning.pytorch import Callback  # noqa: E402
from nemo.collections.nlp.models.language_modeling.megatron_gpt_model import MegatronGPTModel  # noqa: E402
from nemo.collections.nlp.parts.megatron_trainer_builder import MegatronTrainerBuilder  # noqa: E402
from nemo.collections.nlp.parts.nlp_overrides import NLPSaveRestoreConnector  # noqa: E402
from nemo.core.config import hydra_runner  # noqa: E402
from nemo.utils.exp_manager import exp_manager  # noqa: E402

_VOCAB_PARAMS = ("model.embedding.word_embeddings.weight", "model.output_layer.weight")


class Probe(Callback):
    """Records each rank's vocab tables at train start and the loss of every step."""

    def __init__(self, path: Path):
        self.path = path
        self.record: dict[str, Any] = {"losses": []}

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        state = pl_module.state_dict()
        self.record["start"] = {k: state[k].detach().clone() for k in _VOCAB_PARAMS if k in state}
        self.record["padded_vocab_size"] = int(pl_module.padded_vocab_size)
        self.record["tokenizer_vocab_size"] = int(pl_module.tokenizer.vocab_size)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.record["losses"].append(float(loss))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        torch.save(self.record, f"{self.path}.rank{rank}")


@hydra_runner(config_path="conf", config_name="megatron_gpt_config")
def main(cfg: Any) -> None:
    init_cpu_process_group(int(cfg.model.get("tensor_model_parallel_size", 1)))
    trainer = MegatronTrainerBuilder(cfg).create_trainer()
    exp_manager(trainer, cfg.exp_manager)
    if os.environ.get(PROBE_ENV):
        trainer.callbacks.append(Probe(Path(os.environ[PROBE_ENV])))

    if cfg.model.get("restore_from_path") is not None:
        from nemo.collections.nlp.models.language_modeling.megatron_gpt_sft_model import MegatronGPTSFTModel

        model_cfg = MegatronGPTSFTModel.merge_cfg_with(cfg.model.restore_from_path, cfg)
        model = MegatronGPTModel.restore_from(
            restore_path=cfg.model.restore_from_path,
            override_config_path=model_cfg,
            trainer=trainer,
            save_restore_connector=NLPSaveRestoreConnector(),
        )
    elif cfg.model.get("restore_from_ckpt") is not None:
        trainer.ckpt_path = Path(cfg.model.restore_from_ckpt)
        model = MegatronGPTModel(cfg.model, trainer)
    else:
        model = MegatronGPTModel(cfg.model, trainer)

    if cfg.model.data.get("data_impl") == "mock":
        fit_mock_data_to_vocab(model.tokenizer.vocab_size)  # megatron's mock ids reach 4095
    trainer.fit(model)


if __name__ == "__main__":
    main()
