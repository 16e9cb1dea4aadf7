// Block-wide sum shared by the CUDA kernels: every thread of the block passes its value and
// receives the total. blockDim.x must be a power of two; scratch holds blockDim.x values.
#pragma once

template <typename T>
__device__ T block_sum(T value, T* scratch) {
  const int tid = threadIdx.x;
  scratch[tid] = value;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (tid < stride) scratch[tid] += scratch[tid + stride];
    __syncthreads();
  }
  const T total = scratch[0];
  __syncthreads();  // scratch is reused by the next call
  return total;
}
