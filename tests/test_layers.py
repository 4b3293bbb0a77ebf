"""The package's layers import only downward (``.importlinter``): core, then the entries and the
checkpoint, the formats, the library (vocab, io, validate, describe), the resize pipeline, and the
entry points (the CLI and the NeMo plugin)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def test_no_module_imports_a_layer_above_its_own() -> None:
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint is None:
        pytest.skip("import-linter is not installed")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([lint], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
