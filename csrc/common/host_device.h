// PULLGEOM_HOST_DEVICE marks the torch-free helpers of csrc/common/ that both g++ (the CPU
// kernels) and nvcc (the CUDA kernels, on host and device) compile.
#pragma once

#ifdef __CUDACC__
#define PULLGEOM_HOST_DEVICE __host__ __device__
#else
#define PULLGEOM_HOST_DEVICE
#endif
