#!/usr/bin/env bash
# Prove pullgeom's GPU path on an H100/H200 in one command (< 8 minutes, no network):
#   scripts/gpu_check.sh OUTDIR                 build for sm_90, cuda + Triton tests, timings
#   scripts/gpu_check.sh --cpu-dry-run OUTDIR   the steps that need no GPU, at small sizes
# A thin wrapper: scripts/gpu_check.py does the work (its docstring lists the steps). PYTHON picks
# the interpreter (default python3, as on the GPU machine, which has no virtualenv).
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/gpu_check.py" "$@"
