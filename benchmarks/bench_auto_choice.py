"""Checks ``backend="auto"``'s cost model (``pullgeom.backends.lanczos_backend.lanczos_mode``) by timing.

For encoders without an MLP plan, ``auto`` chooses between ``autograd`` (materialise A, m batched
VJPs) and ``lanczos`` run to the whole spectrum (r + 1 matrix-free products). This times both on
a few conv encoders, each in one process after a warm-up, alternating, and prints what the model
predicted beside what was faster.

- ``python benchmarks/bench_auto_choice.py [--threads T] [--repeats R]``: one CSV row per
  encoder (device, torch, threads, encoder, batch, autograd s, lanczos s, faster, auto's pick,
  agree), medians over R runs.
- ``pytest benchmarks/bench_auto_choice.py --benchmark-only``: the same calls under
  pytest-benchmark.
"""

from __future__ import annotations

import argparse
import statistics
import time

import pytest
import torch
import torch.nn as nn

import pullgeom
from pullgeom.api import _prepare
from pullgeom.backends import REGISTRY, WHOLE_SPECTRUM_LANCZOS, choose_backend
from pullgeom.paper.models import CelebAEncoder


class SmallConvEncoder(nn.Module):
    """An MNIST-sized conv encoder: 1 x 28 x 28 inputs, latent 16 (m = 32 rows of A)."""

    def __init__(self, dz: int = 16):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 4, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(8, 16, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten())
        self.heads = nn.Linear(16 * 7 * 7, 2 * dz)

    def forward(self, x):
        mu, logvar = self.heads(self.body(x)).chunk(2, dim=-1)
        return mu, logvar


def encoders() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    return {
        "celeba-conv (3x64x64, dz 128), B=4": (CelebAEncoder().eval(), torch.rand(4, 3, 64, 64, generator=generator)),
        "mnist-conv (1x28x28, dz 16), B=16": (SmallConvEncoder().eval(), torch.rand(16, 1, 28, 28, generator=generator)),
    }


def run(encoder: nn.Module, x: torch.Tensor, backend: str):
    """One spectrum with ``backend``: "autograd", or "lanczos" as auto runs it (whole spectrum)."""
    if backend == "autograd":
        return pullgeom.spectrum(encoder, x, k=5, backend="autograd")
    saved = REGISTRY["lanczos"]
    REGISTRY["lanczos"] = WHOLE_SPECTRUM_LANCZOS  # what auto runs when it picks lanczos
    try:
        return pullgeom.spectrum(encoder, x, k=5, backend="lanczos")
    finally:
        REGISTRY["lanczos"] = saved


def autos_pick(encoder: nn.Module, x: torch.Tensor) -> str:
    _, problem, _, _ = _prepare(encoder, x, 5, None, True, "logvar", "auto", None)
    return choose_backend("auto", problem, x.device).name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("device,torch,threads,encoder,autograd_s,lanczos_whole_s,faster,auto_picks,agree")
    for name, (encoder, x) in encoders().items():
        for backend in ("autograd", "lanczos"):
            run(encoder, x[:1], backend)  # warm-up: lazy imports, tracing caches
        seconds: dict[str, list[float]] = {"autograd": [], "lanczos": []}
        for _ in range(args.repeats):
            for backend, times in seconds.items():
                start = time.perf_counter()
                run(encoder, x, backend)
                times.append(time.perf_counter() - start)
        median = {backend: statistics.median(times) for backend, times in seconds.items()}
        faster = min(median, key=median.get)
        pick = autos_pick(encoder, x)
        print(f"cpu,{torch.__version__},{args.threads},{name},{median['autograd']:.3f},"
              f"{median['lanczos']:.3f},{faster},{pick},{faster == pick}")


@pytest.mark.parametrize("backend", ["autograd", "lanczos"])
@pytest.mark.parametrize("name", list(encoders()))
def test_auto_choice(benchmark, name, backend):
    encoder, x = encoders()[name]
    run(encoder, x[:1], backend)
    benchmark.extra_info.update(device="cpu", torch=torch.__version__, threads=torch.get_num_threads(),
                                encoder=name, backend=backend, auto_picks=autos_pick(encoder, x))
    result = benchmark.pedantic(lambda: run(encoder, x, backend), rounds=1, iterations=1)
    assert result.complete.all()


if __name__ == "__main__":
    main()
