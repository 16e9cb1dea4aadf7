"""``lanczos`` (matrix-free) against ``autograd`` (materialise A) on the paper's CelebA encoder.

The encoder: ``pullgeom.paper.models.CelebAEncoder`` (64 x 64 x 3 input, five conv + BatchNorm + tanh
blocks, latent 128, so 2dz = 256 rows of A and N = 12,288), random weights and randomised
BatchNorm statistics, eval mode; B = 16 inputs uniform in [0, 1], k = 5.

Two ways to run it:

- ``python benchmarks/bench_lanczos.py [--threads T] [--batch B] [--repeats R]``: the
  measurement behind the numbers we report. Each run is a fresh subprocess: a B = 1 warm-up
  (lazy imports, allocator), then the peak-RSS counter is reset (``/proc/self/clear_refs``),
  then one timed call; peak memory = VmHWM - VmRSS before the call (real resident memory, every
  allocator included; the same measurement for both backends). The backends alternate, R runs
  each, so both see the same load on a shared machine. The top-5 eigenvalues are compared with a
  float64 ``autograd`` reference. Prints one CSV row per run (device, torch version, threads,
  batch, backend, repeat, seconds, peak MiB, max relative error of the top 5, Lanczos products
  per sample), then the medians and their ratios.
- ``pytest benchmarks/bench_lanczos.py --benchmark-only``: the same two calls under
  pytest-benchmark (time only; pytest-benchmark has no memory meter).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import pytest
import torch
import torch.nn as nn

import pullgeom
from pullgeom.paper.models import CelebAEncoder

BATCH, K = 16, 5


def celeba_encoder(seed: int = 0, dtype: torch.dtype = torch.float32) -> CelebAEncoder:
    """The CelebA encoder with random weights and BatchNorm statistics, eval mode."""
    torch.manual_seed(seed)
    encoder = CelebAEncoder()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in encoder.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
    return encoder.eval().to(dtype)


def celeba_like(batch: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.rand(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _memory_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measure(backend: str, batch: int, out_path: str) -> None:
    """Subprocess body: warm up, reset the peak, one timed call; writes JSON to ``out_path``."""
    encoder, x = celeba_encoder(), celeba_like(batch)
    pullgeom.spectrum(encoder, x[:1], k=K, backend=backend)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset VmHWM (peak RSS) to the current RSS
    before = _memory_kib("VmRSS")
    start = time.perf_counter()
    result = pullgeom.spectrum(encoder, x, k=K, backend=backend)
    seconds = time.perf_counter() - start
    peak = _memory_kib("VmHWM") - before
    with open(out_path, "w") as out:
        json.dump({"seconds": seconds, "peak_mib": peak / 1024,
                   "eigenvalues": result.eigenvalues.tolist()}, out)


def _lanczos_products(batch: int) -> list[int]:
    """Block products per sample of one ``lanczos`` run (probes and ghost checks included)."""
    from pullgeom.api import build_problem
    from pullgeom.backends import REGISTRY

    encoder, x = celeba_encoder(), celeba_like(batch)
    problem, _ = build_problem(encoder, x)
    return REGISTRY["lanczos"].run(problem, x, K).steps.tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads per run (1: stable on a shared box)")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per backend, alternating")
    parser.add_argument("--measure", nargs=2, metavar=("BACKEND", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.measure:
        _measure(args.measure[0], args.batch, args.measure[1])
        return
    runs: dict[str, list[dict]] = {"autograd": [], "lanczos": []}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            for backend, results in runs.items():
                path = os.path.join(folder, f"{backend}{repeat}.json")
                subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--batch",
                                str(args.batch), "--measure", backend, path], check=True, env=env)
                with open(path) as result:
                    results.append(json.load(result))
    x64 = celeba_like(args.batch, dtype=torch.float64)
    encoder64 = celeba_encoder(dtype=torch.float64)
    reference = pullgeom.spectrum(encoder64, x64, k=K, backend="autograd").eigenvalues
    products = _lanczos_products(args.batch)
    print("device,torch,threads,batch,backend,repeat,seconds,peak_mib,top5_max_rel_err,products_per_sample")
    for backend, results in runs.items():
        steps = f"{min(products)}-{max(products)}" if backend == "lanczos" else ""
        for repeat, result in enumerate(results):
            values = torch.tensor(result["eigenvalues"], dtype=torch.float64)
            error = ((values - reference).abs() / reference).max().item()
            print(f"cpu,{torch.__version__},{args.threads},{args.batch},{backend},{repeat},"
                  f"{result['seconds']:.2f},{result['peak_mib']:.0f},{error:.1e},{steps}")
    median = {backend: {key: statistics.median(result[key] for result in results)
                        for key in ("seconds", "peak_mib")} for backend, results in runs.items()}
    for backend, values in median.items():
        print(f"# {backend}: median {values['seconds']:.2f} s, {values['peak_mib']:.0f} MiB")
    ratio_time = median["autograd"]["seconds"] / median["lanczos"]["seconds"]
    ratio_memory = median["autograd"]["peak_mib"] / max(median["lanczos"]["peak_mib"], 1e-9)
    print(f"# lanczos vs autograd (medians): {ratio_time:.2f}x less time, "
          f"{ratio_memory:.1f}x less peak memory")


@pytest.fixture(scope="module")
def celeba():
    return celeba_encoder(), celeba_like(BATCH)


@pytest.mark.parametrize("backend", ["lanczos", "autograd"])
def test_celeba_spectrum(benchmark, celeba, backend):
    encoder, x = celeba
    pullgeom.spectrum(encoder, x[:1], k=K, backend=backend)  # lazy imports and caches outside the timing
    benchmark.extra_info.update(device="cpu", torch=torch.__version__, threads=torch.get_num_threads(),
                                batch=BATCH, k=K, backend=backend)
    result = benchmark.pedantic(lambda: pullgeom.spectrum(encoder, x, k=K, backend=backend),
                                rounds=1, iterations=1)
    assert result.backend == backend


if __name__ == "__main__":
    main()
