"""Hydra discovers this package at start-up in every ``hydra_runner`` script, NeMo's stock ones included.

It exposes the presets in ``conf_overrides`` (``+vocab_extension@model.vocab_extension=fvt``) and,
when the script has already imported NeMo's NLP collection, installs the ``model.vocab_extension``
restore hook. It never imports NeMo itself, so unrelated Hydra apps pay nothing.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

_NEMO_MODULE = "nemo.collections.nlp.parts.nlp_overrides"


def presets_location() -> str:
    """The presets as the package ``nemo_vocab_ext.conf_overrides`` (a wheel, or an editable install in
    setuptools' default and strict modes), else the checkout's folder: setuptools' ``compat`` editable mode and a
    checkout on ``PYTHONPATH`` only put the checkout on ``sys.path``, where the presets are ``conf_overrides/``."""
    if importlib.util.find_spec("nemo_vocab_ext.conf_overrides") is not None:
        return "pkg://nemo_vocab_ext.conf_overrides"
    spec = importlib.util.find_spec("nemo_vocab_ext")
    assert spec is not None and spec.origin is not None
    return "file://" + str(Path(spec.origin).parents[1] / "conf_overrides")


class NemoVocabExtSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="nemo_vocab_ext", path=presets_location())
        if _NEMO_MODULE in sys.modules:
            from nemo_vocab_ext.nemo_plugin import install

            install()
