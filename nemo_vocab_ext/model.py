"""``VocabExtensionGPTModel``: MegatronGPTModel whose ``restore_from`` applies ``model.vocab_extension``.

Importing this module imports NeMo. The stock scripts need no import: the Hydra plugin installs
the same hook on NeMo's restore path.
"""

from __future__ import annotations

from typing import Any

from nemo.collections.nlp.models.language_modeling.megatron_gpt_model import MegatronGPTModel
from nemo.collections.nlp.parts.nlp_overrides import NLPSaveRestoreConnector

from .nemo_plugin import install


class VocabExtensionGPTModel(MegatronGPTModel):  # type: ignore[misc]
    """Restores a GPT whose tokenizer outgrew its embedding, resized as ``vocab_extension`` says."""

    @classmethod
    def restore_from(  # type: ignore[override]
        cls, restore_path: str, override_config_path: Any = None, *args: Any, **kwargs: Any
    ) -> Any:
        install()
        if kwargs.get("save_restore_connector") is None:
            kwargs["save_restore_connector"] = NLPSaveRestoreConnector()
        return super().restore_from(restore_path, override_config_path, *args, **kwargs)
