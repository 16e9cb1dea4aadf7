"""``pullgeom.perturb`` against PGD-L2 inside the [0, 1] box, on the paper's MNIST encoder.

The model: ``PaperVAE`` (784-256-256-512-32, BatchNorm + tanh) trained briefly on the MNIST
images committed with the package (``load_mnist_small``, 8,000 train images, Bernoulli
likelihood, beta = 1, ``EPOCHS`` epochs of Adam), eval mode; attacked: the first ``BATCH`` of
its 2,000 held-out images. The quantity every attack maximises is the latent shift
d(eta) = ||h(x + eta) - h(x)||_2, h = [mu; sigma] (sigma = exp(logvar / 2)), the encoder's
stochastic heads; the table reports the batch mean of d, as a ratio to 100-step PGD's.

Attacks, each returning x_adv with ||x_adv - x|| <= eps and x_adv in [0, 1]:
- ``perturb``: ``pullgeom.perturb(encoder, x, eps, box=(0, 1))`` (default settings); ``perturb
  refine=5``: the same, then 5 Frank-Wolfe steps on d itself.
- ``clipped eigen``: x +- eps v_1 clamped to [0, 1], the better sign per sample by d.
- ``PGD-k``: our in-box PGD-L2 on d^2: random start on the sphere (projected), normalised
  gradient steps of 2 eps (1 - t / k), exact projection onto ball ∩ box (bisection on the
  multiplier: eta = clip(y / (1 + t), -x, 1 - x)), the best iterate per sample kept.
- ``TA-PGD-k``: torchattacks' ``PGDL2`` algorithm (not installed; re-implemented): random start
  uniform in the ball, clamped; steps alpha * g / ||g|| with their default alpha = 0.2 eps;
  scaled back into the ball, then clamped to the box; the last iterate.

Run: ``python benchmarks/bench_perturb.py`` (one thread; prints the table BENCHMARKS.md quotes).
Timings are wall-clock of one call after a warm-up call, so on a shared machine read the
ratios, not the seconds.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import pullgeom
from pullgeom.paper.datasets import load_mnist_small
from pullgeom.paper.models import PaperVAE

BATCH = 64
EPOCHS = 2
BUDGETS = (0.1, 0.3, 1.0, 3.0)


def trained_encoder(epochs: int = EPOCHS, seed: int = 0) -> torch.nn.Module:
    """The paper's MNIST VAE after ``epochs`` epochs on the committed 8,000 images; its encoder."""
    torch.manual_seed(seed)
    images, _ = load_mnist_small("train")
    model = PaperVAE()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for index in torch.randperm(images.shape[0], generator=generator).split(128):
            x = images[index]
            mu, logvar = model.encoder(x)
            z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
            logits = model.decoder.logits(z)
            nll = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
            kl = -0.5 * (1 + logvar - mu.square() - logvar.exp()).sum(1)
            optimizer.zero_grad()
            (nll + kl).mean().backward()
            optimizer.step()
    return model.encoder.eval()


def heads(encoder, x: torch.Tensor) -> torch.Tensor:
    """h(x) = [mu; sigma]: (B, 2dz)."""
    mu, logvar = encoder(x)
    return torch.cat([mu, (0.5 * logvar).exp()], dim=1)


def latent_shift(encoder, x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
    """d = ||h(x_adv) - h(x)||: (B,)."""
    with torch.no_grad():
        return (heads(encoder, x_adv) - heads(encoder, x)).norm(dim=1)


def _norms(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def project_ball_box(y: torch.Tensor, x: torch.Tensor, eps: float, iterations: int = 40) -> torch.Tensor:
    """The Euclidean projection of y onto {||eta|| <= eps} ∩ {0 <= x + eta <= 1}: clip(y / (1 + t))
    with t >= 0 the smallest multiplier that brings the norm within eps (bisection)."""
    lower, upper = -x, 1 - x
    clip = lambda t: torch.minimum(torch.maximum(y / (1 + t), lower), upper)  # noqa: E731
    low = torch.zeros_like(_norms(y))
    high = (_norms(y) / eps).clamp_min(1)  # y / (1 + t) is inside the ball from here on
    for _ in range(iterations):
        t = (low + high) / 2
        over = _norms(clip(t)) > eps
        low, high = torch.where(over, t, low), torch.where(over, high, t)
    return torch.where(_norms(clip(low)) <= eps, clip(low), clip(high))


def pgd(encoder, x: torch.Tensor, eps: float, steps: int, seed: int = 0) -> torch.Tensor:
    """Our in-box PGD-L2 on d^2 (module docstring); the best iterate per sample."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        base = heads(encoder, x)
    start = torch.randn(x.shape, generator=generator)
    eta = project_ball_box(eps * start / _norms(start), x, eps)
    best, best_shift = eta.clone(), torch.full((x.shape[0],), -1.0)
    for t in range(steps + 1):
        eta.requires_grad_(True)
        shift = (heads(encoder, x + eta) - base).square().sum(1)
        (grad,) = torch.autograd.grad(shift.sum(), eta)
        with torch.no_grad():
            better = shift > best_shift
            best[better], best_shift = eta[better], torch.where(better, shift, best_shift)
            if t == steps:
                break
            step = 2 * eps * (1 - t / steps)
            eta = project_ball_box(eta + step * grad / _norms(grad).clamp_min(1e-30), x, eps)
    return (x + best).clamp(0, 1)


def torchattacks_pgdl2(encoder, x: torch.Tensor, eps: float, steps: int, seed: int = 0) -> torch.Tensor:
    """torchattacks.PGDL2's algorithm (alpha = 0.2 eps, their default ratio) on d^2."""
    generator = torch.Generator().manual_seed(seed)
    alpha = 0.2 * eps
    with torch.no_grad():
        base = heads(encoder, x)
    delta = torch.randn(x.shape, generator=generator)
    radius = torch.rand(_norms(delta).shape, generator=generator)
    x_adv = (x + delta * radius / _norms(delta) * eps).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        cost = (heads(encoder, x_adv) - base).square().sum()
        (grad,) = torch.autograd.grad(cost, x_adv)
        with torch.no_grad():
            x_adv = x_adv + alpha * grad / (_norms(grad) + 1e-10)
            delta = x_adv - x
            delta = delta * torch.clamp(eps / _norms(delta), max=1.0)
            x_adv = (x + delta).clamp(0, 1)
    return x_adv.detach()


def clipped_eigen(encoder, x: torch.Tensor, eps: float) -> torch.Tensor:
    """x +- eps v_1 clamped to [0, 1], the sign with the larger d per sample."""
    top = pullgeom.spectrum(encoder, x, k=1).eigenvectors[:, 0]
    plus, minus = (x + eps * top).clamp(0, 1), (x - eps * top).clamp(0, 1)
    better = latent_shift(encoder, x, plus) >= latent_shift(encoder, x, minus)
    return torch.where(better.view(-1, 1, 1, 1), plus, minus)


ATTACKS = {
    "perturb": lambda enc, x, eps: pullgeom.perturb(enc, x, eps, box=(0.0, 1.0)),
    "perturb refine=5": lambda enc, x, eps: pullgeom.perturb(enc, x, eps, box=(0.0, 1.0), refine=5),
    "clipped eigen": clipped_eigen,
    "PGD-10": lambda enc, x, eps: pgd(enc, x, eps, 10),
    "PGD-100": lambda enc, x, eps: pgd(enc, x, eps, 100),
    "TA-PGD-10": lambda enc, x, eps: torchattacks_pgdl2(enc, x, eps, 10),
    "TA-PGD-100": lambda enc, x, eps: torchattacks_pgdl2(enc, x, eps, 100),
}


def main() -> None:
    torch.set_num_threads(1)
    encoder = trained_encoder()
    for parameter in encoder.parameters():
        parameter.requires_grad_(False)
    x = load_mnist_small("test")[0][:BATCH]
    print(f"torch {torch.__version__}, 1 thread, B = {BATCH}, float32, MNIST test images, box [0, 1]; "
          f"encoder trained {EPOCHS} epochs on 8,000 images")
    print("| eps | " + " | ".join(f"{name} d / PGD-100 d" for name in ATTACKS) + " | "
          + " | ".join(f"{name} time / PGD-100" for name in ATTACKS if name != "PGD-100") + " | PGD-100 s |")
    print("|" + "---|" * (2 * len(ATTACKS) + 1))
    for eps in BUDGETS:
        shift, seconds = {}, {}
        for name, attack in ATTACKS.items():
            attack(encoder, x, eps)  # warm-up: the backend choice, allocator
            start = time.perf_counter()
            x_adv = attack(encoder, x, eps)
            seconds[name] = time.perf_counter() - start
            assert ((x_adv - x).flatten(1).norm(dim=1) <= eps * (1 + 1e-5)).all()
            assert ((x_adv >= 0) & (x_adv <= 1)).all()
            shift[name] = latent_shift(encoder, x, x_adv).mean().item()
        times = [f"{seconds[name] / seconds['PGD-100']:.3f}" for name in ATTACKS if name != "PGD-100"]
        print(f"| {eps} | " + " | ".join(f"{shift[name] / shift['PGD-100']:.3f}" for name in ATTACKS) + " | "
              + " | ".join(times) + f" | {seconds['PGD-100']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
