#!/usr/bin/env bash
# The README's test command: a fresh virtualenv, the CPU build of torch, pullgeom with its
# C++ extension and every optional extra, then the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0 setuptools wheel ninja
# --no-build-isolation: the extension must be compiled against the torch installed above.
.venv/bin/pip install -q --no-build-isolation ".[dev,triton]"
# Triton 3.6, what the GPU machines ship, beside the newest one: tests/test_triton_sm90_compile.py
# compiles every Triton kernel for sm_90 against both (a float64 tl.dot compiled on one only).
.venv/bin/pip install -q --target .triton36 triton==3.6.0 --no-deps
export PULLGEOM_TRITON36_PATH="$(pwd)/.triton36"
# Real MNIST for the tests that read it (beside the checkout on the project's machines).
if [ -z "${PULLGEOM_DATA_DIR:-}" ] && [ -d ../shared/data/mnist ]; then
  export PULLGEOM_DATA_DIR="$(cd ../shared/data/mnist && pwd)"
fi
# Run from outside the source tree so the tests import the installed package and its extension.
cd tests && ../.venv/bin/python -m pytest -q "$@"
