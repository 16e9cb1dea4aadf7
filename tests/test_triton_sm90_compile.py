"""Every Triton kernel compiles for sm_90 (H100/H200) in float32 and float64 at every block size
its launcher picks, within sm_90's shared memory: scripts/compile_triton_sm90.py, run here
against the installed triton. No GPU needed (triton's bundled ptxas does the compiling).

The GPU machines run triton 3.6, where a float64 tl.dot did not compile and the Jacobi kernel's
256 block needed 256 / 512 KiB of shared memory; so the check runs against that version too when
``PULLGEOM_TRITON36_PATH`` names a folder it is installed in (scripts/test.sh, hence CI, does:
``pip install --target .triton36 triton==3.6.0 --no-deps``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="needs triton")
compiler = pytest.importorskip("triton.compiler", reason="needs triton's ahead-of-time compiler")
if not hasattr(compiler, "ASTSource"):
    pytest.skip("this triton has no triton.compiler.ASTSource", allow_module_level=True)
try:
    from triton.backends.compiler import GPUTarget  # noqa: F401
    from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401 - the CUDA backend ships ptxas
except ImportError as error:
    pytest.skip(f"this triton cannot compile for CUDA ahead of time ({error})", allow_module_level=True)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compile_triton_sm90.py"


TRITON36 = os.environ.get("PULLGEOM_TRITON36_PATH")


@pytest.mark.parametrize("triton_path", [
    None,
    pytest.param(TRITON36, id="triton-3.6", marks=pytest.mark.skipif(
        not TRITON36, reason="PULLGEOM_TRITON36_PATH is not set (scripts/test.sh sets it)")),
], ids=["installed-triton", "triton-3.6"])
def test_every_triton_kernel_compiles_for_sm90_and_fits_its_shared_memory(triton_path):
    # A fresh process without TRITON_INTERPRET, which this session may set (the interpreter's
    # kernels cannot be compiled). About 3 minutes on two cores with an empty triton cache.
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    if triton_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [triton_path, env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True,
                            timeout=1800)
    report = result.stdout + result.stderr[-3000:]
    assert result.returncode == 0, report
    assert "all kernels compile for sm_90" in result.stdout, report
    if triton_path is not None:
        assert "triton 3.6." in result.stdout, report  # the path really supplied that version
    for kernel in ("scaled_bmm_kernel", "jacobi_eigh_kernel", "lanczos_kernel"):
        for dtype in ("fp32", "fp64"):
            assert f"ok   {kernel} {dtype}" in result.stdout, f"{kernel} {dtype} was not compiled"
