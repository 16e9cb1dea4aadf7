"""Throughput of ``pullgeom score`` and ``pullgeom train`` in one process and under torchrun.

Times whole commands, as a user runs them (``python -m pullgeom ...`` against
``torchrun --nproc_per_node=P -m pullgeom ...``), at two sizes. Reports the end-to-end rate at
the larger size, and the difference of the work over the difference of the two wall times: the
rate once the fixed costs (interpreter and torch start-up, process group, data loading) are paid,
with the fixed cost beside it. That difference is only as good as two wall times on a noisy
machine, so read the end-to-end rate first. Loopback only; every run is bounded by
``--timeout``. Prints a markdown table and appends CSV rows tagged with the host, the torch
version, the device and the load average (other jobs' load changes the numbers) to ``--csv``.

    python benchmarks/bench_distributed.py --configs 1x1 1x2 2x1
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(procs: int, threads: int, args: list[str]) -> list[str]:
    """``procs`` processes of ``threads`` torch threads each (torchrun only for more than one)."""
    cli = ["-m", "pullgeom", "--quiet", "--threads", str(threads), *args]
    if procs == 1:
        return [sys.executable, *cli]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", "--nnodes=1",
            "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *cli]


def _seconds(command: list[str], timeout: float) -> float:
    # Same backend in every configuration (a torchrun launch pins the first eligible one).
    env = {**os.environ, "PULLGEOM_AUTOTUNE": "0"}
    env.pop("TRITON_INTERPRET", None)
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return seconds


def _marginal(work: tuple[int, int], seconds: tuple[float, float]) -> tuple[float, float]:
    """(units per second beyond the fixed cost, fixed cost in seconds) from two sizes."""
    rate = (work[1] - work[0]) / max(seconds[1] - seconds[0], 1e-9)
    return rate, seconds[0] - work[0] / rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["1x1", "1x2", "2x1"],
                        help="PROCESSESxTHREADS: 1x2 is one process on both cores, 2x1 torchrun's default")
    parser.add_argument("--score-sizes", type=int, nargs=2, default=[500, 2000], help="images scored")
    parser.add_argument("--train-sizes", type=int, nargs=2, default=[1024, 4096], help="training images")
    parser.add_argument("--betas", type=int, default=4, help="models in the sweep")
    parser.add_argument("--tasks", nargs="+", default=["score", "train"], choices=["score", "train"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--csv", default=str(HERE.parent / ".benchmarks" / "distributed.csv"))
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        betas = [f"{10 ** (-2 + 3 * i / max(args.betas - 1, 1)):.4g}" for i in range(args.betas)]
        data = ["--dataset", "mnist-small", "--epochs", "1", "--batch-size", "128"]
        train = ["train", *data, "--beta", *betas]
        checkpoint = tmp / "model"  # the model scored: trained briefly, so its spectrum is not random's
        _seconds(_command(1, 1, ["train", *data, "--beta", "1", "--limit", "256", "--out", str(checkpoint)]),
                 args.timeout)
        score = ["score", "--checkpoint", str(checkpoint / "models" / "beta=1_mixup=0"), "--dataset",
                 "mnist-small", "--split", "train"]
        runs: dict[tuple, list[float]] = {}
        # Repeats interleave the configurations, so a burst of load from elsewhere hits them alike;
        # the median of the repeats is reported.
        tasks = [t for t in (("score", score, args.score_sizes), ("train", train, args.train_sizes))
                 if t[0] in args.tasks]
        load = os.getloadavg()[0]
        for repeat in range(args.repeats):
            for config in args.configs:
                procs, threads = (int(v) for v in config.split("x"))
                for task, command, sizes in tasks:
                    for n in sizes:
                        out = tmp / f"{task}-{config}-{n}-{repeat}"
                        seconds = _seconds(_command(procs, threads, [*command, "--limit", str(n), "--out",
                                                                     str(out)]), args.timeout)
                        runs.setdefault((task, config, n), []).append(seconds)
        for config in args.configs:
            for task, sizes, unit, per in (("score", args.score_sizes, "images/s", 1),
                                           ("train", args.train_sizes, "model-images/s", args.betas)):
                if task not in args.tasks:
                    continue
                times = tuple(statistics.median(runs[task, config, n]) for n in sizes)
                rate, fixed = _marginal((sizes[0] * per, sizes[1] * per), times)
                rows.append({"task": task, "config": config, "sizes": f"{sizes[0]}/{sizes[1]}",
                             "seconds": f"{times[0]:.1f}/{times[1]:.1f}",
                             "end_to_end": f"{sizes[1] * per / times[1]:.0f}",
                             "rate": f"{rate:.0f}", "unit": unit,
                             "fixed_s": f"{fixed:.1f}",
                             "load": f"{load:.1f}/{os.getloadavg()[0]:.1f}"})
                print(rows[-1], flush=True)

    print("\n| task | processes x threads | sizes | wall s (median) | end to end at the larger size | "
          "beyond the fixed cost | fixed cost s | load |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['config']} | {r['sizes']} | {r['seconds']} | "
              f"{r['end_to_end']} {r['unit']} | {r['rate']} {r['unit']} | {r['fixed_s']} | {r['load']} |")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{os.cpu_count()}"
    path = Path(args.csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["host", "torch", "device", *rows[0]])
        if new:
            writer.writeheader()
        for r in rows:
            writer.writerow({"host": platform.node(), "torch": torch.__version__, "device": device, **r})


if __name__ == "__main__":
    main()
