"""The wheel ships the plugin and its library: only the plugin's own modules touch NeMo, none of the test harness."""

from __future__ import annotations

import ast
import sys
import zipfile
from pathlib import Path

from test_install_modes import OFFLINE, PIP, PROJECT, copy_checkout, run

NEMO_STACK = {"nemo", "megatron", "lightning", "apex", "transformer_engine"}
PLUGIN_MODULES = {"nemo_vocab_ext/nemo_plugin.py", "nemo_vocab_ext/model.py"}


def imported_top_names(source: bytes) -> set[str]:
    """Every absolute import's top-level name, at module level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_plugin_modules_of_the_wheel_touch_nemo(tmp_path: Path) -> None:
    source = copy_checkout(tmp_path / "src")
    dist = tmp_path / "dist"
    run([sys.executable, *PIP, "wheel", *OFFLINE, "--no-build-isolation", "-w", str(dist), str(source)], tmp_path)
    (wheel,) = dist.glob(f"{PROJECT}-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        modules = {name: archive.read(name) for name in archive.namelist() if name.endswith(".py")}
    assert {name.split("/")[0] for name in modules} == {PROJECT, "hydra_plugins"}
    touching = {name for name, text in modules.items() if imported_top_names(text) & NEMO_STACK}
    assert touching == PLUGIN_MODULES
