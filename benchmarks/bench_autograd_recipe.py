"""The ``autograd`` backend's Jacobian against the best plain-torch recipe, on the paper's MNIST
encoder (random weights, ``conftest.paper_encoder``) at MNIST-like inputs, float32.

- ``loop``: ``pullgeom.backends.autograd_backend.batch_jacobian``, the backend's path above
  ``VECTORIZE_MAX_BATCH`` samples: one ``torch.func.vjp`` and 2dz batched pullbacks, one per row.
- ``vectorized``: ``vectorized_jacobian``, the backend's path for small chunks of conv-free encoders,
  ``torch.autograd.functional.jacobian(lambda x: f(x).sum(0), x, vectorize=True)``:
  the Jacobian of the batch-summed outputs, whose rows are every sample's Jacobian (the samples
  are independent in eval mode), all 2dz cotangents pushed through one vmapped backward.
- ``vmap(vjp)``: ``torch.func.vmap`` of the backend's own pullback over the 2dz one-hot
  cotangents (the same batched backward as ``vectorized``, one recorded graph).

Run: ``python benchmarks/bench_autograd_recipe.py`` (prints the table BENCHMARKS.md quotes:
after a warm-up, the median of 7 rounds, the recipes interleaved within each round, at 1 and 2
threads). ``pytest benchmarks/bench_autograd_recipe.py --benchmark-only`` gives
pytest-benchmark's table.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
from torch.func import vjp, vmap

from conftest import mnist_like, paper_encoder
from pullgeom.backends.autograd_backend import batch_jacobian, vectorized_jacobian
from pullgeom.encoder_output import heads_function

BATCHES = (16, 64, 256, 1024)


def vmapped_pullback(fn, x: torch.Tensor) -> torch.Tensor:
    """(B, m, N): the pullback of one ``torch.func.vjp`` vmapped over the m one-hot cotangents."""
    out, pullback = vjp(fn, x)
    batch, m = out.shape
    cotangents = torch.eye(m, dtype=out.dtype, device=out.device).unsqueeze(1).expand(m, batch, m)
    return vmap(lambda u: pullback(u)[0])(cotangents).flatten(2).transpose(0, 1)


RECIPES = {"loop": batch_jacobian, "vectorized": vectorized_jacobian, "vmap(vjp)": vmapped_pullback}


def heads_and_inputs(batch: int):
    return heads_function(paper_encoder(), "logvar", True), mnist_like(batch)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_jacobian_recipe(benchmark, recipe, batch):
    fn, x = heads_and_inputs(batch)
    benchmark.group = f"jacobian-B{batch}"
    benchmark.extra_info.update(batch=batch, threads=torch.get_num_threads())
    benchmark.pedantic(RECIPES[recipe], args=(fn, x), rounds=5, warmup_rounds=1)


def _median_ms(recipes: dict, *args, rounds: int = 7) -> dict[str, float]:
    """Median ms of each recipe, the recipes interleaved round by round so that a burst of load
    from other processes falls on all of them alike."""
    for recipe in recipes.values():
        recipe(*args)
    times = {name: [] for name in recipes}
    for _ in range(rounds):
        for name, recipe in recipes.items():
            start = time.perf_counter()
            recipe(*args)
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


def main() -> None:
    print(f"torch {torch.__version__}, paper MNIST encoder (m = 2dz = 64 rows, N = 784), float32, "
          "median of 7 interleaved calls (ms)")
    print("| threads | B | loop | vectorized | vmap(vjp) | vectorized / loop | vmap(vjp) / loop |")
    print("|---|---|---|---|---|---|---|")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for batch in BATCHES:
            fn, x = heads_and_inputs(batch)
            reference = batch_jacobian(fn, x)
            for recipe in ("vectorized", "vmap(vjp)"):
                torch.testing.assert_close(RECIPES[recipe](fn, x), reference, rtol=1e-5, atol=1e-6)
            ms = _median_ms(RECIPES, fn, x)
            columns = [f"{ms[name]:.1f}" for name in RECIPES]
            columns += [f"{ms[name] / ms['loop']:.2f}" for name in ("vectorized", "vmap(vjp)")]
            print(f"| {threads} | {batch} | " + " | ".join(columns) + " |", flush=True)


if __name__ == "__main__":
    main()
