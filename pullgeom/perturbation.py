"""``pullgeom.perturb``: the l2 attack on any encoder that moves its latent code the most, to
second order, optionally inside a box of valid pixel values.

To second order in eta the squared latent shift is a quadratic form in the metric (MATH.md 5):

    d(eta) = ||h(x + eta) - h(x)||^2_{G_z} ~= eta^T G(x) eta,   h = [mu; sigma] (mu alone if not
    stochastic), G_z the decoder's metric at mu(x) (the identity without a decoder).

- Without a box the maximiser of eta^T G eta over ||eta|| <= eps is eps v_1, v_1 the top
  eigenvector of G; both signs give the same quadratic form, so each sample takes the sign whose
  measured shift d(eta) is larger (the first-order terms the quadratic form drops decide it).
- With a box lo <= x + eta <= hi, the feasible set C = ball ∩ box is convex and eta^T G eta is
  convex, so its maximum lies on C's boundary and is not an eigenvector in general. The iteration

      eta <- argmax_{y in C} <G eta, y>        (a projected power iteration; plain power
                                                iteration on the sphere when the box does not bind)

  never decreases the quadratic form (convexity: f(y) >= f(eta) + 2 <G eta, y - eta> >= f(eta)).
  The inner maximiser is exact: y = clip(s g, lo - x, hi - x) with the scalar s >= 0 at which
  ||y|| = eps (or s = inf when the box's corner is inside the ball), found by sorting the
  coordinates' saturation points (``ball_box_maximiser``), no bisection tolerance. Being a local
  method, it starts from the clipped steps +-eps v_i along the top ``starts`` eigenvectors and
  keeps, per sample, the best by quadratic form (ties within ``TIE_RTOL``, e.g. both signs when the
  box does not bind, broken by the measured shift as above). So the result's quadratic form is at
  least that of the clipped eigen step clip(x + eps v_1, lo, hi) - x.

Optionally (``refine``) a few Frank-Wolfe steps on the measured shift d itself follow, for budgets
where the second-order model stops predicting it.

G is applied through the factor the chosen backend forms (``G v = F^T (F v)``, never N x N), or
matrix-free through ``PullbackOperator`` (a JVP and a VJP per product) when the backend is
``lanczos`` (asked for, or what ``auto`` picks for encoders whose factor would not fit).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pullgeom.api import _in_chunks, _prepare
from pullgeom.backends.base import Backend, Problem, check_finite_metric
from pullgeom.backends.lanczos_backend import LanczosBackend, PullbackOperator
from pullgeom.encoder_output import heads_function
from pullgeom.factor import eigenvectors_from_gram

# Candidates whose quadratic form is within this fraction of the best count as tied, and the
# measured latent shift picks among them: the two signs of an eigen step inside the box have
# equal quadratic forms up to round-off (float32: ~1e-6 relative), which must not decide.
TIE_RTOL = 1e-4


def ball_box_maximiser(g: Tensor, eps: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    """argmax <g, y> over ||y||_2 <= eps, lower <= y <= upper, row by row; exact.

    g, lower, upper: (R, N) with lower <= 0 <= upper; eps: (R,) > 0. Returns y: (R, N).
    KKT: y = clip(s g, lower, upper) for the smallest s >= 0 with ||y|| = eps (s = inf when even
    the box's corner in g's direction lies inside the ball). Coordinate i saturates at
    s_i = |bound_i| / |g_i|; with the coordinates sorted by s_i, ||y(s)||^2 on the segment after
    the first j have saturated is sat_j + s^2 free_j (sat_j: their bounds squared, free_j: the
    others' g^2), so s follows from the segment where the norm crosses eps. Coordinates with
    g_i = 0 stay 0. Deterministic.
    """
    bound = torch.where(g > 0, upper, lower)
    magnitude = g.abs()
    active = magnitude > 0
    breaks = torch.where(active, bound.abs() / magnitude.clamp_min(torch.finfo(g.dtype).tiny),
                         torch.full_like(g, math.inf))
    breaks, order = breaks.sort(dim=1)
    bound_sq = torch.where(active, bound.square(), 0).gather(1, order)
    g_sq = magnitude.square().gather(1, order)
    zero = g.new_zeros(g.shape[0], 1)
    saturated = torch.cat([zero, bound_sq.cumsum(1)], dim=1)  # (R, N + 1): first j saturated
    free = torch.cat([g_sq.flip(1).cumsum(1).flip(1), zero], dim=1)  # (R, N + 1): the rest's g^2
    # ||y||^2 at each breakpoint; never-saturating coordinates (g = 0) sort last at inf.
    at_break = torch.where(breaks.isinf(), math.inf, saturated[:, :-1] + breaks.square() * free[:, :-1])
    budget = eps.square().unsqueeze(1)
    crossed = (at_break < budget).sum(dim=1, keepdim=True)  # coordinates saturated at the answer
    scale = ((budget - saturated.gather(1, crossed)).clamp_min(0) / free.gather(1, crossed)).sqrt()
    return torch.where(active, torch.minimum(torch.maximum(scale * g, lower), upper), 0)


def _within_ball(eta: Tensor, eps: Tensor) -> Tensor:
    """eta (R, N) scaled down to norm eps where round-off left it above; stays in any box
    around 0."""
    norm = eta.norm(dim=1)
    return eta * torch.where(norm > eps, eps / norm.clamp_min(torch.finfo(eta.dtype).tiny), 1).unsqueeze(1)


class _ChunkMetric:
    """G(x) for one chunk as batched products, and its top eigenvectors.

    matvec: (B, N, c) -> (B, N, c); top: (B, N, k) unit top-k eigenvectors (zeros where the
    eigenvalue is 0).
    """

    def __init__(self, problem: Problem, chosen: Backend, x: Tensor, k: int):
        if isinstance(chosen, LanczosBackend):
            operator = PullbackOperator(problem, x)
            everyone = torch.arange(x.shape[0], device=x.device)
            self.matvec = lambda vectors: operator.matvec(vectors, everyone)
            self.top = chosen.run(problem, x, k, top_k_only=True).eigenvectors
            check_finite_metric(self.top)
        else:
            factor, gram = chosen.factor_and_gram(problem, x)
            check_finite_metric(gram)
            self.matvec = factor.matvec
            self.top = eigenvectors_from_gram(factor, chosen.eigh(gram)[1][:, :, :k])


class _LatentShift:
    """d(eta) = ||h(x + eta) - h(x)||^2_{G_z} at a chunk x: (B, *S): candidates eta (c, B, N) ->
    (c, B), differentiable in eta (h(x) and G_z^{1/2} at mu(x) computed once)."""

    def __init__(self, problem: Problem, x: Tensor):
        self.heads = heads_function(problem.encoder, problem.sigma, problem.stochastic)
        self.x, self.dz = x, problem.latent_dim
        with torch.no_grad():
            self.base = self.heads(x)
        self.root = problem.latent_sqrt(x)

    def __call__(self, candidates: Tensor) -> Tensor:
        c, b = candidates.shape[:2]
        moved = (self.x.unsqueeze(0) + candidates.reshape(c, *self.x.shape)).reshape(c * b, *self.x.shape[1:])
        moved = self.heads(moved)
        delta = moved.reshape(c, b, -1) - self.base
        if self.root is not None:  # G_z = L^T L (L symmetric): ||L delta||^2 per head
            delta = torch.einsum("bij,cbhj->cbhi", self.root, delta.reshape(c, b, -1, self.dz))
        return delta.flatten(2).square().sum(-1)


def _refine(shift: _LatentShift, eta: Tensor, eps: Tensor, lower: Tensor, upper: Tensor,
            rounds: int) -> Tensor:
    """``rounds`` Frank-Wolfe steps on the measured shift itself, eta <- argmax_{y in C} <grad d(eta), y>,
    from eta: (B, N); per sample the iterate with the largest d is kept (d is not convex, so a
    step may lose). One forward and backward of the encoder per round."""
    best, best_value = eta, torch.full_like(eps, -math.inf)
    for round_ in range(rounds + 1):
        current = eta.detach().requires_grad_(round_ < rounds)
        with torch.enable_grad():
            value = shift(current.unsqueeze(0))[0]
        better = value.detach() > best_value
        best = torch.where(better.unsqueeze(1), current.detach(), best)
        best_value = torch.where(better, value.detach(), best_value)
        if round_ < rounds:
            (grad,) = torch.autograd.grad(value.sum(), current)
            eta = ball_box_maximiser(grad, eps, lower, upper)
    return best


def _perturb_chunk(problem: Problem, chosen: Backend, x: Tensor, eps: Tensor, lower: Tensor | None,
                   upper: Tensor | None, starts: int, steps: int, tol: float, refine: int) -> Tensor:
    """eta: (B, N) for the chunk x: (B, *S), eps: (B,), lower/upper: (B, N) or None (no box)."""
    batch = x.shape[0]
    k = 1 if lower is None else min(starts, problem.rank)
    metric = _ChunkMetric(problem, chosen, x, k)
    directions = torch.cat([metric.top, -metric.top], dim=2)  # (B, N, 2k): both signs
    if lower is None:
        candidates = eps.view(-1, 1, 1) * directions  # the exact maximisers of eta^T G eta
        quadratic = None
    else:
        c = directions.shape[2]
        rows = lambda t: t.unsqueeze(1).expand(-1, c, -1).reshape(batch * c, -1)  # noqa: E731
        low, high, budget = rows(lower), rows(upper), eps.repeat_interleave(c)
        eta = (eps.view(-1, 1, 1) * directions).transpose(1, 2).reshape(batch * c, -1)
        eta = torch.minimum(torch.maximum(eta, low), high)  # the clipped eigen steps: feasible
        previous = None
        for _ in range(steps):
            g = metric.matvec(eta.reshape(batch, c, -1).transpose(1, 2))
            g = g.transpose(1, 2).reshape(batch * c, -1)
            # Each step's quadratic form is at least the last one's; the iterate itself may creep
            # along a flat top (a small eigengap) long after the form has settled.
            form = (eta * g).sum(1)
            if previous is not None and bool(((form - previous) <= tol * form.abs()).all()):
                break
            previous = form
            eta = ball_box_maximiser(g, budget, low, high)
        eta = _within_ball(eta, budget)
        candidates = eta.reshape(batch, c, -1).transpose(1, 2)  # (B, N, c)
        quadratic = (candidates * metric.matvec(candidates)).sum(1)  # (B, c)
    candidates = candidates.permute(2, 0, 1)  # (c, B, N)
    measured = _LatentShift(problem, x)
    with torch.no_grad():
        shift = measured(candidates)  # (c, B)
    if quadratic is not None:
        best = quadratic.amax(1, keepdim=True)
        shift = shift.masked_fill((quadratic < (1 - TIE_RTOL) * best).T, -math.inf)
    eta = candidates[shift.argmax(0), torch.arange(batch, device=x.device)]
    if refine:
        unbounded = torch.full_like(eta, math.inf)
        eta = _refine(measured, eta, eps, -unbounded if lower is None else lower,
                      unbounded if upper is None else upper, refine)
    return eta


def _budgets(eps, x: Tensor) -> Tensor:
    """eps as (B,) in x's dtype; refused unless every budget is finite and > 0."""
    try:
        budget = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"eps={eps!r}: pass an l2 budget, a float or a (B,) tensor of floats") from None
    if budget.dim() > 1 or (budget.dim() == 1 and budget.shape[0] != x.shape[0]):
        raise ValueError(f"eps has shape {tuple(budget.shape)}; pass a float or one budget per sample, "
                         f"shape ({x.shape[0]},)")
    if not (torch.isfinite(budget) & (budget > 0)).all():
        raise ValueError(f"eps={eps!r}: every l2 budget must be finite and > 0 "
                         "(eps = 0 leaves x unchanged: skip the call)")
    return budget.expand(x.shape[0]).contiguous()


def _box_bounds(box, x: Tensor) -> tuple[Tensor, Tensor]:
    """(lo, hi) broadcast to x's shape; refused unless lo < hi everywhere and x lies inside."""
    if not isinstance(box, (tuple, list)) or len(box) != 2:
        raise ValueError(f"box={box!r}: pass (lo, hi), floats or tensors broadcastable to x, e.g. (0.0, 1.0)")
    try:
        lo, hi = (torch.as_tensor(b, dtype=x.dtype, device=x.device).broadcast_to(x.shape) for b in box)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"box: each bound must be a float or a tensor broadcastable to x's shape "
                         f"{tuple(x.shape)} ({error})") from None
    if not (lo < hi).all():
        raise ValueError("box=(lo, hi) needs lo < hi for every pixel; pass the valid range, e.g. (0.0, 1.0)")
    outside = ((x < lo) | (x > hi)).flatten(1).any(dim=1)
    if outside.any():
        raise ValueError(f"x lies outside box for {int(outside.sum())} samples (first: "
                         f"{outside.nonzero()[0].item()}); clamp it first, x.clamp(lo, hi), or widen the box")
    return lo, hi


def perturb(encoder, x: Tensor, eps, *, box=None, decoder=None, stochastic: bool = True,
            sigma: str | None = None, starts: int = 2, steps: int = 10, tol: float = 1e-4, refine: int = 0,
            backend: str = "auto", chunk_size: int | None = None) -> Tensor:
    """The l2 attack that maximises the latent shift to second order: x_adv (B, *S).

    encoder: any encoder ``spectrum`` accepts, in eval mode; x: (B, *S) floating point.
    eps: the l2 budget, a float or (B,) tensor, every entry > 0: ||x_adv - x||_2 <= eps per sample
    (to round-off). box: None or (lo, hi), floats or tensors broadcastable to x with lo < hi; x must
    lie inside, and then so does every pixel of x_adv. decoder, stochastic, sigma, backend,
    chunk_size: as in ``pullgeom.spectrum`` (the metric G they define is the one maximised).

    Without a box: x + eps v_1 or x - eps v_1 (v_1 the top eigenvector of G), the sign with the
    larger measured latent shift ||h(x + eta) - h(x)||^2 (h = [mu; sigma], or mu alone when not
    stochastic; in G_z's norm with a decoder). With a box: the projected power iteration of the
    module docstring from the clipped steps along the top ``starts`` eigenvectors (both signs),
    at most ``steps`` iterations, stopping once no candidate's quadratic form grows by more than
    ``tol`` of itself in a step.
    refine: then this many Frank-Wolfe steps on the measured shift d itself (one forward and
    backward each; the best iterate by d kept per sample), for budgets where the second-order
    model stops predicting d (on the trained MNIST encoder from eps ~ 1: BENCHMARKS.md). With
    refine > 0 the result no longer maximises the quadratic form but the measured shift.
    Returned in x's dtype, detached; deterministic for a given input and backend.
    """
    if not isinstance(starts, int) or isinstance(starts, bool) or starts < 1:
        raise ValueError(f"starts={starts!r}: pass the number of eigenvectors to start from, an int >= 1")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps={steps!r}: pass the most power iterations to run, an int >= 0")
    if not isinstance(refine, int) or isinstance(refine, bool) or refine < 0:
        raise ValueError(f"refine={refine!r}: pass the number of steps on the measured shift, an int >= 0")
    x_in = x
    x, problem, chosen, chunk = _prepare(encoder, x, 1, decoder, stochastic, sigma, backend, chunk_size)
    x = x.detach()
    budget = _budgets(eps, x)
    bounds = None if box is None else _box_bounds(box, x)
    flat = x.flatten(1)
    eta = torch.zeros_like(flat)

    def attack(index: Tensor) -> Tensor:
        lower = upper = None
        if bounds is not None:
            lower = (bounds[0].flatten(1)[index] - flat[index])
            upper = (bounds[1].flatten(1)[index] - flat[index])
        return _perturb_chunk(problem, chosen, x[index], budget[index], lower, upper, starts, steps, tol,
                              refine)

    # _in_chunks slices its tensor by chunk: slicing sample indices lets every per-sample input
    # (x, eps, the box) follow the same chunks and the same out-of-memory retry.
    for start, stop, chunk_eta in _in_chunks(attack, torch.arange(x.shape[0], device=x.device), chunk):
        eta[start:stop] = chunk_eta
    return _step(flat, _within_ball(eta, budget), bounds).reshape(x.shape).detach().to(x_in.dtype)


def _step(x: Tensor, eta: Tensor, bounds: tuple[Tensor, Tensor] | None) -> Tensor:
    """x + eta for x, eta: (B, N), every pixel no farther from x than eta_i and inside the box.

    x + eta rounds to the nearest float, which can lie past x + eta by half an ulp of x: for a
    budget of 1e-3 on pixels near 1 in float32 that is 1e-4 of the budget. Pixels that rounded
    away from x are stepped one float back towards it, so ||x_adv - x|| <= ||eta||, computed
    as the caller computes it. Clamping to the box (x + (hi - x) can round past hi) only moves
    a pixel towards x.
    """
    x_adv = x + eta
    if bounds is not None:
        x_adv = torch.minimum(torch.maximum(x_adv, bounds[0].flatten(1)), bounds[1].flatten(1))
    overshoot = (x_adv - x).abs() > eta.abs()
    return torch.where(overshoot, torch.nextafter(x_adv, x), x_adv)
