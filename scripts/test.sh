#!/usr/bin/env bash
# The README's test command: a fresh virtualenv, the CPU build of torch, pullgeom with its
# C++ extension and the optional extras the tests need (dev, triton, vaes), then the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
torch_version=2.13.0
.venv/bin/pip install -q "torch==$torch_version" setuptools wheel ninja
# Nothing an extra pulls in (diffusers and pythae of the vaes extra) may move torch off that build.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==$torch_version" > "$constraints"
# --no-build-isolation: the extension must be compiled against the torch installed above.
.venv/bin/pip install -q --no-build-isolation -c "$constraints" ".[dev,triton,vaes]"
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
