// Launchers of pullgeom's CUDA kernels: plain C++ (raw pointers, cudaStream_t, no torch), so the
// .cu files compile with nvcc alone and the torch glue (*_bind.cpp) stays in host C++.
// Every launcher is instantiated for float and double and returns the launch's cudaError_t.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace pullgeom {
namespace cuda {

// A strided view of a batch of matrices: element (batch b, row i, column j) lives at
// data[b * batch_stride + i * row_stride + j * col_stride]; batch_stride 0 shares one matrix.
template <typename T>
struct MatrixView {
  T* data;
  int64_t batch_stride, row_stride, col_stride;
};

// The chain's matrix products, supplied by the caller: C[b] = A[b] B[b] for b < batch, M x N
// outputs, inner size K, plus `bias` (nullable, length N, added to every row; the forward layers
// pass one, and only with batch == 1), queued on the chain's stream after the work before it. The torch glue (plan_gram_bind.cpp) runs them through torch's
// matmul, i.e. cuBLAS on the current stream: a GEMM is what cuBLAS does best, and the custom
// kernels here keep only what it cannot fuse (activation with its derivative, the head rows, the
// row scaling by D_l, the QR compression). The CUDA emulation of the tests supplies a host GEMM.
// Returns cudaSuccess or the failure (the torch one throws instead, as torch ops do).
template <typename T>
class Gemm {
 public:
  virtual cudaError_t operator()(int64_t batch, int64_t m, int64_t n, int64_t k, MatrixView<const T> a,
                                 MatrixView<const T> b, MatrixView<T> c, const T* bias) = 0;

 protected:
  ~Gemm() = default;
};

// In place: values[i] <- act(values[i]) and slopes[i] <- act'(pre); `code` is an Activation of
// csrc/common/chain_codes.h, checked by the caller.
template <typename T>
cudaError_t launch_activation(int64_t count, int64_t code, double param, double threshold, T* values, T* slopes,
                              cudaStream_t stream);

// Head rows without a latent metric: rows[b] = [W_mu; diag(sigma'(out2[b])) W_s] (heads x width);
// out2 (batch x dz) holds the sigma head's pre-activation (read only; nullptr when !stochastic).
// With `sigma_rows_only`, rows[b] = diag(sigma'(out2[b])) W_s only (dz x width).
template <typename T>
cudaError_t launch_head_rows(int64_t batch, int64_t dz, int64_t width, int64_t sigma_code, bool stochastic,
                             bool sigma_rows_only, const T* mu_weight, const T* s_weight, T* out2, T* rows,
                             cudaStream_t stream);

// rows (batch, p, q), p > q -> out (batch, q, q) upper-triangular with out^T out = rows^T rows
// (Householder QR per sample, float64 accumulation). `rows` is overwritten.
template <typename T>
cudaError_t launch_compress(int64_t batch, int64_t p, int64_t q, T* rows, T* out, cudaStream_t stream);

// rows (batch, r, w) *= slopes (batch, w) broadcast over the r rows.
template <typename T>
cudaError_t launch_scale_rows(int64_t batch, int64_t r, int64_t w, const T* slopes, T* rows, cudaStream_t stream);

// gram (batch, n, n) <- (gram + gram^T) / 2 in place.
template <typename T>
cudaError_t launch_symmetrize(int64_t batch, int64_t n, T* gram, cudaStream_t stream);

// Device memory for launch_plan_gram, from the caller (the torch glue: tensors of torch's caching
// allocator): allocate() returns `count` uninitialised elements that stay valid until release()
// or the caller frees them all after the call; release() may come while work queued on the
// stream still uses the memory (stream-ordered reuse, as for a dropped tensor).
template <typename T>
class DeviceBuffers {
 public:
  virtual T* allocate(int64_t count) = 0;
  virtual void release(T* data) = 0;

 protected:
  ~DeviceBuffers() = default;
};

// The inputs of pullgeom::plan_gram, checked by the caller (check_plan_gram in csrc/checks.h),
// all contiguous device arrays of one dtype. L = layers >= 1, w_0 = N, dz = latent.
template <typename T>
struct PlanGramInputs {
  int64_t batch, layers, latent;
  const int64_t* widths;                     // host, L + 1: w_0, ..., w_L
  const T* x;                                // (batch, w_0)
  const T* const* weights;                   // host array of L device pointers: (w_{l+1}, w_l)
  const T* const* biases;                    // host array of L device pointers: (w_{l+1})
  const int64_t* activations;                // host, L codes (csrc/common/chain_codes.h)
  const double* params;                      // host, L
  const double* thresholds;                  // host, L
  const T* mu_weight;                        // (dz, w_L)
  const T* s_weight;                         // (dz, w_L)
  const T* s_bias;                           // (dz)
  int64_t sigma;                             // Sigma code
  bool stochastic;
  const T* latent_sqrt;                      // (batch, dz, dz) or nullptr
  const T* first_gram;                       // (w_1, w_1) = W_1 W_1^T
};

// The whole chain of pullgeom::plan_gram (MATH.md 2) on `stream`: the kernels above and `gemm`'s
// products in sequence. On success *gram (batch, r, r) and *left (batch, r, w_1) point at buffers
// from `buffers` (the caller keeps those two, may free the rest) and *rows = r, the row count the
// chain ended with. Returns the first failed launch's (or product's) error.
template <typename T>
cudaError_t launch_plan_gram(const PlanGramInputs<T>& in, DeviceBuffers<T>& buffers, Gemm<T>& gemm, T** gram,
                             T** left, int64_t* rows, cudaStream_t stream);

// Workspaces of the eigensolvers (Jacobi matrices that do not fit in shared memory, Lanczos bases)
// grow with the batch: 100,000 Jacobi matrices of n = 128 in float32 would take 13 GB at once, and
// Lanczos at n = 1024 some 16 MiB a sample. The launchers therefore run the batch in chunks of
// `chunk` samples that reuse one workspace of `chunk` samples (launches on one stream run in
// order, so a chunk starts after the previous one is done with it). The budget, 2 GiB (under 3%
// of an H100's memory), holds thousands of the common workspaces (n <= 128: at most ~400 KiB a
// sample), so those chunks fill the GPU many times over and the extra launches cost microseconds
// against milliseconds of work each; of the largest (n = 1024: 8-24 MiB a sample) it holds about
// a hundred, close to one block per SM of an H100 (132 SMs), where each block works for seconds.
constexpr size_t kWorkspaceBudgetBytes = size_t(2) << 30;

// Samples per chunk: as many as `budget_bytes` holds at `bytes_per_sample` each, at least 1, at
// most `batch` (at least 1 when batch is 0, so the caller can size a workspace of chunk samples).
inline int64_t workspace_chunk(int64_t batch, size_t bytes_per_sample, size_t budget_bytes = kWorkspaceBudgetBytes) {
  const int64_t fits = bytes_per_sample == 0 ? batch : static_cast<int64_t>(budget_bytes / bytes_per_sample);
  const int64_t chunk = fits < batch ? fits : batch;
  return chunk > 1 ? chunk : 1;
}

// All eigenpairs of symmetric (batch, n, n) by parallel cyclic Jacobi, one matrix per block:
// values (batch, n) descending, vectors (batch, n, n) as columns. `workspace` must hold
// sym_eigh_workspace_elements(n, sizeof(T)) * min(chunk, batch) elements (0: the matrix fits in
// shared memory, and the batch goes in one launch); chunk >= 1 (see workspace_chunk).
// A matrix with a NaN or inf entry gets NaN values and vectors.
// Jacobi costs O(n^3) per sweep on one block: beyond this size torch.linalg.eigh is the tool.
constexpr int64_t kSymEighMaxN = 1024;
size_t sym_eigh_workspace_elements(int64_t n, size_t element_size);
template <typename T>
cudaError_t launch_sym_eigh(int64_t batch, int64_t n, const T* a, T* values, T* vectors, T* workspace,
                            int64_t chunk, cudaStream_t stream);

// Top-k eigenpairs of symmetric (batch, n, n) by Lanczos with full reorthogonalisation, one
// sample per block, in float64 (same algorithm and pseudo-random restarts as the CPU kernel):
// values (batch, k), vectors (batch, n, k), residuals (batch, k), steps (batch,). `workspace`
// must hold lanczos_workspace_elements(n, k, max_steps) doubles for each of min(chunk, batch)
// samples; chunk >= 1 (see workspace_chunk).
// The breakdown test uses T's epsilon; a NaN or inf entry gives NaN outputs and 0 steps.
size_t lanczos_workspace_elements(int64_t n, int64_t k, int64_t max_steps);
template <typename T>
cudaError_t launch_lanczos_topk(int64_t batch, int64_t n, int64_t k, int64_t max_steps, double tol, const T* a,
                                T* values, T* vectors, T* residuals, int64_t* steps, double* workspace,
                                int64_t chunk, cudaStream_t stream);

}  // namespace cuda
}  // namespace pullgeom
