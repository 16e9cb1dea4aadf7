#!/usr/bin/env bash
# The README's test command: a fresh virtualenv, the CPU build of torch, pullgeom with its
# C++ extension and every optional extra, then the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0 setuptools wheel ninja
# --no-build-isolation: the extension must be compiled against the torch installed above.
.venv/bin/pip install -q --no-build-isolation ".[dev,triton]"
# Real MNIST for the tests that read it (beside the checkout on the project's machines).
if [ -z "${PULLGEOM_DATA_DIR:-}" ] && [ -d ../shared/data/mnist ]; then
  export PULLGEOM_DATA_DIR="$(cd ../shared/data/mnist && pwd)"
fi
# Run from outside the source tree so the tests import the installed package and its extension.
cd tests && ../.venv/bin/python -m pytest -q "$@"
