#!/usr/bin/env bash
# Set up and run every check CI runs: lint, types, tests (real NeMo on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
.venv/bin/ruff check nemo_vocab_ext hydra_plugins harness tests tools
.venv/bin/ruff format --check nemo_vocab_ext hydra_plugins harness tests tools
.venv/bin/mypy nemo_vocab_ext hydra_plugins harness
# The layers and what may import NeMo (.importlinter); the harness is found in the checkout.
PYTHONPATH=. .venv/bin/lint-imports
# pytest exits 5 when it collects nothing: with `set -e` that fails the run, as it must.
.venv/bin/pytest "$@"
