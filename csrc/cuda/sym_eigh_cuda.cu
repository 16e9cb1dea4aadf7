// pullgeom::sym_eigh on CUDA: parallel cyclic Jacobi, one matrix per thread block.
//
// Each sweep runs n' - 1 rounds (n' = n rounded up to even; the padding row/column is zero) of
// the round-robin ("chess tournament") ordering: n'/2 disjoint pairs (p, q) per round, so their
// rotations commute and are applied together, A <- J^T A J (rows, then columns) and V <- V J.
// A and V sit in shared memory when they fit in 100 KiB (opt-in above the default 48 KiB:
// n <= 110 in float32, n <= 78 in float64), else in a global workspace sized for one chunk of
// the batch (kernels.h, workspace_chunk), the chunks launched in turn. Sweeps stop when the
// off-diagonal mass is below (n eps)^2 ||A||_F^2, at most 20 (checked in a float64/float32 NumPy
// model of this exact rotation order: 3 to 8 sweeps for n = 3 to 64).
// A matrix with a NaN or inf entry gets NaN eigenvalues and eigenvectors.
#include <cfloat>
#include <cmath>

#include "block_reduce.cuh"
#include "kernels.h"

namespace pullgeom {
namespace cuda {
namespace {

constexpr int kMaxSweeps = 20;
constexpr size_t kSharedLimit = 100 * 1024;

template <typename T>
struct Limits;
template <>
struct Limits<float> {
  static constexpr float eps = FLT_EPSILON;
  static constexpr float big = 1e15f;  // theta beyond this: t = 1 / (2 theta) (theta^2 would lose it)
};
template <>
struct Limits<double> {
  static constexpr double eps = DBL_EPSILON;
  static constexpr double big = 1e150;
};

__device__ inline void round_robin_pair(int np, int round, int i, int& p, int& q) {
  const int m = np - 1;  // players 0..m-1 rotate, player m is fixed
  if (i == 0) {
    p = round;
    q = m;
  } else {
    p = (round + i) % m;
    q = (round - i + m) % m;
  }
  if (p > q) {
    const int t = p;
    p = q;
    q = t;
  }
}

template <typename T>
__global__ void jacobi_kernel(int n, const T* __restrict__ a, T* __restrict__ values, T* __restrict__ vectors,
                              T* __restrict__ workspace, int64_t first) {
  extern __shared__ unsigned char shared_bytes[];
  const int np = n + (n & 1), half = np / 2, tid = threadIdx.x, threads = blockDim.x;
  const int64_t b = first + blockIdx.x;  // the matrix; its workspace slot is this chunk's blockIdx.x
  T* scratch = reinterpret_cast<T*>(shared_bytes);  // blockDim.x
  T* cosines = scratch + threads;                  // half
  T* sines = cosines + half;                       // half
  T* A = workspace != nullptr ? workspace + int64_t(blockIdx.x) * 2 * np * np : sines + half;
  T* V = A + np * np;
  const T* source = a + b * n * n;
  for (int idx = tid; idx < np * np; idx += threads) {
    const int i = idx / np, j = idx % np;
    A[idx] = (i < n && j < n) ? T(0.5) * (source[i * n + j] + source[j * n + i]) : T(0);
    V[idx] = i == j ? T(1) : T(0);
  }
  __syncthreads();
  T frobenius = 0, nonfinite = 0;
  for (int idx = tid; idx < np * np; idx += threads) {
    frobenius += A[idx] * A[idx];
    nonfinite += isfinite(A[idx]) ? T(0) : T(1);
  }
  if (block_sum(nonfinite, scratch) > T(0)) {
    // NaN or inf input: all NaN. Sweeping would stop at once and return the (maybe finite)
    // diagonal, and NaN eigenvalues would break the ranking below (unwritten slots).
    for (int i = tid; i < n; i += threads) values[b * n + i] = T(NAN);
    for (int idx = tid; idx < n * n; idx += threads) vectors[b * n * n + idx] = T(NAN);
    return;
  }
  frobenius = block_sum(frobenius, scratch);
  const T eps = Limits<T>::eps;
  const T stop = T(n) * T(n) * eps * eps * frobenius;
  for (int sweep = 0; sweep < kMaxSweeps; ++sweep) {
    T off = 0;
    for (int idx = tid; idx < np * np; idx += threads)
      if (idx / np != idx % np) off += A[idx] * A[idx];
    off = block_sum(off, scratch);
    if (!(off > stop)) break;
    for (int round = 0; round < np - 1; ++round) {
      for (int i = tid; i < half; i += threads) {
        int p, q;
        round_robin_pair(np, round, i, p, q);
        const T apq = A[p * np + q];
        T c = 1, s = 0;
        if (apq != T(0)) {
          const T theta = (A[q * np + q] - A[p * np + p]) / (T(2) * apq);
          const T abs_theta = fabs(theta);
          T t = abs_theta > Limits<T>::big ? T(0.5) / abs_theta : T(1) / (abs_theta + sqrt(abs_theta * abs_theta + T(1)));
          if (theta < 0) t = -t;
          c = T(1) / sqrt(t * t + T(1));
          s = t * c;
        }
        cosines[i] = c;
        sines[i] = s;
      }
      __syncthreads();
      for (int idx = tid; idx < half * np; idx += threads) {  // rows: A <- J^T A
        const int pair = idx / np, j = idx % np;
        int p, q;
        round_robin_pair(np, round, pair, p, q);
        const T c = cosines[pair], s = sines[pair];
        const T ap = A[p * np + j], aq = A[q * np + j];
        A[p * np + j] = c * ap - s * aq;
        A[q * np + j] = s * ap + c * aq;
      }
      __syncthreads();
      for (int idx = tid; idx < half * np; idx += threads) {  // columns: A <- A J, V <- V J
        const int pair = idx / np, j = idx % np;
        int p, q;
        round_robin_pair(np, round, pair, p, q);
        const T c = cosines[pair], s = sines[pair];
        const T ap = A[j * np + p], aq = A[j * np + q];
        A[j * np + p] = c * ap - s * aq;
        A[j * np + q] = s * ap + c * aq;
        const T vp = V[j * np + p], vq = V[j * np + q];
        V[j * np + p] = c * vp - s * vq;
        V[j * np + q] = s * vp + c * vq;
      }
      __syncthreads();
    }
  }
  // Descending order: eigenvalue i goes to the slot given by its rank (ties by index); the
  // ranks are kept in `scratch` (blockDim.x >= n, see jacobi_threads).
  for (int i = tid; i < n; i += threads) {
    const T value = A[i * np + i];
    int rank = 0;
    for (int j = 0; j < n; ++j) {
      const T other = A[j * np + j];
      rank += (other > value) || (other == value && j < i);
    }
    scratch[i] = T(rank);
    values[b * n + rank] = value;
  }
  __syncthreads();
  for (int idx = tid; idx < n * n; idx += threads) {
    const int i = idx / n, row = idx % n;
    vectors[b * n * n + row * n + static_cast<int>(scratch[i])] = V[row * np + i];
  }
}

// A power of two (block_sum) and at least n (the rank scratch); n <= kSymEighMaxN.
template <typename T>
int jacobi_threads(int64_t n) {
  return n <= 16 ? 64 : n <= 32 ? 128 : n <= 64 ? 256 : n <= 512 ? 512 : 1024;
}

template <typename T>
size_t jacobi_shared_bytes(int64_t n, bool matrices_in_shared) {
  const int64_t np = n + (n & 1);
  const size_t base = (jacobi_threads<T>(n) + np) * sizeof(T);
  return matrices_in_shared ? base + 2 * np * np * sizeof(T) : base;
}

}  // namespace

size_t sym_eigh_workspace_elements(int64_t n, size_t element_size) {
  const int64_t np = n + (n & 1);
  const size_t base = (element_size == sizeof(float) ? jacobi_threads<float>(n) : jacobi_threads<double>(n)) + np;
  return (base + 2 * np * np) * element_size <= kSharedLimit ? 0 : size_t(2 * np * np);
}

template <typename T>
cudaError_t launch_sym_eigh(int64_t batch, int64_t n, const T* a, T* values, T* vectors, T* workspace,
                            int64_t chunk, cudaStream_t stream) {
  if (batch == 0 || n == 0) return cudaSuccess;
  if (n > kSymEighMaxN || chunk < 1) return cudaErrorInvalidValue;
  const bool in_shared = sym_eigh_workspace_elements(n, sizeof(T)) == 0;
  const size_t bytes = jacobi_shared_bytes<T>(n, in_shared);
  if (bytes > 48 * 1024) {
    const cudaError_t status =
        cudaFuncSetAttribute(jacobi_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
    if (status != cudaSuccess) return status;
  }
  // Matrices in shared memory need no workspace: the whole batch in one launch (grid.x takes
  // 2^31 - 1 blocks). Otherwise chunks of `chunk` matrices take turns on the one workspace.
  const int64_t step = in_shared ? batch : chunk;
  for (int64_t start = 0; start < batch; start += step) {
    const int64_t count = batch - start < step ? batch - start : step;
    jacobi_kernel<T><<<static_cast<unsigned>(count), jacobi_threads<T>(n), bytes, stream>>>(
        static_cast<int>(n), a, values, vectors, in_shared ? nullptr : workspace, start);
    const cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess) return status;
  }
  return cudaSuccess;
}

template cudaError_t launch_sym_eigh<float>(int64_t, int64_t, const float*, float*, float*, float*, int64_t,
                                            cudaStream_t);
template cudaError_t launch_sym_eigh<double>(int64_t, int64_t, const double*, double*, double*, double*, int64_t,
                                             cudaStream_t);

}  // namespace cuda
}  // namespace pullgeom
