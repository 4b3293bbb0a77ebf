"""Every YAML in conf_overrides parses, and every preset is a valid ``model.vocab_extension``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from nemo_vocab_ext.errors import ConfigError
from nemo_vocab_ext.nemo_plugin import ExtensionSettings, settings_of
from nemo_vocab_ext.options import DEFAULTS

PRESETS = Path(__file__).parents[1] / "conf_overrides"


@pytest.mark.parametrize("preset", sorted((PRESETS / "vocab_extension").glob("*.yaml")), ids=lambda p: p.stem)
def test_vocab_extension_presets_are_valid(preset: Path) -> None:
    settings = ExtensionSettings.from_config(OmegaConf.load(preset))
    assert settings.init == preset.stem  # the file name is the init it selects


def test_cpu_platform_preset_sets_what_nemo_needs_without_a_gpu() -> None:
    cfg = OmegaConf.load(PRESETS / "platform" / "cpu.yaml")
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.precision == 32 and cfg.trainer.gradient_clip_val == 0.0
    assert cfg.model.transformer_engine is False and cfg.model.megatron_amp_O2 is False


def test_settings_defaults_and_errors() -> None:
    assert settings_of(OmegaConf.create({"num_layers": 2})) is None  # no key: the plugin stays inert
    assert settings_of(OmegaConf.create({"vocab_extension": {}})) == ExtensionSettings()
    assert ExtensionSettings().init == "fvt" and ExtensionSettings().padding_init == "mean"
    assert settings_of(OmegaConf.create({"vocab_extension": "fvt"})) == ExtensionSettings(init="fvt")
    with pytest.raises(ConfigError, match="unknown key"):
        settings_of(OmegaConf.create({"vocab_extension": {"inti": "mean"}}))
    with pytest.raises(ConfigError, match="choose one of"):
        settings_of(OmegaConf.create({"vocab_extension": {"padding_init": "fvt"}}))


def test_presets_state_the_product_defaults_besides_their_init() -> None:
    """Each preset documents every key; all but its init are the defaults every entry point uses."""
    defaults = ExtensionSettings()
    for preset in sorted((PRESETS / "vocab_extension").glob("*.yaml")):
        settings = ExtensionSettings.from_config(OmegaConf.load(preset))
        assert replace(settings, init=defaults.init) == defaults, preset.name
    assert (defaults.init, defaults.padding_init, defaults.seed, defaults.allow_shrink) == (
        DEFAULTS.init.value,
        DEFAULTS.padding_init.value,
        DEFAULTS.seed,
        DEFAULTS.allow_shrink,
    )
