"""Build pullgeom's native extension ``pullgeom._C``.

The C++ CPU kernels (csrc/*.cpp, csrc/cpu/*.cpp, OpenMP) are always built. The CUDA kernels
(csrc/cuda/*.cu and their torch glue) are added when torch was built with CUDA and nvcc is
found, or when FORCE_CUDA=1; PULLGEOM_NO_CUDA=1 turns them off. A machine without CUDA
therefore always gets a working CPU-only build.
"""

import glob
import os

from setuptools import setup


def extensions():
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension
    import torch

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    if not sources:
        return []
    want_cuda = os.environ.get("FORCE_CUDA") == "1" or (
        torch.cuda.is_available() or torch.version.cuda is not None) and CUDA_HOME is not None
    if os.environ.get("PULLGEOM_NO_CUDA") == "1":
        want_cuda = False
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


def cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(ext_modules=extensions(), cmdclass=cmdclass())
