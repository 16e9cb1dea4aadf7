"""Backend registry: every way pullgeom can compute a spectrum, and how ``auto`` picks one.

``AUTO_ORDER`` lists backends in preference order (cuda > triton > cpp > torch > autograd);
``backend="auto"`` measures the ones that are available on the input's device and support the
encoder, once per problem signature, and keeps the fastest (``pullgeom.backends.autotune``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pullgeom.backends import autotune
from pullgeom.backends.autograd_backend import AutogradBackend
from pullgeom.backends.base import Backend, Problem
from pullgeom.backends.lanczos_backend import LanczosBackend, prefer_lanczos
from pullgeom.backends.torch_backend import TorchChainBackend
from pullgeom.backends.cpp_cuda_backends import CPP, CUDA
from pullgeom.backends.triton_backend import TritonBackend

REGISTRY: dict[str, Backend] = {}
AUTO_ORDER: list[str] = []


def register(backend: Backend, auto_rank: int | None = None) -> None:
    """Add a backend; ``auto_rank`` is its place in ``auto``'s preference (0 = first)."""
    REGISTRY[backend.name] = backend
    if auto_rank is not None:
        AUTO_ORDER.insert(min(auto_rank, len(AUTO_ORDER)), backend.name)


register(TorchChainBackend(), auto_rank=0)
register(AutogradBackend(), auto_rank=1)
register(CPP, auto_rank=0)
register(CUDA, auto_rank=0)
# Triton goes just ahead of the first plain-CPU backend present (cpp, else torch), so auto's order
# is cuda > triton > cpp > torch > autograd whichever native backends are registered before it.
register(TritonBackend(), auto_rank=AUTO_ORDER.index("cpp" if "cpp" in AUTO_ORDER else "torch"))
# Not in AUTO_ORDER: auto reaches it for encoders without a layer plan, through its cost model.
register(LanczosBackend())
# What auto runs when it picks Lanczos: the whole spectrum, as every other auto path gives.
WHOLE_SPECTRUM_LANCZOS = LanczosBackend(whole_spectrum=True)


@dataclass(frozen=True)
class BackendInfo:
    name: str
    available: bool
    reason: str  # why not available here; "" when it is


def backend_infos(device: torch.device | str = "cpu") -> list[BackendInfo]:
    """Every registered backend with whether it can run on ``device`` here, and why not."""
    device = torch.device(device)
    infos = []
    for name, backend in REGISTRY.items():
        reason = backend.unavailable_reason(device)
        infos.append(BackendInfo(name, reason is None, reason or ""))
    return infos


def choose_backend(requested: str, problem: Problem, device: torch.device) -> Backend:
    """The backend to run: the requested one (or a clear error), or auto's first fit."""
    if requested == "auto":
        if problem.plan is None and prefer_lanczos(problem, device):
            return WHOLE_SPECTRUM_LANCZOS
        # Triton on a CPU tensor means its interpreter, a test aid, never the fast path.
        eligible = [REGISTRY[name] for name in AUTO_ORDER
                    if REGISTRY[name].unavailable_reason(device) is None
                    and REGISTRY[name].unsupported_reason(problem) is None
                    and not (name == "triton" and device.type != "cuda")]
        if not eligible:
            raise AssertionError("the autograd backend serves every differentiable encoder")
        # autograd is the fallback: where a layer-plan backend serves, it does ~3x fewer FLOPs
        # (MATH.md 2), so timing autograd too would only add its cost to the first call.
        if len(eligible) > 1:
            eligible = [backend for backend in eligible if backend.name != "autograd"]
        return autotune.fastest(eligible, problem, device) if autotune.autotune_enabled() else eligible[0]
    if requested not in REGISTRY:
        raise ValueError(f"backend={requested!r} is unknown; choose 'auto' or one of {sorted(REGISTRY)}")
    backend = REGISTRY[requested]
    reason = backend.unavailable_reason(device) or backend.unsupported_reason(problem)
    if reason is not None:
        raise ValueError(f"backend {requested!r} cannot serve this call: {reason}. "
                         "Use backend='auto' to pick one that can.")
    return backend


__all__ = ["Backend", "BackendInfo", "Problem", "REGISTRY", "AUTO_ORDER", "backend_infos",
           "choose_backend", "register"]
