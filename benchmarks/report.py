"""One table of spectrum throughput on the paper's encoder: every backend against the baselines.

    python benchmarks/report.py [--device cpu|cuda] [--batches 64 256 1024]

For each batch size B and each method: wall time (best of ``--rounds`` after a warm-up),
samples/s, speedup over the torch.func recipe (issue 3's "autograd": vmap(jacrev) + small-Gram
eigh) and over the paper's recipe (dense N x N metric + eigh per sample, float64, timed on
``--recipe-samples`` samples and scaled to B), achieved GFLOP/s (the layer chain's useful
multiply-adds, see ``chain_multiply_adds``, over the time) next to a torch matmul with the same
multiply-adds timed in the same run, and peak memory above the starting point (CUDA: allocator
peak; CPU: resident memory sampled every millisecond during one call, measured in a child
process started with glibc's MALLOC_MMAP_THRESHOLD_ fixed, so that every tensor's pages come
from and go back to the system instead of being recycled unseen; timing stays in this process,
since fresh pages on every call would slow the fast backends by a third).

Every method computes the same thing: top-5 eigenpairs and the full nonzero spectrum.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

import pullgeom
from conftest import mnist_like, paper_encoder
from pullgeom.backends.torch_backend import chain_rows
from pullgeom.tracing.mlp_plan import MLPPlan, trace_plan
from pullgeom.reference import dense_spectrum, jacrev_spectrum

K = 5


@dataclass
class Row:
    batch: int
    method: str
    seconds: float
    peak_mib: float
    samples_scaled_from: int | None = None  # the paper's recipe runs on a few samples


def chain_multiply_adds(plan: MLPPlan, stochastic: bool = True) -> int:
    """Multiply-adds per sample of the layer chain (MATH.md 2): the forward pass, the head rows
    carried back through each layer (at most the narrowest width so far, after the QR
    compression) and the Gram R (W_1 W_1^T) R^T. The useful work every fast backend does."""
    widths = plan.widths  # input, then each hidden width
    # The forward pass needs the sigma head's pre-activation (for d sigma / d out2), not mu.
    forward = sum(widths[i] * widths[i + 1] for i in range(len(widths) - 1)) + plan.latent_dim * widths[-1]
    rows = min(plan.rank_bound(stochastic), widths[-1])
    backward = 0
    for layer in range(len(widths) - 1, 1, -1):  # rows x w_l times W_l: (w_l, w_{l-1})
        backward += rows * widths[layer] * widths[layer - 1]
        rows = min(rows, widths[layer - 1])
    gram = rows * widths[1] * widths[1] + rows * rows * widths[1]
    return forward + backward + gram


def counted_multiply_adds(plan: MLPPlan) -> int:
    """Multiply-adds of the ``torch`` backend's chain and Gram on one sample, by torch's
    FlopCounterMode: the check that ``chain_multiply_adds`` counts what actually runs."""
    x = torch.rand(1, plan.input_numel)
    first_gram = plan.layers[0].weight @ plan.layers[0].weight.T
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        rows = chain_rows(plan, x, "logvar", True, None)
        rows @ first_gram @ rows.mT
    return counter.get_total_flops() // 2


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def best_seconds(call: Callable[[], object], device: torch.device, rounds: int) -> float:
    """Best wall seconds over ``rounds`` after one warm-up."""
    call()
    synchronize(device)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        call()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def peak_mib(call: Callable[[], object], device: torch.device) -> float:
    """Peak memory of one call above its start (call it once before: imports, caches)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    before, peak, done = resident_bytes(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], resident_bytes())
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        call()
    finally:
        done.set()
        watcher.join()
    return max(peak[0] - before, 0) / 2**20


def plan_backends(device: torch.device) -> list[str]:
    """The layer-plan backends available on ``device`` (Triton on CPU is only its interpreter)."""
    infos = {info.name: info for info in pullgeom.backends(device)}
    wanted = ["cuda", "triton", "cpp", "torch"] if device.type == "cuda" else ["cpp", "torch"]
    return [name for name in wanted if name in infos and infos[name].available]


def methods(encoder, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Every way to get the spectrum of x, by name: the backends, then the torch.func recipe."""
    calls: dict[str, Callable[[], object]] = {
        name: (lambda name=name: pullgeom.spectrum(encoder, x, k=K, backend=name))
        for name in plan_backends(x.device) + ["autograd"]
    }
    calls["torch.func recipe"] = lambda: jacrev_spectrum(encoder, x, k=K)
    return calls


def every_method(batches: list[int], device: torch.device, recipe_samples: int):
    """(batch, method name, call, samples it runs on) for every row of the table."""
    encoder = paper_encoder().to(device)
    for batch in batches:
        x = mnist_like(batch).to(device)
        for method, call in methods(encoder, x).items():
            yield batch, method, call, batch
        yield batch, "paper's recipe", partial(dense_spectrum, encoder, x[:recipe_samples]), recipe_samples


def run(batches: list[int], device: torch.device, rounds: int, recipe_samples: int) -> list[Row]:
    peaks = peaks_by_row(batches, device, recipe_samples)
    fast = plan_backends(device)
    rows = []
    for batch, method, call, samples in every_method(batches, device, recipe_samples):
        seconds = best_seconds(call, device, rounds if method in fast else 1) * batch / samples
        rows.append(Row(batch, method, seconds, peaks[f"{batch}/{method}"],
                        samples if samples != batch else None))
    return rows


def peaks_by_row(batches: list[int], device: torch.device, recipe_samples: int) -> dict[str, float]:
    """Peak MiB per "batch/method": directly on CUDA, from a child process on CPU (see above)."""
    if device.type == "cuda":
        return measured_peaks(batches, device, recipe_samples)
    child = [sys.executable, __file__, "--peaks-only", "--device", str(device), "--recipe-samples",
             str(recipe_samples), "--batches", *map(str, batches)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    out = subprocess.run(child, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measured_peaks(batches: list[int], device: torch.device, recipe_samples: int) -> dict[str, float]:
    peaks = {}
    for batch, method, call, _ in every_method(batches, device, recipe_samples):
        call()
        peaks[f"{batch}/{method}"] = peak_mib(call, device)
    return peaks


def matmul_seconds(multiply_adds: int, device: torch.device, rounds: int) -> float:
    """A (m, 256) @ (256, 256) float32 matmul with ``multiply_adds`` multiply-adds."""
    m = max(1, multiply_adds // (256 * 256))
    a = torch.randn(m, 256, device=device)
    b = torch.randn(256, 256, device=device)
    return best_seconds(lambda: a @ b, device, rounds)


def ratio(value: float) -> str:
    return f"{value:,.0f}x" if value >= 10 else f"{value:.2f}x" if value < 1 else f"{value:.1f}x"


def table(rows: list[Row], per_sample_multiply_adds: int, device: torch.device, rounds: int) -> str:
    lines = [
        "| B | method | ms | samples/s | vs torch.func recipe | vs paper's recipe | GFLOP/s | "
        "matmul GFLOP/s | peak MiB |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for batch in sorted({row.batch for row in rows}):
        mine = [row for row in rows if row.batch == batch]
        recipe = next(row for row in mine if row.method == "torch.func recipe").seconds
        paper = next(row for row in mine if row.method == "paper's recipe").seconds
        flops = 2 * per_sample_multiply_adds * batch
        matmul = flops / matmul_seconds(per_sample_multiply_adds * batch, device, rounds) / 1e9
        for row in mine:
            scaled = f" (x {batch}/{row.samples_scaled_from})" if row.samples_scaled_from else ""
            cells = [str(batch), row.method + scaled, f"{row.seconds * 1e3:,.1f}",
                     f"{batch / row.seconds:,.0f}", ratio(recipe / row.seconds), ratio(paper / row.seconds),
                     f"{flops / row.seconds / 1e9:.1f}", f"{matmul:.1f}", f"{row.peak_mib:,.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of the fast backends")
    parser.add_argument("--recipe-samples", type=int, default=2)
    parser.add_argument("--peaks-only", action="store_true", help=argparse.SUPPRESS)  # the memory child
    args = parser.parse_args()
    os.environ.setdefault("PULLGEOM_AUTOTUNE", "0")  # each row runs the backend it names
    device = torch.device(args.device)
    if args.peaks_only:
        print(json.dumps(measured_peaks(args.batches, device, args.recipe_samples)))
        return
    with torch.no_grad():
        plan = trace_plan(paper_encoder())
    multiply_adds, counted = chain_multiply_adds(plan), counted_multiply_adds(plan)
    if multiply_adds != counted:
        raise SystemExit(f"the FLOP model counts {multiply_adds} multiply-adds per sample, "
                         f"torch's FlopCounterMode {counted}: fix chain_multiply_adds")
    rows = run(args.batches, device, args.rounds, args.recipe_samples)
    for info in pullgeom.backends(device):
        if not info.available:
            print(f"not timed: backend {info.name!r} ({info.reason})")
    print(f"paper encoder, k={K} + full spectrum, device {device}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; chain: {multiply_adds / 1e6:.2f} M multiply-adds per sample "
          "(= FlopCounterMode's count)")
    print(table(rows, multiply_adds, device, args.rounds))


if __name__ == "__main__":
    main()
