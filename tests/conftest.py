"""Test-wide setup: Triton kernels run under the interpreter when no GPU is present."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported; it makes Triton kernels run on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")
