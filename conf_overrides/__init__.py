"""Hydra presets, installed as ``nemo_vocab_ext.conf_overrides`` and put on Hydra's search path by the plugin."""
