"""Top k only: the batched top-k Lanczos op against the dense eigensolvers, on small Grams of
wide-latent MLP encoders (CPU). This sets ``pullgeom.backends.base.TOP_K_MIN_SIZE``.

The Grams are the real thing: M = F F^T (r = 2dz rows) of a 784-1024-2dz MLP with random
weights at MNIST-like inputs, from the ``torch`` backend's factor, in float32. Each call solves
``BATCH`` of them; ``top_k`` asks for k = 5.

Run: ``pytest benchmarks/bench_top_k.py --benchmark-only`` (pytest-benchmark's table), or
``python benchmarks/bench_top_k.py`` for the ratio table BENCHMARKS.md quotes (one thread, median
of 5 calls after a warm-up, the top-k error relative to lambda_1 beside it).
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
import torch.nn as nn

from pullgeom.api import build_problem
from pullgeom.backends import REGISTRY
from pullgeom.backends.base import settle_missed_copies
from pullgeom.kernels import native

BATCH = 64
K = 5
LATENTS = (16, 32, 64, 128, 256)  # r = 2dz = 32 .. 512


class WideEncoder(nn.Module):
    """784 -> 1024 -> 2dz -> (mu, logvar): an MLP wide enough that the Gram is 2dz x 2dz."""

    def __init__(self, dz: int):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 1024), nn.Tanh(), nn.Linear(1024, 2 * dz),
                                  nn.Tanh())
        self.mu, self.logvar = nn.Linear(2 * dz, dz), nn.Linear(2 * dz, dz)

    def forward(self, x):
        h = self.body(x)
        return self.mu(h), self.logvar(h)


def grams(dz: int, batch: int = BATCH, seed: int = 0) -> torch.Tensor:
    """(batch, 2dz, 2dz) float32 Grams of a random ``WideEncoder(dz)`` at MNIST-like inputs."""
    torch.manual_seed(seed)
    encoder = WideEncoder(dz).eval()
    x = torch.rand(batch, 1, 28, 28) * (torch.rand(batch, 1, 28, 28) < 0.2)
    with torch.no_grad():
        problem = build_problem(encoder, x)[0]
        return REGISTRY["torch"].factor(problem, x).gram().contiguous()


SOLVERS = {
    "torch.linalg.eigh": lambda m: torch.linalg.eigh(m),
    "sym_eigh": lambda m: native.sym_eigh(m),
    "lanczos_topk": lambda m: native.lanczos_topk(m, K),
    # What the cpp backend's top-k path runs: the op, then the check for missed copies of
    # repeated eigenvalues (a top-1 solve of the deflated Gram; dense eigh where one is missed).
    "checked top-k": lambda m: settle_missed_copies(REGISTRY["cpp"], m, K, *REGISTRY["cpp"].top_eigenpairs(m, K)),
}

needs_extension = pytest.mark.skipif(native.EXTENSION_ERROR is not None, reason=str(native.EXTENSION_ERROR))


@pytest.fixture(scope="module", params=LATENTS, ids=lambda dz: f"r{2 * dz}")
def gram_batch(request):
    return grams(request.param)


@needs_extension
@pytest.mark.parametrize("solver", list(SOLVERS))
def test_top_k(benchmark, gram_batch, solver):
    benchmark.group = f"top-k-r{gram_batch.shape[-1]}-B{BATCH}"
    benchmark.extra_info.update(r=gram_batch.shape[-1], batch=BATCH, k=K, threads=torch.get_num_threads())
    benchmark.pedantic(SOLVERS[solver], args=(gram_batch,), rounds=5, warmup_rounds=1)


def _median_ms(fn, m: torch.Tensor) -> float:
    fn(m)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn(m)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, B = {BATCH}, k = {K}, float32")
    print("| r | torch.linalg.eigh ms | sym_eigh ms | lanczos_topk ms | checked top-k ms | eigh / checked | "
          "sym_eigh / checked | top-k error / lambda_1 |")
    print("|---|---|---|---|---|---|---|---|")
    for dz in LATENTS:
        m = grams(dz)
        times = {name: _median_ms(fn, m) for name, fn in SOLVERS.items()}
        exact = torch.linalg.eigvalsh(m.double()).flip(-1)[:, :K]
        top = native.lanczos_topk(m, K)[0].double()
        error = ((top - exact).abs() / exact[:, :1]).max().item()
        checked = times["checked top-k"]
        print(f"| {m.shape[-1]} | {times['torch.linalg.eigh']:.1f} | {times['sym_eigh']:.1f} | "
              f"{times['lanczos_topk']:.1f} | {checked:.1f} | {times['torch.linalg.eigh'] / checked:.2f} | "
              f"{times['sym_eigh'] / checked:.2f} | {error:.1e} |")


if __name__ == "__main__":
    main()
