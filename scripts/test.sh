#!/usr/bin/env bash
# The README's test command: a fresh virtualenv, the CPU build of torch, pullgeom with its
# C++ extension and every optional extra, then the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0 setuptools wheel ninja
# --no-build-isolation: the extension must be compiled against the torch installed above.
.venv/bin/pip install -q --no-build-isolation ".[dev,triton]"
# Run from outside the source tree so the tests import the installed package and its extension.
cd tests && ../.venv/bin/python -m pytest -q "$@"
