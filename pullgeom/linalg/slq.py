"""Stochastic Lanczos quadrature (SLQ): entropies of G without its full spectrum.

Both entropies of MATH.md 4 are traces of matrix functions, f(0) = 0:

    'trace': S = log t - (1/t) tr(G log G),   t = tr G            (p = lambda / t)
    'max':   S = tr h(G / lambda_1),          h(p) = -p log p      (p = lambda / lambda_1)

Estimator (deflated Hutchinson, the Hutch++ idea with exact eigenvectors instead of a
sketch): the top-m eigenpairs (Y, lambda_1..m) come from ``lanczos_topk`` and enter exactly,
every copy of a repeated eigenvalue included (its probes, ``pullgeom.linalg.lanczos``);
the rest of the spectrum is the operator G' = P G P, P = I - Y Y^T, whose traces are
estimated with Rademacher probes z_j (E z z^T = I): tr f(G') ~ mean_j z_j'^T f(G') z_j',
z_j' = P z_j, each quadratic form by Gauss quadrature on the Lanczos tridiagonal T_j from z_j':
z'^T f(G') z' ~ ||z'||^2 sum_i tau_i^2 f(theta_i) (theta, tau: T_j's eigenvalues and first
eigenvector components). Deflating the top of the spectrum removes the large eigenvalues that
dominate Hutchinson's variance (2 ||f(G)||_F^2 per probe for Gaussian probes).

Errors and what the interval covers:
- Monte Carlo error: the interval is mean +- t_{n-1} * std / sqrt(n) over the probes (for
  'trace' through the delta method on (t, tr G log G) jointly). This is what ``low``/``high``
  report, at ``confidence``.
- Quadrature error: zero once ``steps`` >= rank(G') + 1 (the Krylov space is then invariant
  and Gauss quadrature is exact for every f; the default takes that many steps when r is at
  most 64); otherwise a bias not covered by the interval, small for the smooth part of f.
- For 'max', ``tail_bounds`` bracket the tail's contribution sum_{i>m} h(p_i) for *any* tail
  spectrum with the estimated tail mass P = tr(G') / lambda_1, at most ``r - m`` eigenvalues,
  each <= lambda_m: h is concave with h(0) = 0, so the sum is largest when the mass is
  spread evenly ((r - m) h(P / (r - m)), Jensen) and smallest when it is packed into
  eigenvalues equal to lambda_m (q h(p_m) + h(P - q p_m), q = floor(P / p_m): a vertex of
  the feasible set). These bounds hold whatever the quadrature does; they inherit only P's
  Monte Carlo error.
- Repeated eigenvalues: lambda_1 (the 'max' normaliser) is right even where Lanczos misses a
  copy of it (the copy has the same value); what a missed copy breaks is the deflated top m (a
  tail eigenvalue in its place) and the tail bounds' premise (every tail eigenvalue <=
  lambda_m), the copy, not projected out, landing in the probes' tail. Hence the probes in
  ``lanczos_topk``; tests/test_lanczos_multiplicity.py checks SLQ with multiplicities 2-4
  against the exact entropy, both norms, both precisions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from pullgeom.linalg.lanczos import BlockLanczos, Matvec, lanczos_topk
from pullgeom.spectral_scores import check_entropy_norm


@dataclass
class EntropyEstimate:
    """SLQ estimate of the von Neumann entropy of G(x) per sample.

    estimate, low, high: (B,) the estimate and its ``confidence`` interval (Monte Carlo);
    top_eigenvalues: (B, m) the deflated, exactly computed top eigenvalues; trace, trace_low,
    trace_high: (B,) estimate and interval of tr G; tail_bounds: (B, 2) for 'max' (lower,
    upper bound of the tail's entropy contribution given the tail-mass estimate), None for
    'trace'. probes, steps: what was spent per sample. Deterministic for a given ``seed``.
    """

    estimate: Tensor
    low: Tensor
    high: Tensor
    entropy_norm: str
    top_eigenvalues: Tensor
    trace: Tensor
    trace_low: Tensor
    trace_high: Tensor
    tail_bounds: Tensor | None
    probes: int
    steps: int
    confidence: float


def student_t_quantile(confidence: float, dof: int) -> float:
    """Two-sided Student-t critical value, t_{(1 + confidence) / 2, dof}.

    Cornish-Fisher expansion around the normal quantile (Abramowitz & Stegun 26.7.5), checked
    against scipy: within 3e-3 of the exact value for dof >= 9 at 90-99% confidence (0.02 low
    at dof = 5, 99%), ample for an interval; keeps scipy out of the dependencies.
    """
    level = torch.tensor(0.5 + confidence / 2, dtype=torch.float64)
    z = torch.distributions.Normal(0.0, 1.0).icdf(level).item()
    nu = max(dof, 1)
    return (z + (z ** 3 + z) / (4 * nu) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * nu ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * nu ** 3))


def quadrature_nodes(matvec: Matvec, probes: Tensor, steps: int, *, breakdown_tol: float | None = None,
                     probe_chunk: int = 4) -> tuple[Tensor, Tensor]:
    """Gauss quadrature of every probe's spectral measure.

    probes: (B, N, p), probe j of sample i in ``probes[i, :, j]``; matvec as in
    ``pullgeom.linalg.lanczos``. Returns nodes (B, p, s) and weights (B, p, s), float64, with
    z_j^T f(G) z_j ~ sum_i weights[.., j, i] f(nodes[.., j, i]) (weights include ||z_j||^2;
    s = steps). Each probe runs its own single-vector Lanczos (full reorthogonalisation, no
    restarts: a breakdown means its quadrature is already exact); ``probe_chunk`` probes per
    sample run at once, which bounds the basis to B * probe_chunk * N * steps floats.
    """
    batch, n, count = probes.shape
    nodes, weights = [], []
    for first in range(0, count, probe_chunk):
        chunk = probes[:, :, first:first + probe_chunk]
        width = chunk.shape[2]

        def per_probe(vectors: Tensor, rows: Tensor, width: int = width) -> Tensor:
            # rows index (sample, probe) pairs, sample-major; the operator wants whole samples.
            samples, columns = rows // width, rows % width
            present = torch.unique(samples)
            full = vectors.new_zeros(batch, n, width)
            full[samples, :, columns] = vectors[:, :, 0]
            image = torch.zeros_like(full)
            image[present] = matvec(full[present], present)
            return image[samples, :, columns].unsqueeze(-1)

        start = chunk.permute(0, 2, 1).reshape(batch * width, n, 1)
        norms = start.norm(dim=1).squeeze(-1).double()
        process = BlockLanczos(per_probe, start, breakdown_tol=breakdown_tol, restart=False)
        for _ in range(steps):
            if not process.active.any():
                break
            process.step()
        values, vectors = torch.linalg.eigh(process.tridiagonal[:, : process.used, : process.used])
        weight = vectors[:, 0, :] ** 2 * (norms ** 2).unsqueeze(-1)
        size = process.used
        nodes.append(values.reshape(batch, width, size))
        weights.append(weight.reshape(batch, width, size))
    size = max(node.shape[2] for node in nodes)
    pad = [(0, size - node.shape[2]) for node in nodes]
    # Zero-weight padding: chunks that stopped early (all probes broke down) have fewer nodes.
    nodes = torch.cat([torch.nn.functional.pad(node, p) for node, p in zip(nodes, pad, strict=True)], dim=1)
    weights = torch.cat([torch.nn.functional.pad(w, p) for w, p in zip(weights, pad, strict=True)], dim=1)
    return nodes, weights


def _x_log_x(values: Tensor) -> Tensor:
    positive = values > 0
    return torch.where(positive, values * torch.log(torch.where(positive, values, torch.ones_like(values))),
                       torch.zeros_like(values))


def tail_entropy_bounds(tail_mass: Tensor, p_m: Tensor, count: int) -> Tensor:
    """Bounds on sum h(p_i) over at most ``count`` values in [0, p_m] summing to ``tail_mass``: (B, 2)."""
    mass = tail_mass.clamp_min(0)
    if count <= 0:
        zero = torch.zeros_like(mass)
        return torch.stack([zero, zero], dim=1)
    cap = p_m.clamp_min(torch.finfo(mass.dtype).tiny)
    mass = torch.minimum(mass, count * cap)
    full = torch.floor(mass / cap)
    lower = -full * _x_log_x(cap) - _x_log_x(mass - full * cap)
    upper = -count * _x_log_x(mass / count)
    return torch.stack([lower, upper], dim=1)


def entropy_from_operator(matvec: Matvec, batch: int, n: int, rank: int, *, entropy_norm: str = "trace",
                          dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                          probes: int = 30, steps: int | None = None, deflate: int | None = None,
                          confidence: float = 0.95, tol: float = 1e-5, seed: int = 0,
                          probe_chunk: int = 4) -> EntropyEstimate:
    """SLQ entropy of a batch of PSD operators of rank <= ``rank`` on R^n (see the module doc).

    deflate: m, eigenpairs computed exactly first (default min(rank, 16)); steps: Lanczos
    steps per probe (default rank - m + 1 when that is <= 64, else 40); probes: >= 2.
    """
    check_entropy_norm(entropy_norm)
    if probes < 2:
        raise ValueError(f"probes={probes}: an interval needs at least 2 probes")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence} must be in (0, 1)")
    device = torch.device(device)
    m = min(rank, 16) if deflate is None else min(deflate, rank)
    tail_rank = rank - m
    steps = (tail_rank + 1 if tail_rank + 1 <= 64 else 40) if steps is None else steps
    generator = torch.Generator(device=device).manual_seed(seed)
    if m > 0:
        start = torch.randn(batch, n, 1, dtype=dtype, device=device, generator=generator)
        top = lanczos_topk(matvec, start, m, tol=tol, max_steps=2 * (rank + 1) + 2, generator=generator,
                           explicit_residuals=False)
        top_values, basis = top.eigenvalues.double(), top.eigenvectors
    else:
        top_values = torch.zeros(batch, 0, dtype=torch.float64, device=device)
        basis = torch.zeros(batch, n, 0, dtype=dtype, device=device)

    def project(vectors: Tensor, index: Tensor) -> Tensor:
        y = basis[index]
        return vectors - y @ (y.transpose(1, 2) @ vectors)

    def deflated(vectors: Tensor, index: Tensor) -> Tensor:
        return project(matvec(project(vectors, index), index), index)

    signs = torch.randint(0, 2, (batch, n, probes), generator=generator, device=device).to(dtype) * 2 - 1
    everyone = torch.arange(batch, device=device)
    nodes, weights = quadrature_nodes(deflated, project(signs, everyone), steps, probe_chunk=probe_chunk)
    nodes = nodes.clamp_min(0)
    tiny = torch.finfo(torch.float64).tiny
    lam1 = top_values[:, :1].clamp_min(tiny) if m else nodes.amax(dim=(1, 2))[:, None].clamp_min(tiny)
    tail_trace = (weights * nodes).sum(dim=2)  # (B, probes), per-probe tr G' estimates
    t_crit = student_t_quantile(confidence, probes - 1)

    def mean_and_half_width(samples: Tensor) -> tuple[Tensor, Tensor]:
        return samples.mean(dim=1), t_crit * samples.std(dim=1) / math.sqrt(probes)

    tail_mean, tail_half = mean_and_half_width(tail_trace)
    exact_trace = top_values.sum(dim=1)
    trace = exact_trace + tail_mean
    tail_bounds = None
    if entropy_norm == "trace":
        tail_xlogx = (weights * _x_log_x(nodes)).sum(dim=2)
        xlogx = _x_log_x(top_values).sum(dim=1) + tail_xlogx.mean(dim=1)
        safe_trace = trace.clamp_min(torch.finfo(torch.float64).tiny)
        estimate = torch.log(safe_trace) - xlogx / safe_trace
        # Delta method: S(t, L) = log t - L / t with dS/dt = 1/t + L/t^2, dS/dL = -1/t.
        grad_t = 1 / safe_trace + xlogx / safe_trace ** 2
        grad_l = -1 / safe_trace
        per_probe = grad_t.unsqueeze(1) * tail_trace + grad_l.unsqueeze(1) * tail_xlogx
        half = t_crit * per_probe.std(dim=1) / math.sqrt(probes)
        estimate = torch.where(trace > 0, estimate, torch.zeros_like(estimate))
    else:
        h_top = -_x_log_x(top_values / lam1).sum(dim=1)
        tail_h = -(weights * _x_log_x(nodes / lam1.unsqueeze(-1))).sum(dim=2)
        tail_mean_h, half = mean_and_half_width(tail_h)
        estimate = h_top + tail_mean_h
        p_m = top_values[:, -1] / lam1[:, 0] if m else torch.ones_like(estimate)
        tail_bounds = tail_entropy_bounds(tail_mean / lam1[:, 0], p_m, tail_rank)
    return EntropyEstimate(
        estimate=estimate.to(dtype), low=(estimate - half).to(dtype), high=(estimate + half).to(dtype),
        entropy_norm=entropy_norm, top_eigenvalues=top_values.to(dtype), trace=trace.to(dtype),
        trace_low=(trace - tail_half).to(dtype), trace_high=(trace + tail_half).to(dtype),
        tail_bounds=None if tail_bounds is None else tail_bounds.to(dtype),
        probes=probes, steps=steps, confidence=confidence,
    )
