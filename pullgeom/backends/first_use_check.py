"""The safety net of ``backend="auto"``: a native GPU backend is checked before it serves.

The ``cuda`` and ``triton`` kernels run only on GPUs, where no CI sees them. So the first time
``auto`` would run such a backend (``Backend.checked_on_first_use``) for a (device, dtype, layer
plan), it runs it on the call's probe samples beside the ``torch`` backend (the same chain in
plain torch ops, on the same device) and compares the whole nonzero spectrum. A disagreement
beyond ``TOLERANCES`` disables that backend for the process, for that signature, with a warning
that names it; ``auto`` then takes the next one. The check costs two small solves, once.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from pullgeom.backends.autotune import problem_signature
from pullgeom.backends.base import Backend, Problem

# Largest eigenvalue error allowed, relative to lambda_1. The backends agree to a few hundred
# units of round-off (the parity tests hold them to 1e-5 / 1e-10 against float64); a wrong
# kernel is off by O(1). These sit between, so round-off never trips them and a bug always does.
TOLERANCES = {torch.float32: 1e-3, torch.float64: 1e-8}
_VERDICTS: dict[tuple, bool] = {}  # (backend name, problem signature) -> passed


def _disagreement(candidate: Tensor, reference: Tensor) -> float:
    scale = reference[:, :1].abs().clamp_min(torch.finfo(reference.dtype).tiny)
    error = ((candidate - reference).abs() / scale).amax()
    return float("inf") if not torch.isfinite(error) else error.item()


def passes(backend: Backend, reference: Backend, problem: Problem, probe: Tensor) -> bool:
    """Whether ``backend`` agrees with ``reference`` on ``probe: (b, *S)`` (checked once per
    signature; a failure is warned about once and remembered)."""
    key = (backend.name, problem_signature(problem, probe.device))
    if key not in _VERDICTS:
        ours = backend.solve(problem, probe, 1).eigenvalues
        theirs = reference.solve(problem, probe, 1).eigenvalues
        error = _disagreement(ours.to(theirs.dtype), theirs)
        _VERDICTS[key] = error <= TOLERANCES[problem.dtype]
        if not _VERDICTS[key]:
            warnings.warn(
                f"pullgeom: the {backend.name!r} backend disagrees with the plain-torch chain on this "
                f"encoder ({problem.dtype}, {probe.device}): eigenvalues off by {error:.2e} relative to "
                f"lambda_1; it is disabled for this process and backend='auto' uses the next one. "
                "Please report this with the output of pullgeom.list_backends()", RuntimeWarning,
                stacklevel=4)
    return _VERDICTS[key]


def failed(backend: Backend, problem: Problem, device: torch.device) -> bool:
    """Whether ``backend`` already failed its check for this problem's signature on ``device``."""
    return _VERDICTS.get((backend.name, problem_signature(problem, device))) is False
