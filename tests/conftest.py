"""Test-wide setup: Triton kernels run under the interpreter when no GPU is present."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported; it makes Triton kernels run on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seeded_rng():
    """Every test starts from the same torch RNG state, so a CI failure reproduces locally
    (hypothesis tests draw their own varied inputs)."""
    torch.manual_seed(20231124)
