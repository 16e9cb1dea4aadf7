"""Build pullgeom: the Python package, its C++ kernel sources and, when torch is importable here,
the compiled extension ``pullgeom._C``.

- ``pip install --no-build-isolation .`` (torch installed): the extension is compiled now,
  against that torch. The C++ CPU kernels (csrc/*.cpp, csrc/cpu/*.cpp, OpenMP) always; the CUDA
  kernels (csrc/cuda/*.cu and their torch glue) too when torch was built with CUDA and nvcc is
  found, or when FORCE_CUDA=1; PULLGEOM_NO_CUDA=1 turns them off. A machine without CUDA
  therefore always gets a working CPU-only build.
- ``pip install .`` (build isolation, pip's default): the isolated build environment has no
  torch, on purpose (pyproject.toml leaves it out of the build requirements: listing it would
  download the newest torch, gigabytes, and compile against it rather than the torch you run).
  Nothing is compiled; pullgeom.kernels.native compiles the CPU kernels against the installed torch on first
  use, from the sources shipped in the package.

Either way the sources are copied into the package as ``pullgeom/_csrc``, so an install whose
compiled extension no longer loads (torch upgraded since) recompiles instead of losing the kernels.
"""

import glob
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

# The suffixes MANIFEST.in puts in the sdist.
SOURCE_SUFFIXES = (".h", ".cuh", ".cpp", ".cu")


class BuildPyWithKernelSources(build_py):
    """build_py that also copies csrc/ into the built package as pullgeom/_csrc (for pullgeom.kernels.native).

    It first deletes the ``_C`` binary an earlier build left in the build folder (pip builds a
    local directory in place): build_ext skips an extension whose binary there is newer than its
    sources, so after a torch upgrade a rebuild from the same checkout would otherwise ship the
    binary compiled against the old torch. build_ext runs after build_py and links a fresh one."""

    def run(self) -> None:
        package = Path(self.build_lib, "pullgeom")
        for stale in package.glob("_C.*"):
            stale.unlink()
        target = package / "_csrc"
        if target.is_dir():
            shutil.rmtree(target)
        super().run()
        for source in sorted(Path("csrc").rglob("*")):
            if source.suffix in SOURCE_SUFFIXES:
                destination = target / source.relative_to("csrc")
                self.mkpath(str(destination.parent))
                self.copy_file(str(source), str(destination))


def torch_or_none():
    try:
        import torch
    except ImportError:
        return None
    return torch


def extensions(torch) -> list:
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    if not sources:
        return []
    want_cuda = os.environ.get("FORCE_CUDA") == "1" or (
        torch.cuda.is_available() or torch.version.cuda is not None) and CUDA_HOME is not None
    if os.environ.get("PULLGEOM_NO_CUDA") == "1":
        want_cuda = False
    # The same flags as pullgeom/ops.py's first-use build (CXX_FLAGS, LD_FLAGS).
    openmp = ["-fopenmp"]
    cxx = ["-O3", "-std=c++20", *openmp]  # torch 2.13 headers use C++20 features
    if want_cuda:
        cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        return [CUDAExtension("pullgeom._C", sources + cuda_sources,
                              define_macros=[("PULLGEOM_WITH_CUDA", None)],
                              # no --use_fast_math: approximate sqrt/division would cost the Jacobi
                              # rotations and the QR their accuracy
                              extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
                              extra_link_args=openmp)]
    return [CppExtension("pullgeom._C", sources, extra_compile_args=cxx, extra_link_args=openmp)]


def main() -> None:
    torch = torch_or_none()
    cmdclass = {"build_py": BuildPyWithKernelSources}
    if torch is None:
        if os.environ.get("FORCE_CUDA") == "1":
            sys.exit("pullgeom: FORCE_CUDA=1 asks for the CUDA kernels, but torch is not importable in "
                     "this build environment; install torch first and use "
                     "`pip install --no-build-isolation .`")
        print("pullgeom: torch is not importable in this build environment (pip's isolated build): no "
              "compiled extension now; pullgeom compiles its CPU kernels against the installed torch on "
              "first use. For an ahead-of-time build: `pip install --no-build-isolation .`", file=sys.stderr)
        setup(cmdclass=cmdclass)
        return
    from torch.utils.cpp_extension import BuildExtension

    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)
    setup(ext_modules=extensions(torch), cmdclass=cmdclass)


main()
