"""Compile every Triton kernel of pullgeom/kernels/triton for sm_90 (H100/H200) without a GPU.

Each kernel is compiled ahead of time (``triton.compile`` on an ``ASTSource`` for
``GPUTarget("cuda", 90, 32)``, which runs the ptxas bundled with triton) in float32 and float64
at every block size its launcher can pick (Lanczos: the extremes of STEPS), with the launcher's
num_warps. A configuration fails when it does not compile or needs more shared memory than an
sm_90 block may have (227 KiB): such a kernel would raise OutOfResources at launch on the GPU.

    python scripts/compile_triton_sm90.py                 # the installed triton

The H100/H200 machines run triton 3.6; to check against it on any machine:

    pip install --target /tmp/triton36 triton==3.6.0 --no-deps
    PYTHONPATH=/tmp/triton36 python scripts/compile_triton_sm90.py

Prints one line per configuration (shared memory in bytes) and exits 1 if any failed.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from pathlib import Path

# The interpreter replaces triton.jit kernels by Python functions that cannot be compiled.
os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from pullgeom.kernels.triton import jacobi_eigh, lanczos, scaled_matmul  # noqa: E402

SM90_SHARED_BYTES = 232448  # 227 KiB: the most shared memory one block may opt into on sm_90
TARGET = GPUTarget("cuda", 90, 32)
DTYPES = ("fp32", "fp64")
# Float scalars of the kernels (tolerances); every other non-pointer argument is an integer.
FLOAT_ARGS = {"tol", "tol_sq"}


def powers_of_two(low: int, high: int) -> list[int]:
    return [1 << e for e in range(low.bit_length() - 1, high.bit_length())]


def configurations():
    """(kernel, constexprs, num_warps) for every block size the launchers can pick."""
    # launch_scaled_bmm: _block(m, 64), _block(n, 64), _block(k, 32), triton's default 4 warps.
    for block_m, block_n, block_k, has_scale in itertools.product(
            powers_of_two(16, 64), powers_of_two(16, 64), powers_of_two(16, 32), (True, False)):
        constexprs = dict(HAS_SCALE=has_scale, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
        yield scaled_matmul.scaled_bmm_kernel, constexprs, 4
    # triton_eigh: BLOCK = max(2, next_power_of_2(n)), n <= MAX_SIZE.
    for block in powers_of_two(2, jacobi_eigh.MAX_SIZE):
        yield jacobi_eigh.jacobi_eigh_kernel, dict(BLOCK=block), jacobi_eigh.num_warps(block)
    # triton_lanczos: BLOCK as above, STEPS = max(2, next_power_of_2(steps)) with steps <= n.
    # STEPS only sizes the basis tile, kept in registers (the shared memory measured is the same
    # for every STEPS of a BLOCK), so its extremes stand for the rest at a third of the time.
    for block in powers_of_two(2, lanczos.MAX_SIZE):
        for steps in sorted({2, block}):
            yield lanczos.lanczos_kernel, dict(BLOCK=block, STEPS=steps), lanczos.num_warps(block)


def signature(kernel, dtype: str, constexprs: dict) -> dict[str, str]:
    return {name: "constexpr" if name in constexprs else f"*{dtype}" if name.endswith("_ptr")
            else "fp32" if name in FLOAT_ARGS else "i32" for name in kernel.arg_names}


def main() -> int:
    print(f"triton {triton.__version__} ({Path(triton.__file__).parent}), target {TARGET}")
    failures = []
    for (kernel, constexprs, warps), dtype in itertools.product(configurations(), DTYPES):
        label = f"{kernel.__name__} {dtype} num_warps={warps} " + " ".join(
            f"{key}={value}" for key, value in constexprs.items())
        start = time.perf_counter()
        try:
            compiled = triton.compile(ASTSource(kernel, signature(kernel, dtype, constexprs), constexprs),
                                      target=TARGET, options={"num_warps": warps})
        except Exception as error:  # noqa: BLE001 - any compiler error is this script's finding
            failures.append(label)
            print(f"FAIL {label}: does not compile: {str(error).strip().splitlines()[-1][:300]}")
            continue
        shared = compiled.metadata.shared
        fits = shared <= SM90_SHARED_BYTES
        if not fits:
            failures.append(label)
        print(f"{'ok  ' if fits else 'FAIL'} {label}: shared {shared} bytes"
              + ("" if fits else f" > {SM90_SHARED_BYTES}") + f" ({time.perf_counter() - start:.1f} s)")
    print(f"{len(failures)} failed" if failures
          else "all kernels compile for sm_90 and fit its shared memory")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
