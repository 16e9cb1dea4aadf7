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
- ``python benchmarks/bench_lanczos.py --products-vs REV [--batch B]``: block products per
  sample (and seconds) of this checkout's ``lanczos_topk`` against the one at git revision REV,
  on the CelebA encoder and on simulated spectra: what the probes for repeated eigenvalues cost.
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


def _products_against(revision: str, batch: int) -> None:
    """Block products per sample (and seconds) of this checkout's ``lanczos_topk`` against the one
    at git ``revision``, on the CelebA encoder (B = ``batch``) and on simulated PSD spectra
    (N = 256, B = 4, k = 5, tol 1e-5, float64 and float32, plain and ``lifted``)."""
    import importlib.util

    import pullgeom.backends.lanczos_backend as backend
    from pullgeom.linalg import lanczos

    here = os.path.dirname(os.path.abspath(__file__))
    source = subprocess.run(["git", "show", f"{revision}:pullgeom/linalg/lanczos.py"], check=True,
                            capture_output=True, text=True, cwd=here).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as file:
        file.write(source)
    spec = importlib.util.spec_from_file_location("lanczos_at_revision", file.name)
    old = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = old  # dataclasses look their module up
    spec.loader.exec_module(old)
    os.unlink(file.name)
    versions = {revision: old.lanczos_topk, "this checkout": lanczos.lanczos_topk}
    print("case,version,products_per_sample,seconds")
    for name, topk in versions.items():
        backend.lanczos_topk = topk
        start = time.perf_counter()
        steps = _lanczos_products(batch)
        print(f"celeba B={batch},{name},{' '.join(map(str, steps))},{time.perf_counter() - start:.2f}")
    backend.lanczos_topk = lanczos.lanczos_topk
    n = 256
    generator = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(4, n, n, dtype=torch.float64, generator=generator))
    i = torch.arange(1, n + 1, dtype=torch.float64)
    uniform = torch.rand(n, dtype=torch.float64, generator=generator).sort(descending=True).values
    spectra = {"i^-1": i ** -1.0, "i^-2": i ** -2.0, "e^(-i/3)": torch.exp(-i / 3), "uniform(0,1)": uniform}
    for label, spectrum in spectra.items():
        matrices = (basis * spectrum) @ basis.transpose(1, 2)
        for dtype in (torch.float64, torch.float32):
            operator = matrices.to(dtype)
            for lifted in (False, True):
                for name, topk in versions.items():
                    start = torch.randn(4, n, 1, generator=torch.Generator().manual_seed(1)).to(dtype)
                    seconds = time.perf_counter()
                    result = topk(lambda v, index, m=operator: m[index] @ v, start, K, tol=1e-5,
                                  lifted=lifted, explicit_residuals=False,
                                  generator=torch.Generator().manual_seed(2))
                    seconds = time.perf_counter() - seconds
                    print(f"{label} {str(dtype)[6:]}{' lifted' if lifted else ''},{name},"
                          f"{' '.join(map(str, result.steps.tolist()))},{seconds:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads per run (1: stable on a shared box)")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per backend, alternating")
    parser.add_argument("--measure", nargs=2, metavar=("BACKEND", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--products-vs", metavar="REV",
                        help="only compare Lanczos products per sample with lanczos_topk at git revision REV")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.products_vs:
        _products_against(args.products_vs, args.batch)
        return
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
