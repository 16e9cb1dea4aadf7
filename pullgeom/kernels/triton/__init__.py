"""Triton kernels, one file per op; each registers ``torch.ops.pullgeom.triton_<op>``.

- ``scaled_matmul``: one step of the reverse layer chain, (rows * D) @ W, batched.
- ``plan_gram``: the fused plan-to-Gram of an MLP layer plan (MATH.md 2).
- ``jacobi_eigh``: all eigenpairs of many small symmetric matrices, one per program.
- ``lanczos``: top-k eigenpairs of many small symmetric matrices by Lanczos with full
  reorthogonalisation and restart on breakdown, one per program.

Importing this package defines no kernel: the op modules are imported on first use
(``load_ops``), so ``pullgeom`` imports without Triton and the interpreter switch
``TRITON_INTERPRET=1`` is read when the kernels are defined (Triton reads it in ``triton.jit``),
not when pullgeom is imported.
Under the interpreter the kernels run on CPU tensors (slowly); that is how CI tests them.
"""

from __future__ import annotations

import functools
import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as error:  # absent, or present but broken (e.g. built for another torch)
        return f"triton cannot be imported ({error}); pip install triton"
    return None


def unavailable_reason(device: torch.device) -> str | None:
    """None if the Triton ops can run on ``device`` here, else why not."""
    reason = _import_error()
    if reason is not None:
        return reason
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreting():
        return None
    return (f"Triton kernels need a CUDA device, got {device.type} "
            "(set TRITON_INTERPRET=1 to run them on CPU tensors in Triton's slow interpreter)")


def load_ops() -> None:
    """Define the kernels and register the ``torch.ops.pullgeom.triton_*`` ops (idempotent)."""
    from pullgeom.kernels.triton import jacobi_eigh, lanczos, plan_gram, scaled_matmul  # noqa: F401
