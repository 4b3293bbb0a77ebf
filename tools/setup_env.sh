#!/usr/bin/env bash
# Create .venv (once) and install the package with the tested NeMo stack.
# The constraints file pins torch to the CPU build: an unpinned torch anywhere in the tree would
# pull a multi-GB CUDA wheel. `editable_mode=compat` keeps the hydra_plugins namespace package
# visible to Hydra's plugin discovery.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/pip install -q -U pip setuptools wheel
fi
.venv/bin/pip install -q -c constraints.txt --config-settings editable_mode=compat -e '.[nemo,test]'
