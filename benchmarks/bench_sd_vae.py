"""The top-5 eigenpairs of G(x) for Stable Diffusion's VAE encoder at full size, on the CPU.

The encoder is diffusers' ``AutoencoderKL`` in the SD configuration (block_out_channels
(128, 256, 512, 512), 2 layers per block, 4 latent channels, mid-block attention; ~34 M
parameters, random weights: nothing is downloaded) on one 3 x 256 x 256 image: N = 196,608,
dz = 4 x 32 x 32 = 4,096, r = 2dz = 8,192. ``pullgeom.spectrum(vae, x, k=5)`` with
``backend="auto"``, which must pick the top-k Lanczos path (``lanczos_mode``: the whole
spectrum would take r + 1 products of ~3.5 forwards each).

The call runs in a child process so that its peak resident memory (``ru_maxrss``) is the call's
alone. Reported: wall and CPU time of the call, peak RSS, the backend and mode auto chose, the
products spent (J v and J^T u counted per vector), the mean seconds of each kind, one plain
forward's time and FLOPs for scale, the top-k eigenvalues and ||G v - lambda v|| / lambda_1
(explicit products), and the load average before and after (the machine is shared: wall times
are inflated by load; CPU time over threads is the steadier figure).

    python benchmarks/bench_sd_vae.py            # the issue's target: 256 x 256, k = 5, 2 threads
    python benchmarks/bench_sd_vae.py --size 64 --backend lanczos  # a quick run of the same path
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def sd_vae(seed: int = 0):
    """The SD-VAE architecture (diffusers' AutoencoderKL defaults for SD 1.x/2.x), random weights."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                         layers_per_block=2, latent_channels=4, sample_size=256).eval()


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def log_lanczos_steps(clock) -> None:
    """--verbose: after each Lanczos step, the top Ritz values over theta_1 and the worst top-k
    residual estimate over theta_1 (stderr), and whether a probe segment (``lanczos_topk``'s
    check for missed copies of repeated eigenvalues) is running."""
    from pullgeom.linalg.lanczos import BlockLanczos

    ritz, estimates = BlockLanczos.ritz, BlockLanczos.residual_estimates
    last = {}

    def logged_ritz(self):
        values, vectors = ritz(self)
        last["theta"] = values[0, :6].clamp_min(0)
        return values, vectors

    def logged_estimates(self, vectors):
        out = estimates(self, vectors)
        if vectors.shape[2] > 1 and "theta" in last:  # the top-k check, not a probe's top pair
            theta = last["theta"]
            probing = bool(getattr(self, "probing", torch.zeros(1, dtype=torch.bool)).any())
            ratios = " ".join(f"{t:.4f}" for t in (theta / theta[0]).tolist())
            print(f"  step {self.used}: theta/theta_1 {ratios}"
                  + f"; worst residual estimate/theta_1 {(out[0].max() / theta[0]).item():.1e}"
                  + f"; probing {probing}; {clock():.0f} s", file=sys.stderr, flush=True)
        return out

    BlockLanczos.ritz, BlockLanczos.residual_estimates = logged_ritz, logged_estimates


def child(args) -> dict:
    """One measured call; runs in its own process."""
    sys.path.insert(0, str(ROOT))
    import pullgeom
    from pullgeom.backends import lanczos_backend

    torch.set_num_threads(args.threads)
    vae = sd_vae()
    x = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    counts = {"push": [0, 0.0], "pull": [0, 0.0]}  # vectors, seconds

    def counted(kind, method):
        def wrapper(self, vectors, index):
            start = time.perf_counter()
            out = method(self, vectors, index)
            counts[kind][0] += vectors.shape[0] * vectors.shape[1] // max(index.numel(), 1)
            counts[kind][1] += time.perf_counter() - start
            if args.verbose:
                print(f"  {kind} {counts[kind][0]} at {time.perf_counter() - t0:.0f} s", file=sys.stderr,
                      flush=True)
            return out
        return wrapper

    if args.verbose:
        log_lanczos_steps(lambda: time.perf_counter() - t0)
    recorded = lanczos_backend.RecordedJacobian
    recorded.push = counted("push", recorded.push)
    recorded.pull = counted("pull", recorded.pull)
    with torch.no_grad():
        start = time.perf_counter()
        vae.encode(x)
        forward_s = time.perf_counter() - start
    flops = lanczos_backend._forward_flops(pullgeom.api.build_problem(vae, x)[0], x.device)
    load_before = load()
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    result = pullgeom.spectrum(vae, x, k=args.k, backend=args.backend, tol=args.tol)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    lam = result.eigenvalues[0]
    return {
        "size": args.size, "k": args.k, "tol": args.tol, "threads": args.threads, "backend": result.backend,
        "complete": bool(result.complete.all()), "wall_s": wall, "cpu_s_per_thread": cpu / args.threads,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "forward_s": forward_s, "forward_gflops": flops / 1e9,
        "push_vectors": counts["push"][0], "push_s_each": counts["push"][1] / max(counts["push"][0], 1),
        "pull_vectors": counts["pull"][0], "pull_s_each": counts["pull"][1] / max(counts["pull"][0], 1),
        "eigenvalues": lam.tolist(), "residual_over_lambda1": (
            [] if result.residuals is None else (result.residuals[0] / lam[0]).tolist()),
        "load_before": load_before, "load_after": load(),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image side (the issue's target: 256)")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", default="auto", help="'auto' (the target) or a backend's name")
    parser.add_argument("--tol", type=float, default=None,
                        help="spectrum(tol=): top-k residuals <= tol * lambda_1 (default: the library's, 1e-5)")
    parser.add_argument("--verbose", action="store_true", help="log every product (to stderr)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    command = [sys.executable, __file__, "--child", "--size", str(args.size), "--k", str(args.k),
               "--threads", str(args.threads), "--backend", args.backend]
    command += [] if args.tol is None else ["--tol", str(args.tol)]
    command += ["--verbose"] if args.verbose else []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PULLGEOM_AUTOTUNE": "0"}
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env, check=True)
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["torch"] = torch.__version__
    for key, value in row.items():
        shown = f"{value:.4g}" if isinstance(value, float) else (
            "[" + ", ".join(f"{v:.4g}" for v in value) + "]" if isinstance(value, list) else value)
        print(f"{key:>22}: {shown}")


if __name__ == "__main__":
    main()
