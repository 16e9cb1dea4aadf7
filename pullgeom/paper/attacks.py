"""Attacks on a VAE: the one-step eigendirection attack and its baselines (MATH.md 5).

- Eigen attack, paper scaling: x_c = x + delta * lambda_i * v_i; unit scaling: x_c = x + delta * v_i,
  for the top-k eigenpairs (lambda_i, v_i) of G(x). Both signs of v_i are valid; each metric
  reports the worse sign per sample.
- Random baseline: x_c = x + delta * u, u a uniformly random unit direction (both signs).
- PGD (paper Eq. 2): maximise ||mu(x + eta) - mu(x)||_2 over ||eta||_2 <= eta0 by projected,
  normalised gradient ascent from a random point on the sphere.
- Boxed (optional): ``pullgeom.perturb`` with a pixel box, the second-order optimal l2 step that
  keeps every pixel valid (``perturb_curves``).

Metrics per perturbed input: reconstruction MSE = mean over pixels of (g(mu(x_c)) - x)^2
(against the clean x) and latent distance ||mu(x_c) - mu(x)||_2. Inputs are not clipped to
the pixel range (but in the boxed attack): the attack is on the model's geometry, as in the paper.

Why the eigenvector is optimal to first order: E_eps ||f(x + eta) - f(x)||^2 ~= eta^T G eta for
f = mu + eps * sigma, maximised over ||eta|| = eta0 by v_1 (Rayleigh quotient). For the mean
alone the same holds with G_mu = J_mu^T J_mu, so PGD's optimum at small eta0 approaches the top
eigenvector of G_mu: ``theorem_check`` measures how close the one-step attacks come.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

import pullgeom

SCALINGS = ("paper", "unit")
FIG2_DELTAS = (0.5233, 0.7443)  # the paper's Fig. 2 corruption strengths (steps of delta * s_1)


def log_grid(low: float, high: float, steps: int = 40) -> Tensor:
    """(steps,) float64 values log-spaced over [low, high] (the paper uses 40 steps)."""
    return torch.logspace(
        torch.log10(torch.tensor(low)).item(),
        torch.log10(torch.tensor(high)).item(),
        steps,
        dtype=torch.float64,
    )


@torch.no_grad()
def attack_metrics(model, x: Tensor, x_c: Tensor) -> tuple[Tensor, Tensor]:
    """x, x_c: (B, *S) -> (reconstruction MSE of x_c against x (B,), ||mu(x_c) - mu(x)|| (B,))."""
    mu = model.encoder(x)[0]
    mu_c = model.encoder(x_c)[0]
    recon = model.decoder(mu_c).reshape(x.shape)
    mse = (recon - x).square().reshape(x.shape[0], -1).mean(-1)
    return mse, (mu_c - mu).norm(dim=-1)


@dataclass
class Curves:
    """Attack curves averaged over samples.

    deltas: (D,); mse, latent: (k, D) for eigen attacks (one row per direction) or (1, D).
    """

    deltas: Tensor
    mse: Tensor
    latent: Tensor


@torch.no_grad()
def _two_sided_grid(
    model, x: Tensor, direction: Tensor, scale: Tensor, deltas: Tensor
) -> tuple[Tensor, Tensor]:
    """Mean over samples of the worse of x +/- delta * scale * direction, for every delta at once.

    x, direction: (B, *S); scale: (B,); deltas: (D,) -> mse, latent: (D,) float64. All D * 2
    perturbed batches go through the model as one batch of 2 * D * B inputs.
    """
    batch, d = x.shape[0], deltas.shape[0]
    steps = deltas.to(x.dtype)[:, None] * scale[None, :]  # (D, B)
    steps = torch.cat([steps, -steps]).reshape((2 * d, batch) + (1,) * (x.dim() - 1))
    x_c = (x.unsqueeze(0) + steps * direction.unsqueeze(0)).reshape(2 * d * batch, *x.shape[1:])
    mse, latent = attack_metrics(model, x.repeat((2 * d,) + (1,) * (x.dim() - 1)), x_c)
    mse, latent = mse.reshape(2, d, batch), latent.reshape(2, d, batch)
    return mse.amax(0).mean(-1).double(), latent.amax(0).mean(-1).double()


@torch.no_grad()
def eigen_attack(model, x: Tensor, spectrum, deltas: Tensor, scaling: str = "paper") -> Curves:
    """One-step attacks along each of the spectrum's k eigenvectors over ``deltas``.

    x: (B, *S); spectrum: a ``pullgeom.Spectrum`` of x (eigenvalues (B, k), eigenvectors (B, k, *S)).
    Returns Curves with mse, latent: (k, D), means over the batch.
    """
    if scaling not in SCALINGS:
        raise ValueError(f"scaling={scaling!r}: pass one of {SCALINGS}")
    k, d = spectrum.eigenvalues.shape[1], deltas.shape[0]
    mse, latent = torch.zeros(k, d, dtype=torch.float64), torch.zeros(k, d, dtype=torch.float64)
    for i in range(k):
        direction = spectrum.eigenvectors[:, i].to(x.dtype)
        if scaling == "paper":
            scale = spectrum.eigenvalues[:, i].to(x.dtype)
        else:
            scale = torch.ones(x.shape[0], dtype=x.dtype)
        mse[i], latent[i] = _two_sided_grid(model, x, direction, scale, deltas)
    return Curves(deltas, mse, latent)


def random_directions(like: Tensor, generator: torch.Generator) -> Tensor:
    """(B, *S) unit-l2 directions drawn uniformly on the sphere."""
    u = torch.randn(like.shape, generator=generator, dtype=like.dtype)
    return u / u.reshape(u.shape[0], -1).norm(dim=1).reshape((-1,) + (1,) * (like.dim() - 1))


@torch.no_grad()
def random_attack(model, x: Tensor, deltas: Tensor, seed: int = 0) -> Curves:
    """x + delta * u for a random unit u per sample (fixed across deltas): mse, latent (1, D)."""
    u = random_directions(x, torch.Generator().manual_seed(seed))
    mse, latent = _two_sided_grid(model, x, u, torch.ones(x.shape[0], dtype=x.dtype), deltas)
    return Curves(deltas, mse[None], latent[None])


def pgd_attack(model, x: Tensor, eta0: Tensor | float, steps: int = 30, seed: int = 0) -> Tensor:
    """Latent-space PGD (Eq. 2): eta (B, *S) with ||eta_b||_2 <= eta0_b maximising ||mu(x + eta) - mu(x)||.

    eta0: a float or (B,) per-sample budgets. Projected gradient ascent with normalised steps
    from a random point on the sphere of radius eta0; the step falls linearly from 2 eta0 to 0.
    Large early steps make it a power iteration on the sphere (a fixed small step of
    2.5 eta0 / steps ended 1.6 % short of the optimum on a linear encoder after 50 steps).
    """
    shape = (-1,) + (1,) * (x.dim() - 1)
    budget = torch.as_tensor(eta0, dtype=x.dtype).expand(x.shape[0]).reshape(shape)
    with torch.no_grad():
        mu = model.encoder(x)[0]
    eta = budget * random_directions(x, torch.Generator().manual_seed(seed))
    for t in range(steps):
        step_size = 2 * budget * (1 - t / steps)
        eta.requires_grad_(True)
        distance = (model.encoder(x + eta)[0] - mu).norm(dim=-1).sum()
        (grad,) = torch.autograd.grad(distance, eta)
        with torch.no_grad():
            grad_norm = grad.reshape(x.shape[0], -1).norm(dim=1).clamp_min(1e-30).reshape(shape)
            eta = eta + step_size * grad / grad_norm
            norm = eta.reshape(x.shape[0], -1).norm(dim=1).reshape(shape)
            eta = eta * torch.clamp(budget / norm.clamp_min(1e-30), max=1.0)
    return eta.detach()


def pgd_curves(model, x: Tensor, budgets: Tensor, steps: int = 30, seed: int = 0) -> Curves:
    """PGD at each l2 budget, all budgets in one batch of D * B: mse, latent (1, D)."""
    d, batch = budgets.shape[0], x.shape[0]
    xs = x.repeat((d,) + (1,) * (x.dim() - 1))
    eta = pgd_attack(model, xs, budgets.to(x.dtype).repeat_interleave(batch), steps, seed)
    mse, latent = attack_metrics(model, xs, xs + eta)
    return Curves(
        budgets,
        mse.reshape(d, batch).mean(-1).double()[None],
        latent.reshape(d, batch).mean(-1).double()[None],
    )


def perturb_curves(model, x: Tensor, budgets: Tensor, box: tuple[float, float]) -> Curves:
    """``pullgeom.perturb`` inside ``box`` (lo, hi) at each l2 budget, all budgets in one call of
    D * B samples: mse, latent (1, D), means over x (B, *S).

    The one attack here that keeps the pixels valid: the eigen and random attacks step outside
    [0, 1] freely (the paper's attack is on the model's geometry), which a real input cannot.
    x must lie inside the box (``pullgeom.perturb`` raises ValueError otherwise).
    """
    d, batch = budgets.shape[0], x.shape[0]
    xs = x.repeat((d,) + (1,) * (x.dim() - 1))
    x_adv = pullgeom.perturb(model.encoder, xs, budgets.to(x.dtype).repeat_interleave(batch), box=box)
    mse, latent = attack_metrics(model, xs, x_adv)
    return Curves(budgets, mse.reshape(d, batch).mean(-1).double()[None],
                  latent.reshape(d, batch).mean(-1).double()[None])


def theorem_check(model, x: Tensor, budgets: Tensor, pgd_steps: int = 30, seed: int = 0) -> dict:
    """Latent distance of the one-step attacks relative to PGD at equal l2 budgets.

    Returns lists over ``budgets``: pgd, eigen_G (top eigenvector of the stochastic G),
    eigen_mu (top eigenvector of J_mu^T J_mu, the first-order optimum of PGD's objective),
    random, and the ratios eigen_G / pgd, eigen_mu / pgd, random / pgd.
    """
    model = model.eval()
    spec_g = pullgeom.spectrum(model.encoder, x, k=1)
    spec_mu = pullgeom.spectrum(model.encoder, x, k=1, stochastic=False)
    pgd = pgd_curves(model, x, budgets, pgd_steps, seed).latent[0]
    eig_g = eigen_attack(model, x, spec_g, budgets, "unit").latent[0]
    eig_mu = eigen_attack(model, x, spec_mu, budgets, "unit").latent[0]
    rnd = random_attack(model, x, budgets, seed).latent[0]
    return {
        "budgets": budgets.tolist(),
        "pgd": pgd.tolist(),
        "eigen_G": eig_g.tolist(),
        "eigen_mu": eig_mu.tolist(),
        "random": rnd.tolist(),
        "ratio_eigen_G_to_pgd": (eig_g / pgd).tolist(),
        "ratio_eigen_mu_to_pgd": (eig_mu / pgd).tolist(),
        "ratio_random_to_pgd": (rnd / pgd).tolist(),
    }


@torch.no_grad()
def corrupted_examples(model, x: Tensor, spectrum, deltas=FIG2_DELTAS) -> dict[str, Tensor]:
    """Fig. 2 at the authors' scale: originals, x + delta * s_1 * v_1 per delta, and every
    reconstruction; (B, *S) each, keys ``original``, ``reconstruction``, ``corrupted_<delta>``,
    ``reconstruction_<delta>`` in drawing order.

    spectrum: ``pullgeom.spectrum(encoder, x, stochastic=False)``, the spectrum of J_mu^T J_mu:
    v_1 is the top right singular vector of J_mu and s_1 = sqrt(lambda_1) its singular value.
    The authors' code steps by delta * s_1 on the grid logspace(-1, 1, 40) (0.5233 and 0.7443 are
    within 0.2 % of its 15th and 18th points). Stepping by the eigenvalue of G instead (our Fig. 3
    scaling) gave l2 norms of 5-72 at delta 0.5233-0.7443 on the Bernoulli VAEs of results/mnist-quick*,
    up to several times a whole MNIST digit's (about 9).
    """
    out = {"original": x, "reconstruction": model.decoder(model.encoder(x)[0]).reshape(x.shape)}
    shape = (-1,) + (1,) * (x.dim() - 1)
    top_singular_value = spectrum.eigenvalues[:, 0].clamp_min(0).sqrt().to(x.dtype).reshape(shape)
    for delta in deltas:
        x_c = x + delta * top_singular_value * spectrum.eigenvectors[:, 0].to(x.dtype)
        out[f"corrupted_{delta}"] = x_c
        out[f"reconstruction_{delta}"] = model.decoder(model.encoder(x_c)[0]).reshape(x.shape)
    return out
