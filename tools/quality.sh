#!/usr/bin/env bash
# The README's init-quality experiment in one command: set up .venv (tools/setup_env.sh), then run
# tools/quality.py on one CPU thread (arguments are passed through; default workdir ./quality_run).
# About half an hour; writes quality_run/quality.json, measured.json and quality.png; exits 1 when the
# product's default init misses the targets (see README "Which init: measured").
#   bash tools/quality.sh [--workdir DIR] [--bases 1,2,3] [--base-steps N] [--steps N] [--publish]
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
bash "$repo/tools/setup_env.sh"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 RAYON_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
exec "$repo/.venv/bin/python" "$repo/tools/quality.py" "$@"
