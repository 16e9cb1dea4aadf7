"""What one Jacobian product costs, in forwards, by each way the ``lanczos`` backend can take it.

The rows behind ``auto``'s cost model (``CHAIN_PRODUCT_F``, ``TAPE_PRODUCT_F``, ``VJP_F`` in
``pullgeom/backends/lanczos_backend.py``) and BENCHMARKS.md's "Per-product costs":

- ``layer chain``: ``LayerChainJacobian``, hand-written products of a traced Conv/Linear chain
  (CelebA encoder only: the SD encoder is no chain);
- ``op tape``: ``OpTape``, the aten ops of one forward walked forwards (J v) and backwards (J^T u);
- ``recorded graphs``: ``torch.func.vjp``'s pullback (J^T u, also one ``autograd`` VJP row) and
  its VJP at 0 (the double-VJP J v), what the tape replaced and what in-place encoders still get;
- ``torch.func.jvp``: a fresh forward-mode pass per J v (reruns the forward).

Each row: the median of ``--repeats`` calls after a warm-up, and that over one plain forward's
median in the same run, float32. Encoders: the paper's CelebA encoder (random weights, B = 16,
1 thread by default) and, with ``--sd SIZE``, Stable Diffusion's VAE encoder (``bench_sd_vae.sd_vae``,
one SIZE x SIZE image).

    python benchmarks/bench_products.py                    # CelebA, 1 thread
    python benchmarks/bench_products.py --sd 256 --threads 2 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.func import jvp, vjp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pullgeom.api import build_problem  # noqa: E402
from pullgeom.encoder_output import heads_function  # noqa: E402
from pullgeom.tracing.layer_chain import LayerChainJacobian  # noqa: E402
from pullgeom.tracing.op_tape import OpTape  # noqa: E402


def median_seconds(call, repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def encoder_and_inputs(args):
    if args.sd:
        from bench_sd_vae import sd_vae

        vae = sd_vae()
        x = torch.rand(1, 3, args.sd, args.sd, generator=torch.Generator().manual_seed(1)) * 2 - 1
        return vae, x, f"SD VAE encoder, 1 x 3 x {args.sd} x {args.sd}"
    from pullgeom.paper.models import CelebAEncoder

    torch.manual_seed(0)
    encoder = CelebAEncoder(128).eval()
    return encoder, torch.rand(16, 3, 64, 64, generator=torch.Generator().manual_seed(1)), "CelebA encoder, B = 16"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sd", type=int, default=0, help="Stable Diffusion's VAE encoder at this image side")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, x, name = encoder_and_inputs(args)
    problem, _ = build_problem(model, x)
    heads = heads_function(problem.encoder, problem.sigma, problem.stochastic)
    with torch.no_grad():
        out = heads(x)
    v, u = torch.randn_like(x), torch.randn_like(out)
    rows = []

    def row(label, call):
        rows.append((label, median_seconds(call, args.repeats)))

    with torch.no_grad():
        row("encoder forward", lambda: heads(x))
    if problem.trace.chains is not None:
        chain = LayerChainJacobian(problem.trace.chains, x, problem.sigma, problem.stochastic)
        everyone = torch.arange(x.shape[0])
        row("layer chain J v", lambda: chain.push(v.flatten(1).unsqueeze(0), everyone))
        row("layer chain J^T u", lambda: chain.pull(u.unsqueeze(0), everyone))
    tape = OpTape(heads, x)
    row("op tape J v", lambda: tape.jvp(v))
    row("op tape J^T u", lambda: tape.vjp(u))
    _, pullback = vjp(heads, x)
    _, pushforward = vjp(lambda w: pullback(w)[0], torch.zeros_like(out))
    row("recorded graphs, double-VJP J v", lambda: pushforward(v))
    row("recorded graphs, J^T u (one autograd VJP row)", lambda: pullback(u))
    row("torch.func.jvp (reruns the forward)", lambda: jvp(heads, (x,), (v,)))
    forward = rows[0][1]
    print(f"{name}, float32, {args.threads} thread(s), torch {torch.__version__}, median of {args.repeats}")
    print("| one call | ms | forwards |")
    print("|---|---:|---:|")
    for label, seconds in rows:
        print(f"| {label} | {seconds * 1e3:.1f} | {seconds / forward:.2f} |")


if __name__ == "__main__":
    main()
