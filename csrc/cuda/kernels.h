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

// C[b] = (A[b] o S) B[b] (+ bias): M x N outputs, inner size K. `row_scale` (nullable) scales
// A's entries: A(i, k) * row_scale[(i / scale_group) * K + k], i.e. the per-sample diagonal D_l
// applied to the columns of a (batch * r) x K stack of r-row blocks. `bias` (nullable, length N).
template <typename T>
cudaError_t launch_gemm(int64_t batch, int64_t m, int64_t n, int64_t k, MatrixView<const T> a, MatrixView<const T> b,
                        MatrixView<T> c, const T* row_scale, int64_t scale_group, const T* bias,
                        cudaStream_t stream);

// In place: values[i] <- act(values[i]) and slopes[i] <- act'(pre); `code` is an Activation of
// csrc/common/chain_codes.h, checked by the caller.
template <typename T>
cudaError_t launch_activation(int64_t count, int64_t code, double param, double threshold, T* values, T* slopes,
                              cudaStream_t stream);

// Head rows without a latent metric: rows[b] = [W_mu; diag(sigma'(out2[b])) W_s] (heads x width);
// out2 (batch x dz) holds the sigma head's pre-activation and is turned into sigma' in place.
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

// All eigenpairs of symmetric (batch, n, n) by parallel cyclic Jacobi, one matrix per block:
// values (batch, n) descending, vectors (batch, n, n) as columns. `workspace` must hold
// sym_eigh_workspace_elements(n, sizeof(T)) * batch elements (0: the matrix fits in shared memory).
// A matrix with a NaN or inf entry gets NaN values and vectors.
// Jacobi costs O(n^3) per sweep on one block: beyond this size torch.linalg.eigh is the tool.
constexpr int64_t kSymEighMaxN = 1024;
size_t sym_eigh_workspace_elements(int64_t n, size_t element_size);
template <typename T>
cudaError_t launch_sym_eigh(int64_t batch, int64_t n, const T* a, T* values, T* vectors, T* workspace,
                            cudaStream_t stream);

// Top-k eigenpairs of symmetric (batch, n, n) by Lanczos with full reorthogonalisation, one
// sample per block, in float64 (same algorithm and pseudo-random restarts as the CPU kernel):
// values (batch, k), vectors (batch, n, k), residuals (batch, k), steps (batch,). `workspace`
// must hold lanczos_workspace_elements(n, k, max_steps) doubles per sample.
// The breakdown test uses T's epsilon; a NaN or inf entry gives NaN outputs and 0 steps.
size_t lanczos_workspace_elements(int64_t n, int64_t k, int64_t max_steps);
template <typename T>
cudaError_t launch_lanczos_topk(int64_t batch, int64_t n, int64_t k, int64_t max_steps, double tol, const T* a,
                                T* values, T* vectors, T* residuals, int64_t* steps, double* workspace,
                                cudaStream_t stream);

}  // namespace cuda
}  // namespace pullgeom
