// pullgeom::lanczos_topk on CUDA: the CPU kernel's algorithm (csrc/cpu/lanczos_cpu.cpp: full
// reorthogonalisation, restarts on breakdown, the complement-is-an-eigenspace stop, residual
// estimates on a geometric schedule, explicit residuals) with one sample per thread block.
// Matrix-vector products use one warp per row (coalesced loads, shuffle reduction); the basis,
// the tridiagonal and its eigenvectors live in a float64 global workspace (one chunk of the
// batch at a time: kernels.h, workspace_chunk); the small tridiagonal QL solve runs on one
// thread (m <= n <= a few hundred; O(m^3) per solve).
// Breakdown threshold and NaN handling as on CPU: eps of the input dtype; NaN/inf input -> NaN.
#include <cfloat>
#include <cmath>
#include <cstdint>

#include "../common/tridiagonal_ql.h"
#include "block_reduce.cuh"
#include "kernels.h"

namespace pullgeom {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__device__ inline double random_entry(uint64_t seed, uint64_t index) {
  uint64_t z = seed * 0x9E3779B97F4A7C15ull + index + 0x632BE59BD9B4E019ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return double(z >> 11) * (2.0 / 9007199254740992.0) - 1.0;
}

__device__ double block_dot(const double* x, const double* y, int64_t n, double* scratch) {
  double partial = 0;
  for (int64_t t = threadIdx.x; t < n; t += blockDim.x) partial += x[t] * y[t];
  return block_sum(partial, scratch);
}

// out = sym(A) x, one warp per row.
template <typename T>
__device__ void matvec(const T* a, const double* x, double* out, int64_t n) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  for (int64_t r = warp; r < n; r += warps) {
    double acc = 0;
    for (int64_t c = lane; c < n; c += 32) acc += 0.5 * (double(a[r * n + c]) + double(a[c * n + r])) * x[c];
    for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, offset);
    if (lane == 0) out[r] = acc;
  }
  __syncthreads();
}

// w <- w - sum_i (q_i . w) q_i over `count` rows of `basis`, twice.
__device__ void orthogonalise(double* w, const double* basis, int64_t count, int64_t n, double* scratch) {
  for (int pass = 0; pass < 2; ++pass)
    for (int64_t i = 0; i < count; ++i) {
      const double* q = basis + i * n;
      const double c = block_dot(q, w, n, scratch);
      for (int64_t t = threadIdx.x; t < n; t += blockDim.x) w[t] -= c * q[t];
      __syncthreads();
    }
}

// A unit vector orthogonal to `count` basis rows and `extra` rows; false if none is left.
__device__ bool restart_vector(uint64_t seed, const double* basis, int64_t count, const double* extra,
                               int64_t extra_count, int64_t n, double* out, double* scratch) {
  for (int attempt = 0; attempt < 4; ++attempt) {
    for (int64_t t = threadIdx.x; t < n; t += blockDim.x) out[t] = random_entry(seed + 7919ull * attempt, t);
    __syncthreads();
    orthogonalise(out, basis, count, n, scratch);
    orthogonalise(out, extra, extra_count, n, scratch);
    const double norm = sqrt(block_dot(out, out, n, scratch));
    if (norm > 1e-8) {
      for (int64_t t = threadIdx.x; t < n; t += blockDim.x) out[t] /= norm;
      __syncthreads();
      return true;
    }
  }
  return false;
}

// Thread 0: Ritz pairs of the m-step tridiagonal; then order[] = indices by descending value.
__device__ void solve_tridiagonal(int64_t m, const double* alpha, const double* beta, double* d, double* e,
                                  double* qt, int64_t* order) {
  for (int64_t i = 0; i < m; ++i) {
    d[i] = alpha[i];
    e[i] = i + 1 < m ? beta[i] : 0.0;
    for (int64_t t = 0; t < m; ++t) qt[i * m + t] = i == t ? 1.0 : 0.0;
  }
  pullgeom::tridiagonal_ql(m, d, e, qt);  // thread 0 alone: m is small
  for (int64_t i = 0; i < m; ++i) {  // insertion sort, stable: m is small
    int64_t rank = 0;
    for (int64_t j = 0; j < m; ++j) rank += (d[j] > d[i]) || (d[j] == d[i] && j < i);
    order[rank] = i;
  }
}

template <typename T>
__global__ void lanczos_kernel(int64_t n, int64_t k, int64_t limit, double tol, const T* __restrict__ matrices,
                               T* values, T* vectors, T* residuals, int64_t* steps, double* workspace,
                               int64_t per_sample, int64_t first) {
  __shared__ double scratch[kThreads];
  __shared__ int flag;
  // Sample b (its restarts seeded by b, as on CPU) in the workspace's slot of this launch's chunk.
  const int64_t b = first + blockIdx.x;
  const int tid = threadIdx.x;
  const T* a = matrices + b * n * n;
  double* basis = workspace + int64_t(blockIdx.x) * per_sample;  // limit x n
  double* alpha = basis + limit * n;           // limit
  double* beta = alpha + limit;                // limit
  double* d = beta + limit;                    // limit
  double* e = d + limit;                       // limit
  double* qt = e + limit;                      // limit x limit
  double* w = qt + limit * limit;              // n
  double* v = w + n;                           // n
  double* y = v + n;                           // n
  double* ay = y + n;                          // n
  double* extra = ay + n;                      // k x n
  int64_t* order = reinterpret_cast<int64_t*>(extra + k * n);  // limit

  double norm2 = 0, nonfinite = 0;
  for (int64_t idx = tid; idx < n * n; idx += blockDim.x) {
    const double entry = 0.5 * (double(a[idx]) + double(a[(idx % n) * n + idx / n]));
    norm2 += entry * entry;
    nonfinite += isfinite(entry) ? 0.0 : 1.0;
  }
  if (block_sum(nonfinite, scratch) > 0) {  // NaN or inf input: every output NaN, 0 steps
    for (int64_t idx = tid; idx < n * k; idx += blockDim.x) vectors[b * n * k + idx] = T(NAN);
    for (int64_t c = tid; c < k; c += blockDim.x) {
      values[b * k + c] = T(NAN);
      residuals[b * k + c] = T(NAN);
    }
    if (tid == 0) steps[b] = 0;
    return;
  }
  const double anorm = sqrt(block_sum(norm2, scratch));
  // The input's round-off, not float64's (see csrc/cpu/lanczos_cpu.cpp): a float32 matrix's
  // repeated eigenvalue is a cluster split by ~eps32 ||A|| that must count as one eigenspace.
  const double eps = sizeof(T) == sizeof(float) ? double(FLT_EPSILON) : DBL_EPSILON;
  const double breakdown = 16.0 * double(n) * eps * anorm;
  uint64_t seed = uint64_t(b) * 1000003ull;
  restart_vector(seed, basis, 0, extra, 0, n, v, scratch);
  int64_t j = 0, segment_start = 0, next_check = k;
  bool rest_is_eigenspace = false;
  while (j < limit) {
    double* q = basis + j * n;
    for (int64_t t = tid; t < n; t += blockDim.x) q[t] = v[t];
    __syncthreads();
    matvec(a, q, w, n);
    const double alpha_j = block_dot(q, w, n, scratch);
    if (tid == 0) alpha[j] = alpha_j;
    orthogonalise(w, basis, j + 1, n, scratch);
    const double beta_j = sqrt(block_dot(w, w, n, scratch));
    ++j;
    if (!(beta_j > breakdown)) {
      if (tid == 0) beta[j - 1] = 0.0;
      if (j - segment_start == 1) {
        rest_is_eigenspace = true;
        break;
      }
      segment_start = j;
      if (j == limit || !restart_vector(++seed, basis, j, extra, 0, n, v, scratch)) break;
      continue;
    }
    if (tid == 0) beta[j - 1] = beta_j;
    for (int64_t t = tid; t < n; t += blockDim.x) v[t] = w[t] / beta_j;
    __syncthreads();
    if (j >= next_check && j < limit) {
      if (tid == 0) {
        solve_tridiagonal(j, alpha, beta, d, e, qt, order);
        const double scale = fmax(fabs(d[order[0]]), eps * anorm);
        bool converged = j >= k;
        for (int64_t i = 0; i < k && i < j && converged; ++i)
          converged = fabs(beta_j * qt[order[i] * j + (j - 1)]) <= tol * scale;
        flag = converged;
      }
      __syncthreads();
      if (flag) break;
      next_check = j + (j / 4 > 1 ? j / 4 : 1);
    }
  }
  const int64_t m = j;
  if (tid == 0) solve_tridiagonal(m, alpha, beta, d, e, qt, order);
  __syncthreads();
  const double rest_value = rest_is_eigenspace ? alpha[m - 1] : 0.0;
  const int64_t rest_copies = rest_is_eigenspace ? n - m : 0;
  int64_t taken_ritz = 0, taken_rest = 0;
  for (int64_t c = 0; c < k; ++c) {
    const bool use_ritz = taken_ritz < m && (taken_rest >= rest_copies || d[order[taken_ritz]] >= rest_value);
    double value;
    if (use_ritz) {
      const int64_t i = order[taken_ritz++];
      value = d[i];
      for (int64_t t = tid; t < n; t += blockDim.x) {
        double acc = 0;
        for (int64_t s = 0; s < m; ++s) acc += qt[i * m + s] * basis[s * n + t];
        y[t] = acc;
      }
      __syncthreads();
    } else {
      value = rest_value;
      if (!restart_vector(++seed, basis, m, extra, taken_rest, n, y, scratch)) {
        for (int64_t t = tid; t < n; t += blockDim.x) y[t] = 0.0;
        __syncthreads();
      }
      for (int64_t t = tid; t < n; t += blockDim.x) extra[taken_rest * n + t] = y[t];
      ++taken_rest;
      __syncthreads();
    }
    matvec(a, y, ay, n);
    double partial = 0;
    for (int64_t t = tid; t < n; t += blockDim.x) {
      const double diff = ay[t] - value * y[t];
      partial += diff * diff;
      vectors[b * n * k + t * k + c] = T(y[t]);
    }
    const double residual = sqrt(block_sum(partial, scratch));
    if (tid == 0) {
      values[b * k + c] = T(value);
      residuals[b * k + c] = T(residual);
    }
  }
  if (tid == 0) steps[b] = m;
}

}  // namespace

size_t lanczos_workspace_elements(int64_t n, int64_t k, int64_t max_steps) {
  const int64_t limit = max_steps < n ? max_steps : n;
  // basis, alpha/beta/d/e, qt, w/v/y/ay, extra rows, order (int64 stored in double slots)
  return size_t(limit * n + 4 * limit + limit * limit + 4 * n + k * n + limit);
}

template <typename T>
cudaError_t launch_lanczos_topk(int64_t batch, int64_t n, int64_t k, int64_t max_steps, double tol, const T* a,
                                T* values, T* vectors, T* residuals, int64_t* steps, double* workspace,
                                int64_t chunk, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  if (chunk < 1) return cudaErrorInvalidValue;
  const int64_t limit = max_steps < n ? max_steps : n;
  const auto per_sample = static_cast<int64_t>(lanczos_workspace_elements(n, k, max_steps));
  // Chunks of `chunk` samples take turns on the one workspace (kernels.h, workspace_chunk).
  for (int64_t start = 0; start < batch; start += chunk) {
    const int64_t count = batch - start < chunk ? batch - start : chunk;
    lanczos_kernel<T><<<static_cast<unsigned>(count), kThreads, 0, stream>>>(
        n, k, limit, tol, a, values, vectors, residuals, steps, workspace, per_sample, start);
    const cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess) return status;
  }
  return cudaSuccess;
}

template cudaError_t launch_lanczos_topk<float>(int64_t, int64_t, int64_t, int64_t, double, const float*, float*,
                                                float*, float*, int64_t*, double*, int64_t, cudaStream_t);
template cudaError_t launch_lanczos_topk<double>(int64_t, int64_t, int64_t, int64_t, double, const double*, double*,
                                                 double*, double*, int64_t*, double*, int64_t, cudaStream_t);

}  // namespace cuda
}  // namespace pullgeom
