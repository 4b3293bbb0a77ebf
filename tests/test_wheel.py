"""The wheel ships the plugin and its library, and none of the test harness (which imports NeMo).

What imports NeMo inside the package is checked by the import contracts (``.importlinter``)."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

from test_install_modes import OFFLINE, PIP, PROJECT, copy_checkout, run


def test_the_wheel_ships_the_package_and_the_plugin_only(tmp_path: Path) -> None:
    source = copy_checkout(tmp_path / "src")
    dist = tmp_path / "dist"
    run([sys.executable, *PIP, "wheel", *OFFLINE, "--no-build-isolation", "-w", str(dist), str(source)], tmp_path)
    (wheel,) = dist.glob(f"{PROJECT}-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    modules = {name.split("/")[0] for name in names if name.endswith(".py")}
    assert modules == {PROJECT, "hydra_plugins"}
    assert f"{PROJECT}/measured/quality.json" in names  # the resize report's measured costs
