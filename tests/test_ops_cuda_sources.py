"""Compile-check every csrc/cuda/*.cu file with nvcc (sm_90), so CUDA sources stay buildable on
machines without a GPU. The .cu files include no torch headers, which is what makes this work
with a bare CUDA toolkit (no cuSPARSE / cuBLAS headers needed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CUDA_SOURCES = sorted((Path(__file__).resolve().parents[1] / "csrc" / "cuda").glob("*.cu"))
NVCC = shutil.which("nvcc")


def test_there_are_cuda_sources():
    assert {path.name for path in CUDA_SOURCES} >= {"plan_gram_cuda.cu", "sym_eigh_cuda.cu"}


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=[path.name for path in CUDA_SOURCES])
def test_nvcc_compiles(source, tmp_path):
    result = subprocess.run([NVCC, "-c", "-arch=sm_90", "-std=c++17", "-Werror", "all-warnings",
                             "-o", str(tmp_path / (source.stem + ".o")), str(source)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"nvcc failed on {source.name}:\n{result.stderr}"
