"""Native kernels vs the pure-torch paths on the paper's encoder (CPU).

Run: ``pytest benchmarks/bench_kernels.py --benchmark-only``. Every number is wall time of one
call; ratios in BENCHMARKS.md come from a single run of this file. Rounds are fixed (pedantic)
so the whole file stays under a few minutes on 2 cores.
"""

from __future__ import annotations

import pytest
import torch

import pullgeom
from conftest import mnist_like, paper_encoder
from pullgeom.kernels import native as ops
from pullgeom.backends.torch_backend import chain_rows
from pullgeom.tracing.mlp_plan import trace_plan
from pullgeom.reference import dense_spectrum, jacrev_spectrum

needs_extension = pytest.mark.skipif(ops.EXTENSION_ERROR is not None, reason=str(ops.EXTENSION_ERROR))
BATCH = 256  # the op-level and eigensolver benchmarks, and the paper's recipe's group
BATCHES = [64, 256, 1024]
K = 5
RECIPE_SAMPLES = 2


@needs_extension
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("backend,rounds", [("cpp", 5), ("torch", 5), ("autograd", 2)])
def test_spectrum(benchmark, encoder, batch, backend, rounds):
    """pullgeom.spectrum(k=5, full nonzero spectrum) of ``batch`` samples."""
    benchmark.group = f"spectrum-paper-encoder-B{batch}"
    benchmark.extra_info.update(samples=batch, backend=backend, threads=torch.get_num_threads())
    result = benchmark.pedantic(pullgeom.spectrum, args=(encoder, mnist_like(batch)),
                                kwargs={"k": K, "backend": backend}, rounds=rounds, warmup_rounds=1)
    assert result.backend == backend


@pytest.mark.parametrize("batch", BATCHES)
def test_jacrev_recipe(benchmark, encoder, batch):
    """The hand-written torch.func recipe (vmap(jacrev) + small-Gram eigh): issue 3's
    "autograd" baseline."""
    benchmark.group = f"spectrum-paper-encoder-B{batch}"
    benchmark.extra_info.update(samples=batch, backend="jacrev-recipe", threads=torch.get_num_threads())
    benchmark.pedantic(jacrev_spectrum, args=(encoder, mnist_like(batch)), kwargs={"k": K},
                       rounds=2, warmup_rounds=1)


@pytest.mark.benchmark(group="spectrum-paper-encoder-B256")
def test_reference_recipe(benchmark, encoder, inputs_256):
    """The paper's recipe (dense N x N metric per sample, float64, then eigh) on a few samples;
    divide by ``samples`` for the per-sample time."""
    benchmark.extra_info.update(samples=RECIPE_SAMPLES, backend="recipe", threads=torch.get_num_threads())
    benchmark.pedantic(dense_spectrum, args=(encoder, inputs_256[:RECIPE_SAMPLES]), rounds=1, warmup_rounds=0)


@pytest.fixture(scope="module")
def paper_plan():
    with torch.no_grad():
        plan = trace_plan(paper_encoder())
    first = plan.layers[0].weight
    return plan, (first @ first.T).contiguous(), mnist_like(BATCH).reshape(BATCH, -1)


@needs_extension
@pytest.mark.benchmark(group="gram-paper-encoder-B256")
def test_plan_gram_op(benchmark, paper_plan):
    plan, first_gram, x = paper_plan
    benchmark.pedantic(ops.plan_gram, args=(x, plan, first_gram), rounds=5, warmup_rounds=1)


@pytest.mark.benchmark(group="gram-paper-encoder-B256")
def test_torch_chain_gram(benchmark, paper_plan):
    plan, first_gram, x = paper_plan

    def chain_and_gram():
        rows = chain_rows(plan, x, "logvar", True, None)
        return rows @ first_gram @ rows.mT

    benchmark.pedantic(chain_and_gram, rounds=5, warmup_rounds=1)


def symmetric_batch(n: int, batch: int = BATCH) -> torch.Tensor:
    a = torch.randn(batch, n, n, generator=torch.Generator().manual_seed(n))
    return (a + a.mT).contiguous()


@needs_extension
@pytest.mark.parametrize("n", [32, 64])
@pytest.mark.benchmark(group="eigh-B256")
def test_sym_eigh(benchmark, n):
    benchmark.group = f"eigh-B256-n{n}"
    benchmark.pedantic(ops.sym_eigh, args=(symmetric_batch(n),), rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("n", [32, 64])
@pytest.mark.benchmark(group="eigh-B256")
def test_torch_linalg_eigh(benchmark, n):
    benchmark.group = f"eigh-B256-n{n}"
    benchmark.pedantic(torch.linalg.eigh, args=(symmetric_batch(n),), rounds=5, warmup_rounds=1)
