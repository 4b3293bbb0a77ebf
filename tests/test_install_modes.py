"""Hydra finds the plugin and its presets however the package is installed, with nothing downloaded.

Each way (a wheel, ``pip install .``, ``pip install -e .`` in setuptools' default and every named
editable mode) installs a copy of the checkout into a scratch venv that reuses this test venv's
packages, but not this venv's own install of the project. Hydra itself must then list the plugin
and compose the presets; for the default editable mode and the wheel, NeMo's stock call sequence
must extend a checkpoint through it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from conftest import BASE_VOCAB, LARGER_VOCAB

from harness.runs import PROBE_ENV, write_pretraining_config

REPO = Path(__file__).parents[1]
PROJECT = "nemo_vocab_ext"
EDITABLE = ["--no-build-isolation", "-e"]
INSTALLS: dict[str, list[str] | None] = {
    "wheel": None,  # `pip wheel`, then the wheel installed
    "regular": ["--no-build-isolation"],
    "editable": EDITABLE,  # setuptools' default mode: what `pip install -e .` does
    "lenient": ["--config-settings", "editable_mode=lenient", *EDITABLE],
    "strict": ["--config-settings", "editable_mode=strict", *EDITABLE],
    "compat": ["--config-settings", "editable_mode=compat", *EDITABLE],
}
PIP = ["-m", "pip", "-q", "--no-input", "--disable-pip-version-check", "--no-cache-dir"]
OFFLINE = ["--no-deps", "--no-index"]
EMBEDDING = "model.embedding.word_embeddings.weight"

# Composes the presets and says which plugin module Hydra loaded; no NeMo, so it starts in a second.
HYDRA_APP = """
import json, sys
import hydra
from omegaconf import OmegaConf

@hydra.main(version_base=None)
def main(cfg):
    plugin = sys.modules.get("hydra_plugins.nemo_vocab_ext_plugin")
    print(json.dumps({"cfg": OmegaConf.to_container(cfg), "plugin": getattr(plugin, "__file__", None)}))

main()
"""


def clean_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """No PYTHONPATH (a checkout on it would hide the install under test), no user pip config."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def run(argv: list[str], cwd: Path) -> str:
    done = subprocess.run(argv, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{argv} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def is_project_entry(name: str) -> bool:
    """The project's files in a site-packages: package, dist-info, editable .pth and finder."""
    return PROJECT in name.lower().replace("-", "_").replace(".", "_")


def link_packages(source: Path, view: Path) -> None:
    """Link every entry of ``source`` into ``view`` except this project's (inside ``hydra_plugins`` too)."""
    view.mkdir(exist_ok=True)
    for entry in source.iterdir():
        if is_project_entry(entry.name) or (view / entry.name).exists():
            continue
        if entry.name == "hydra_plugins" and entry.is_dir():
            link_packages(entry, view / entry.name)
        else:
            (view / entry.name).symlink_to(entry)


def copy_checkout(dest: Path) -> Path:
    """The tracked files only, so that build/ and egg-info land in the copy, never in the checkout."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in files.decode().split("\0"):
        if name and (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def install(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``install(way) -> python``: the project installed that way into a fresh scratch venv, once per way."""
    if not (REPO / ".git").exists():
        pytest.skip("needs a git checkout of the project (the tracked files are what gets installed)")
    root = tmp_path_factory.mktemp("installs")
    view = root / "test-venv-packages"
    for path in dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib")):
        link_packages(Path(path), view)
    pythons: dict[str, Path] = {}

    def install_as(way: str) -> Path:
        if way in pythons:
            return pythons[way]
        folder = root / way
        venv = folder / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
        python = venv / "bin" / "python"
        purelib = run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], folder).strip()
        # addsitedir, not a plain path: the linked packages' own .pth files must run too.
        (Path(purelib) / "test_venv_packages.pth").write_text(f"import site; site.addsitedir({str(view)!r})\n")
        source = copy_checkout(folder / "src")
        options = INSTALLS[way]
        if options is None:
            dist = folder / "dist"
            run([str(python), *PIP, "wheel", *OFFLINE, "--no-build-isolation", "-w", str(dist), str(source)], folder)
            (wheel,) = dist.glob(f"{PROJECT}-*.whl")
            run([str(python), *PIP, "install", *OFFLINE, str(wheel)], folder)
        else:
            run([str(python), *PIP, "install", *OFFLINE, *options, str(source)], folder)
        pythons[way] = python
        return python

    return install_as


@pytest.mark.parametrize("way", INSTALLS)
def test_hydra_finds_the_plugin_and_its_presets(way: str, install: Callable[[str], Path], tmp_path: Path) -> None:
    python = str(install(way))
    app = tmp_path / "app.py"
    app.write_text(HYDRA_APP)
    listed = run([python, str(app), "--info", "plugins"], tmp_path)
    assert "NemoVocabExtSearchPathPlugin" in listed, listed
    composed = json.loads(
        run([python, str(app), "+vocab_extension@model.vocab_extension=fvt", "+platform=cpu"], tmp_path)
    )
    assert composed["cfg"]["model"]["vocab_extension"]["init"] == "fvt"
    assert composed["cfg"]["trainer"]["accelerator"] == "cpu"
    assert not Path(composed["plugin"]).is_relative_to(REPO), composed["plugin"]  # the install's, not the checkout's


@pytest.fixture(scope="module")
def stock_runs(
    install: Callable[[str], Path],
    tmp_path_factory: pytest.TempPathFactory,
    nemo_tied_dist: Path,
    base_tokenizer: Path,
    larger_tokenizer: Path,
    nemo_env: dict[str, str],
) -> Iterator[dict[str, tuple[Path, int]]]:
    """The stock sequence with a preset, from the default editable install and from the wheel, side by side."""
    root = tmp_path_factory.mktemp("stock_runs")
    env = clean_env(dict(nemo_env, **{PROBE_ENV: "probe.pt"}))
    harness_only = root / "harness_only"  # the checkout's harness (no install ships it), not its project
    harness_only.mkdir()
    (harness_only / "harness").symlink_to(REPO / "harness")
    env["PYTHONPATH"] = str(harness_only)
    procs = {}
    for way in ("editable", "wheel"):
        folder = root / way
        config = write_pretraining_config(
            folder / "conf" / "gpt.yaml", base_tokenizer, exp_dir=folder / "exp", max_steps=1, save_nemo=False
        )
        argv = [
            str(install(way)), "-m", "harness.stock_pretraining",
            f"--config-path={config.parent}", f"--config-name={config.stem}",
            f"model.restore_from_path={nemo_tied_dist}",
            f"model.tokenizer.vocab_file={larger_tokenizer}/vocab.json",
            f"model.tokenizer.merge_file={larger_tokenizer}/merges.txt",
            "+vocab_extension@model.vocab_extension=mean",
        ]  # fmt: skip
        with open(folder / "run.log", "wb") as log:
            procs[way] = (folder, subprocess.Popen(argv, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        yield {way: (folder, proc.wait(timeout=600)) for way, (folder, proc) in procs.items()}
    finally:
        for _, proc in procs.values():
            proc.kill()


@pytest.mark.nemo
@pytest.mark.parametrize("way", ["editable", "wheel"])
def test_stock_sequence_extends_through_the_installed_plugin(
    way: str, stock_runs: dict[str, tuple[Path, int]], nemo_tied_dist: Path, saved_state: Callable[[Path], dict]
) -> None:
    folder, returncode = stock_runs[way]
    log = (folder / "run.log").read_text()
    assert returncode == 0, log
    assert "[vocab_extension] plugin loaded" in log
    assert f"[vocab_extension] tokenizer size: {BASE_VOCAB} -> {LARGER_VOCAB}" in log
    start = torch.load(folder / "probe.pt.rank0")["start"][EMBEDDING]
    old = saved_state(nemo_tied_dist)["state_dict"][EMBEDDING]
    assert torch.equal(start[:BASE_VOCAB], old[:BASE_VOCAB])
    assert start[BASE_VOCAB:LARGER_VOCAB].any(dim=1).all()  # stock NeMo leaves them zero
