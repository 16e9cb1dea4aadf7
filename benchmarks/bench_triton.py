"""Benchmarks of the Triton kernels (CUDA only; skipped elsewhere: the interpreter's timings
say nothing about a GPU).

- ``test_triton_spectrum``: ``pullgeom.spectrum(backend="triton")`` on the paper's encoder
  (784-256-256-512-32, BatchNorm + tanh), k=5 plus the full nonzero spectrum, B in
  {64, 256, 1024, 10000}, against ``backend="torch"`` on the same GPU.
- ``test_plan_gram``: the fused plan-to-Gram op alone.
- ``test_eigh``: ``triton_eigh`` against batched ``torch.linalg.eigh`` on 10,000 n x n
  symmetric matrices, n in {16, 32, 64, 128}.

Run: ``pytest benchmarks/bench_triton.py --benchmark-only``. Each result carries the device,
torch and triton versions in ``extra_info``.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="the Triton kernels are benchmarked on CUDA only")

triton = pytest.importorskip("triton")

import pullgeom  # noqa: E402
from pullgeom.tracing.fx_trace import trace_plan  # noqa: E402
from pullgeom.kernels.triton import load_ops  # noqa: E402

from conftest import mnist_like, paper_encoder  # noqa: E402

DEVICE = "cuda"


def _tag(benchmark, **info) -> None:
    benchmark.extra_info.update(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                triton=triton.__version__, **info)


def _synchronized(fn):
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


@pytest.fixture(scope="module")
def gpu_encoder():
    return paper_encoder().to(DEVICE)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("batch", [64, 256, 1024, 10000])
def test_triton_spectrum(benchmark, gpu_encoder, batch, backend):
    x = mnist_like(batch).to(DEVICE)
    run = _synchronized(lambda: pullgeom.spectrum(gpu_encoder, x, k=5, backend=backend, chunk_size=batch))
    run()  # compile the kernels and fill caches outside the timing
    _tag(benchmark, batch=batch, backend=backend, k=5)
    result = benchmark(run)
    assert result.backend == backend


@pytest.mark.parametrize("batch", [256, 10000])
def test_plan_gram(benchmark, gpu_encoder, batch):
    load_ops()
    from pullgeom.kernels.triton.plan_gram import plan_gram

    plan = trace_plan(gpu_encoder)
    first = plan.layers[0].weight
    shared = first @ first.T
    x = mnist_like(batch).to(DEVICE).flatten(1)
    run = _synchronized(lambda: plan_gram(plan, x, "logvar", True, None, shared))
    run()
    _tag(benchmark, batch=batch, op="triton_plan_gram")
    benchmark(run)


@pytest.mark.parametrize("solver", ["triton_eigh", "torch.linalg.eigh"])
@pytest.mark.parametrize("n", [16, 32, 64, 128])
def test_eigh(benchmark, n, solver):
    load_ops()
    generator = torch.Generator(device=DEVICE).manual_seed(n)
    a = torch.randn(10000, n, n, device=DEVICE, generator=generator)
    gram = a @ a.transpose(1, 2) / n
    solve = torch.ops.pullgeom.triton_eigh if solver == "triton_eigh" else torch.linalg.eigh
    run = _synchronized(lambda: solve(gram))
    run()
    _tag(benchmark, batch=10000, n=n, solver=solver)
    benchmark(run)
