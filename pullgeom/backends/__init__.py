"""Backend registry: every way pullgeom can compute a spectrum, and how ``auto`` picks one.

``BACKENDS`` lists every backend in ``auto``'s preference order (cuda > triton > cpp > torch >
autograd, then lanczos, which auto reaches only through its cost model, ``lanczos_mode``).
``backend="auto"`` measures the candidates that are available on the input's device and support
the encoder, once per problem signature, and keeps the fastest (``pullgeom.backends.autotune``).
Adding a backend: CONTRIBUTING.md.
"""

from __future__ import annotations

import sys
import types
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from pullgeom.backends import autotune, first_use_check
from pullgeom.backends.autograd_backend import AutogradBackend
from pullgeom.backends.base import Backend, Problem
from pullgeom.backends.cpp_cuda_backends import CPP, CUDA
from pullgeom.backends.lanczos_backend import LanczosBackend, lanczos_mode
from pullgeom.backends.torch_backend import TorchBackend
from pullgeom.backends.triton_backend import TritonBackend

BACKENDS: tuple[Backend, ...] = (CUDA, TritonBackend(), CPP, TorchBackend(), AutogradBackend(),
                                 LanczosBackend())
REGISTRY: dict[str, Backend] = {backend.name: backend for backend in BACKENDS}
# What auto runs when it picks Lanczos (``lanczos_mode``): the whole spectrum, as every other
# auto path gives, or the top k alone where the whole spectrum would cost hours.
WHOLE_SPECTRUM_LANCZOS = LanczosBackend(whole_spectrum=True)
TOP_K_LANCZOS = LanczosBackend()
AUTO_LANCZOS = {"whole spectrum": WHOLE_SPECTRUM_LANCZOS, "top k": TOP_K_LANCZOS}


@dataclass(frozen=True)
class BackendInfo:
    name: str
    available: bool
    reason: str  # why not available here; "" when it is


def list_backends(device: torch.device | str = "cpu") -> list[BackendInfo]:
    """Every registered backend with whether it can run on ``device`` here, and why not."""
    device = torch.device(device)
    infos = []
    for backend in BACKENDS:
        reason = backend.unavailable_reason(device)
        infos.append(BackendInfo(backend.name, reason is None, reason or ""))
    return infos


def traceable_backend_names() -> list[str]:
    """The backends torch.compile(fullgraph=True) can trace through (their ``traceable`` flag)."""
    return [backend.name for backend in BACKENDS if backend.traceable]


def choose_backend(requested: str, problem: Problem, device: torch.device,
                   probe: Tensor | None = None) -> Backend:
    """The backend to run: the requested one (or a clear error), or auto's pick.

    probe: a few of the call's inputs (b, *S), on which ``auto`` checks a native GPU backend
    before its first use (``first_use_check``); pseudo-random inputs when None.
    """
    if requested == "auto":
        mode = lanczos_mode(problem, device) if problem.plan is None else None
        if mode is not None:
            return AUTO_LANCZOS[mode]
        eligible = [backend for backend in BACKENDS
                    if backend.auto_candidate and backend.auto_serves(device)
                    and backend.unavailable_reason(device) is None
                    and backend.unsupported_reason(problem) is None
                    and not first_use_check.failed(backend, problem, device)]
        if not eligible:
            raise AssertionError("the autograd backend serves every differentiable encoder")
        # autograd is the fallback: where a layer-plan backend serves, it does ~3x fewer FLOPs
        # (MATH.md 2), so timing autograd too would only add its cost to the first call.
        if len(eligible) > 1:
            eligible = [backend for backend in eligible if backend.name != "autograd"]
        while True:
            timed = autotune.autotune_enabled()
            chosen = autotune.fastest(eligible, problem, device) if timed else eligible[0]
            if not chosen.checked_on_first_use or first_use_check.passes(
                    chosen, REGISTRY["torch"], problem,
                    probe if probe is not None else autotune.sample_inputs(problem, device)):
                return chosen
            eligible = [backend for backend in eligible if backend is not chosen]
    if requested not in REGISTRY:
        raise ValueError(f"backend={requested!r} is unknown; choose 'auto' or one of {sorted(REGISTRY)}")
    backend = REGISTRY[requested]
    reason = backend.unavailable_reason(device) or backend.unsupported_reason(problem)
    if reason is not None:
        raise ValueError(f"backend {requested!r} cannot serve this call: {reason}. "
                         "Use backend='auto' to pick one that can.")
    return backend


class _CallableModule(types.ModuleType):
    """``pullgeom.backends(device)`` was the function now called ``pullgeom.list_backends``; this
    keeps such calls working, with a DeprecationWarning, for one release."""

    def __call__(self, device: torch.device | str = "cpu") -> list[BackendInfo]:
        warnings.warn("pullgeom.backends() is deprecated and will be removed in the next release; "
                      "call pullgeom.list_backends()", DeprecationWarning, stacklevel=2)
        return list_backends(device)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["BACKENDS", "Backend", "BackendInfo", "Problem", "REGISTRY", "choose_backend", "list_backends",
           "traceable_backend_names"]
