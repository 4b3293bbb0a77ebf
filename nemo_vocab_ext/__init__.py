"""Grow a pretrained Megatron GPT's vocabulary correctly: a NeMo plugin (``+model.vocab_extension``)
and a checkpoint tool (``nemo-vocab-ext``) for .nemo, .ckpt and safetensors.

The core (``nemo_vocab_ext.core``) imports neither NeMo nor files; only ``nemo_plugin`` and ``model``
touch NeMo, and neither is imported here.
"""

__version__ = "0.1.0"
