"""Define pullgeom's Triton kernels for the test modules, in the interpreter when there is no GPU.

TRITON_INTERPRET=1 is set only while the kernels are defined (Triton reads it then), so other
test modules' ``auto`` backend choices are unchanged.
"""

from __future__ import annotations

import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRET = DEVICE == "cpu"


def load_triton_ops() -> None:
    from pullgeom.kernels.triton import load_ops

    previous = os.environ.get("TRITON_INTERPRET")
    if INTERPRET:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        load_ops()
    finally:
        if INTERPRET:
            if previous is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = previous
