#!/usr/bin/env bash
# Create .venv (once) and install the package with the tested NeMo stack, the way users install it.
# The constraints file pins torch to the CPU build: an unpinned torch anywhere in the tree would
# pull a multi-GB CUDA wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/pip install -q -U pip setuptools wheel
fi
.venv/bin/pip install -q -c constraints.txt -e '.[nemo,test]'
