#!/usr/bin/env bash
# The README's init-quality experiment in one command: set up .venv (tools/setup_env.sh), then run
# tools/quality.py (arguments are passed through; default workdir ./quality_run). About 15 minutes
# on 2 CPU cores; writes quality_run/quality.json and quality_run/quality.png.
#   bash tools/quality.sh [--workdir DIR] [--inits zeros,mean,...] [--seeds 1,2] [--steps N]
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
bash "$repo/tools/setup_env.sh"
exec "$repo/.venv/bin/python" "$repo/tools/quality.py" "$@"
