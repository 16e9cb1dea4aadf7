"""``backend="auto"`` by measurement: time each eligible backend once, keep the winner.

The first ``auto`` call for a given (device, dtype, input shape, plan signature, stochastic,
sigma) runs every eligible backend on ``AUTOTUNE_BATCH`` pseudo-random inputs of the problem's
shape: one untimed call (first-call costs: kernel JIT, caches), then one timed call (with device
synchronisation). The fastest wins and is cached for the process; ties go to the earlier entry
of ``BACKENDS``. ``PULLGEOM_AUTOTUNE=0`` skips the measurement and takes the first eligible
backend in ``BACKENDS``.
"""

from __future__ import annotations

import os
import time

import torch
from torch import Tensor

from pullgeom.backends.base import Backend, Problem

AUTOTUNE_BATCH = 32
_WINNERS: dict[tuple, str] = {}


def autotune_enabled() -> bool:
    return os.environ.get("PULLGEOM_AUTOTUNE", "1") != "0"


def problem_signature(problem: Problem, device: torch.device) -> tuple:
    """What a backend's speed (and correctness) on ``problem`` depends on: the device, dtype,
    input shape, layer plan (widths and activations; the encoder object without one), heads."""
    plan = problem.plan
    if plan is None:
        model = ("encoder", id(problem.encoder))
    else:
        model = (tuple(plan.widths), plan.latent_dim,
                 tuple((layer.activation, layer.param, layer.threshold) for layer in plan.layers))
    return (device.type, device.index, problem.dtype, problem.input_shape, model, problem.stochastic,
            problem.sigma)


def sample_inputs(problem: Problem, device: torch.device) -> Tensor:
    """``AUTOTUNE_BATCH`` pseudo-random inputs of the problem's shape (seeded: deterministic)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(AUTOTUNE_BATCH, *problem.input_shape, generator=generator, dtype=problem.dtype)
    return x.to(device)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fastest(candidates: list[Backend], problem: Problem, device: torch.device) -> Backend:
    """The fastest of ``candidates`` (all able to serve ``problem`` on ``device``), measured once."""
    if len(candidates) == 1:
        return candidates[0]
    names = tuple(backend.name for backend in candidates)
    key = (*problem_signature(problem, device), names)
    if key not in _WINNERS:
        x = sample_inputs(problem, device)
        timings = []
        for backend in candidates:
            backend.solve(problem, x, 1)
            _synchronize(device)
            start = time.perf_counter()
            backend.solve(problem, x, 1)
            _synchronize(device)
            timings.append(time.perf_counter() - start)
        _WINNERS[key] = names[min(range(len(names)), key=timings.__getitem__)]
    return candidates[names.index(_WINNERS[key])]


def measured_winners() -> dict[tuple, str]:
    """A copy of the cache: signature -> winning backend name."""
    return dict(_WINNERS)
