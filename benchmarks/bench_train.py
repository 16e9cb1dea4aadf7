"""Vectorised beta sweep vs training the same models one after another.

Times ``steps`` optimiser steps of M paper VAEs (784-256-256-512-32, batch 128) trained as
one stack (``StackedVAE``: one batched matmul per layer) and as M separate stacks of one,
interleaving the two and repeating to damp noise from other processes; prints and appends
a CSV row (device, torch version, M, seconds per step each way, speedup).

    python benchmarks/bench_train.py [--models 8] [--steps 10] [--repeats 3] [--csv FILE]
"""

import argparse
import statistics
import time

import torch

from pullgeom.paper.training import SweepConfig, SweepGroup, log_spaced, train_epoch


def seconds_per_step(models: int, steps: int, device: str) -> tuple[float, float]:
    images = torch.rand(128 * steps, 784)
    config = SweepConfig(betas=log_spaced(0.01, 10, models), mixup=[0.0], epochs=1, batch_size=128)
    stacked = SweepGroup(config, list(range(models)), torch.device(device), torch.float32)
    singles = [SweepGroup(config, [i], torch.device(device), torch.float32) for i in range(models)]
    train_epoch(stacked, images[:256], progress=False)  # warm-up
    start = time.perf_counter()
    train_epoch(stacked, images, progress=False)
    together = (time.perf_counter() - start) / steps
    start = time.perf_counter()
    for group in singles:
        train_epoch(group, images, progress=False)
    one_by_one = (time.perf_counter() - start) / steps
    return together, one_by_one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--csv", default=None)
    args = parser.parse_args()
    runs = [seconds_per_step(args.models, args.steps, args.device) for _ in range(args.repeats)]
    together = statistics.median(r[0] for r in runs)
    one_by_one = statistics.median(r[1] for r in runs)
    row = (f"{args.device},{torch.__version__},{torch.get_num_threads()},{args.models},{together:.5f},"
           f"{one_by_one:.5f},{one_by_one / together:.2f}")
    print("device,torch,threads,models,stacked_s_per_step,sequential_s_per_step,speedup")
    print(row)
    if args.csv:
        with open(args.csv, "a") as handle:
            handle.write(row + "\n")


if __name__ == "__main__":
    main()
