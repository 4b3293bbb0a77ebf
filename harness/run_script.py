"""Run an unmodified NeMo example script on a CPU: ``python -m harness.run_script SCRIPT [overrides]``.

Applies the CPU patches, creates the process group when the stock script builds its trainer (NeMo
only does that at ``fit()``, after megatron-core already needs it), keeps megatron's mock data
inside a tiny vocabulary, then executes SCRIPT as ``__main__``. Tests and demos only.
"""

from __future__ import annotations

import runpy
import sys
from typing import Any

MOCK_DATA_MAX_ID = 256  # below any test tokenizer's size


def _prepare() -> None:
    from harness.cpu_nemo import apply_cpu_patches, init_cpu_process_group

    apply_cpu_patches()
    from nemo.collections.nlp.parts.megatron_trainer_builder import MegatronTrainerBuilder

    from harness.tiny import fit_mock_data_to_vocab

    create_trainer = MegatronTrainerBuilder.create_trainer

    def create_trainer_with_group(self: Any, *args: Any, **kwargs: Any) -> Any:
        trainer = create_trainer(self, *args, **kwargs)
        init_cpu_process_group(int(self.cfg.model.get("tensor_model_parallel_size", 1)))
        return trainer

    MegatronTrainerBuilder.create_trainer = create_trainer_with_group  # type: ignore[method-assign]
    fit_mock_data_to_vocab(MOCK_DATA_MAX_ID)


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m harness.run_script SCRIPT [hydra overrides]")
    script = sys.argv[1]
    sys.argv = sys.argv[1:]  # the script sees its own name and overrides, as when run directly
    _prepare()
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":  # save_to's spawned writer re-imports this module: it must not rerun the script
    main()
