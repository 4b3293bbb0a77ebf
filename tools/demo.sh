#!/usr/bin/env bash
# The README's main job in one command: set up .venv (tools/setup_env.sh), then run the whole
# localization workflow on its embedded default (tools/demo.py; arguments are passed through,
# a relative --workdir is taken from the current folder, default ./demo_run).
#   bash tools/demo.sh [--workdir DIR] [--steps N] [--continual-steps N] [--seed N]
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
bash "$repo/tools/setup_env.sh"
exec "$repo/.venv/bin/python" "$repo/tools/demo.py" "$@"
