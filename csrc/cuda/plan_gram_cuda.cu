// pullgeom::plan_gram on CUDA: the building blocks of the MLP chain (MATH.md 2) and
// launch_plan_gram, which sequences them: forward GEMM + fused activation/derivative per layer,
// head rows, then the reverse chain R <- (R D_l) W_l as one GEMM per layer over all B*r rows
// (R scaled by D_l in place first), a per-sample Householder QR wherever the rows outnumber the
// next width, and finally gram = (R W_1 W_1^T) R^T. The B x 2dz x N Jacobian is never formed.
// The GEMMs are the caller's (kernels.h, Gemm: cuBLAS through torch in plan_gram_bind.cpp, which
// also checks the arguments and hands the chain tensors as buffers).
#include <cmath>
#include <vector>

#include "../common/chain_codes.h"
#include "kernels.h"

namespace pullgeom {
namespace cuda {
namespace {

template <typename T>
__global__ void activation_kernel(int64_t count, Activation code, T param, T threshold, T* values, T* slopes) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x) {
    T out, slope;
    activation_and_derivative(code, param, threshold, values[i], out, slope);
    values[i] = out;
    slopes[i] = slope;
  }
}

template <typename T>
__global__ void head_rows_kernel(int64_t batch, int64_t dz, int64_t width, Sigma sigma_code, bool stochastic,
                                 bool sigma_rows_only, const T* mu_weight, const T* s_weight, const T* out2,
                                 T* rows) {
  const int64_t mu_rows = sigma_rows_only ? 0 : dz;
  const int64_t heads = mu_rows + (stochastic ? dz : 0);
  const int64_t total = batch * heads * width;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = idx % width, i = (idx / width) % heads, b = idx / (width * heads);
    rows[idx] = i < mu_rows ? mu_weight[i * width + j]
                            : sigma_derivative(sigma_code, out2[b * dz + (i - mu_rows)]) *
                                  s_weight[(i - mu_rows) * width + j];
  }
}

template <typename T>
__global__ void compress_kernel(int64_t p, int64_t q, T* rows, T* out) {
  __shared__ double scratch[256];
  __shared__ double shared_alpha, shared_vnorm2;
  const int64_t b = blockIdx.x;
  T* a = rows + b * p * q;
  const int tid = threadIdx.x;
  for (int64_t j = 0; j < q; ++j) {
    double partial = 0;
    for (int64_t i = j + tid; i < p; i += blockDim.x) partial += double(a[i * q + j]) * double(a[i * q + j]);
    scratch[tid] = partial;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
      if (tid < stride) scratch[tid] += scratch[tid + stride];
      __syncthreads();
    }
    if (tid == 0) {
      const double norm2 = scratch[0], top = double(a[j * q + j]);
      const double alpha = top > 0 ? -sqrt(norm2) : sqrt(norm2);
      shared_alpha = alpha;
      shared_vnorm2 = norm2 - 2 * alpha * top + alpha * alpha;
    }
    __syncthreads();
    const double alpha = shared_alpha, vnorm2 = shared_vnorm2;
    if (vnorm2 > 0) {
      // v = a[j:, j] - alpha e_1; H = I - 2 v v^T / ||v||^2 on columns j+1..q-1 (one thread each).
      for (int64_t col = j + 1 + tid; col < q; col += blockDim.x) {
        double dot = (double(a[j * q + j]) - alpha) * double(a[j * q + col]);
        for (int64_t i = j + 1; i < p; ++i) dot += double(a[i * q + j]) * double(a[i * q + col]);
        const double factor = 2 * dot / vnorm2;
        a[j * q + col] = T(double(a[j * q + col]) - factor * (double(a[j * q + j]) - alpha));
        for (int64_t i = j + 1; i < p; ++i) a[i * q + col] = T(double(a[i * q + col]) - factor * double(a[i * q + j]));
      }
      __syncthreads();
      if (tid == 0) a[j * q + j] = T(alpha);
    }
    __syncthreads();
  }
  for (int64_t idx = tid; idx < q * q; idx += blockDim.x) {
    const int64_t i = idx / q, col = idx % q;
    out[b * q * q + idx] = col >= i ? a[i * q + col] : T(0);
  }
}

template <typename T>
__global__ void scale_rows_kernel(int64_t batch, int64_t r, int64_t w, const T* slopes, T* rows) {
  const int64_t total = batch * r * w;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x)
    rows[idx] *= slopes[(idx / (r * w)) * w + idx % w];
}

template <typename T>
__global__ void symmetrize_kernel(int64_t batch, int64_t n, T* gram) {
  const int64_t total = batch * n * n;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = idx / (n * n), i = (idx / n) % n, j = idx % n;
    if (i < j) {
      T* upper = gram + b * n * n + i * n + j;
      T* lower = gram + b * n * n + j * n + i;
      const T mean = T(0.5) * (*upper + *lower);
      *upper = mean;
      *lower = mean;
    }
  }
}

unsigned grid_for(int64_t count, int threads) {
  const int64_t blocks = (count + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535);
}

}  // namespace

template <typename T>
cudaError_t launch_activation(int64_t count, int64_t code, double param, double threshold, T* values, T* slopes,
                              cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  activation_kernel<T><<<grid_for(count, 256), 256, 0, stream>>>(count, static_cast<Activation>(code), T(param),
                                                                  T(threshold), values, slopes);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_head_rows(int64_t batch, int64_t dz, int64_t width, int64_t sigma_code, bool stochastic,
                             bool sigma_rows_only, const T* mu_weight, const T* s_weight, T* out2, T* rows,
                             cudaStream_t stream) {
  const int64_t heads = (sigma_rows_only ? 0 : dz) + (stochastic ? dz : 0);
  if (batch == 0 || heads == 0) return cudaSuccess;
  head_rows_kernel<T><<<grid_for(batch * heads * width, 256), 256, 0, stream>>>(
      batch, dz, width, static_cast<Sigma>(sigma_code), stochastic, sigma_rows_only, mu_weight, s_weight, out2, rows);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_compress(int64_t batch, int64_t p, int64_t q, T* rows, T* out, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  compress_kernel<T><<<static_cast<unsigned>(batch), 128, 0, stream>>>(p, q, rows, out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_scale_rows(int64_t batch, int64_t r, int64_t w, const T* slopes, T* rows, cudaStream_t stream) {
  if (batch * r * w == 0) return cudaSuccess;
  scale_rows_kernel<T><<<grid_for(batch * r * w, 256), 256, 0, stream>>>(batch, r, w, slopes, rows);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_symmetrize(int64_t batch, int64_t n, T* gram, cudaStream_t stream) {
  if (batch * n == 0) return cudaSuccess;
  symmetrize_kernel<T><<<grid_for(batch * n * n, 256), 256, 0, stream>>>(batch, n, gram);
  return cudaGetLastError();
}

// Each buffer is released as soon as the chain is done with it (stream-ordered reuse).
template <typename T>
cudaError_t launch_plan_gram(const PlanGramInputs<T>& in, DeviceBuffers<T>& buffers, Gemm<T>& gemm, T** gram_out,
                             T** left_out, int64_t* rows_out, cudaStream_t stream) {
#define PULLGEOM_RETURN_IF_FAILED(call)          \
  do {                                           \
    const cudaError_t status_ = (call);          \
    if (status_ != cudaSuccess) return status_;  \
  } while (0)
  const int64_t batch = in.batch, layers = in.layers, dz = in.latent;
  const int64_t* w = in.widths;
  // Forward: pre = h W_l^T + b_l, then act/act' in place.
  std::vector<T*> slopes;
  const T* h = in.x;
  T* h_owned = nullptr;  // the previous layer's pre (h), released when the next replaces it
  for (int64_t l = 0; l < layers; ++l) {
    T* pre = buffers.allocate(batch * w[l + 1]);
    PULLGEOM_RETURN_IF_FAILED(gemm(1, batch, w[l + 1], w[l], {h, 0, w[l], 1}, {in.weights[l], 0, 1, w[l]},
                                   {pre, 0, w[l + 1], 1}, in.biases[l]));
    T* slope = buffers.allocate(batch * w[l + 1]);
    PULLGEOM_RETURN_IF_FAILED(launch_activation<T>(batch * w[l + 1], in.activations[l], in.params[l],
                                                   in.thresholds[l], pre, slope, stream));
    slopes.push_back(slope);
    if (h_owned != nullptr) buffers.release(h_owned);
    h = h_owned = pre;
  }
  const int64_t last = w[layers];
  T* out2 = nullptr;
  if (in.stochastic) {
    out2 = buffers.allocate(batch * dz);
    PULLGEOM_RETURN_IF_FAILED(
        gemm(1, batch, dz, last, {h, 0, last, 1}, {in.s_weight, 0, 1, last}, {out2, 0, dz, 1}, in.s_bias));
  }
  int64_t r = in.stochastic ? 2 * dz : dz;
  T* rows = buffers.allocate(batch * r * last);
  if (in.latent_sqrt == nullptr) {
    PULLGEOM_RETURN_IF_FAILED(launch_head_rows<T>(batch, dz, last, in.sigma, in.stochastic, false, in.mu_weight,
                                                  in.s_weight, out2, rows, stream));
  } else {
    // K^{1/2} C: G_z^{1/2} times each head block.
    PULLGEOM_RETURN_IF_FAILED(gemm(batch, dz, last, dz, {in.latent_sqrt, dz * dz, dz, 1}, {in.mu_weight, 0, last, 1},
                                   {rows, r * last, last, 1}, nullptr));
    if (in.stochastic) {
      T* sigma_rows = buffers.allocate(batch * dz * last);
      PULLGEOM_RETURN_IF_FAILED(launch_head_rows<T>(batch, dz, last, in.sigma, true, true, in.mu_weight, in.s_weight,
                                                    out2, sigma_rows, stream));
      PULLGEOM_RETURN_IF_FAILED(gemm(batch, dz, last, dz, {in.latent_sqrt, dz * dz, dz, 1},
                                     {sigma_rows, dz * last, last, 1}, {rows + dz * last, r * last, last, 1}, nullptr));
      buffers.release(sigma_rows);
    }
  }
  // Rows outnumbering the next width: replace them by their QR's triangular factor.
  auto compress_if_needed = [&](int64_t width) -> cudaError_t {
    if (r <= width) return cudaSuccess;
    T* compressed = buffers.allocate(batch * width * width);
    const cudaError_t status = launch_compress<T>(batch, r, width, rows, compressed, stream);
    buffers.release(rows);
    rows = compressed;
    r = width;
    return status;
  };
  PULLGEOM_RETURN_IF_FAILED(compress_if_needed(last));
  // Reverse chain: R <- (R D_l) W_l, one GEMM over all batch * r rows.
  for (int64_t l = layers - 1; l >= 1; --l) {
    PULLGEOM_RETURN_IF_FAILED(launch_scale_rows<T>(batch, r, w[l + 1], slopes[l], rows, stream));
    T* next = buffers.allocate(batch * r * w[l]);
    PULLGEOM_RETURN_IF_FAILED(gemm(1, batch * r, w[l], w[l + 1], {rows, 0, w[l + 1], 1}, {in.weights[l], 0, w[l], 1},
                                   {next, 0, w[l], 1}, nullptr));
    buffers.release(rows);
    rows = next;
    PULLGEOM_RETURN_IF_FAILED(compress_if_needed(w[l]));
  }
  const int64_t w1 = w[1];
  PULLGEOM_RETURN_IF_FAILED(launch_scale_rows<T>(batch, r, w1, slopes[0], rows, stream));
  T* projected = buffers.allocate(batch * r * w1);
  PULLGEOM_RETURN_IF_FAILED(
      gemm(1, batch * r, w1, w1, {rows, 0, w1, 1}, {in.first_gram, 0, w1, 1}, {projected, 0, w1, 1}, nullptr));
  T* gram = buffers.allocate(batch * r * r);
  PULLGEOM_RETURN_IF_FAILED(gemm(batch, r, r, w1, {projected, r * w1, w1, 1}, {rows, r * w1, 1, w1},
                                 {gram, r * r, r, 1}, nullptr));
  PULLGEOM_RETURN_IF_FAILED(launch_symmetrize<T>(batch, r, gram, stream));
#undef PULLGEOM_RETURN_IF_FAILED
  *gram_out = gram;
  *left_out = rows;
  *rows_out = r;
  return cudaSuccess;
}

#define PULLGEOM_INSTANTIATE(T)                                                                                    \
  template cudaError_t launch_activation<T>(int64_t, int64_t, double, double, T*, T*, cudaStream_t);              \
  template cudaError_t launch_head_rows<T>(int64_t, int64_t, int64_t, int64_t, bool, bool, const T*, const T*, T*, \
                                           T*, cudaStream_t);                                                     \
  template cudaError_t launch_compress<T>(int64_t, int64_t, int64_t, T*, T*, cudaStream_t);                       \
  template cudaError_t launch_scale_rows<T>(int64_t, int64_t, int64_t, const T*, T*, cudaStream_t);               \
  template cudaError_t launch_symmetrize<T>(int64_t, int64_t, T*, cudaStream_t);                                  \
  template cudaError_t launch_plan_gram<T>(const PlanGramInputs<T>&, DeviceBuffers<T>&, Gemm<T>&, T**, T**,        \
                                           int64_t*, cudaStream_t);

PULLGEOM_INSTANTIATE(float)
PULLGEOM_INSTANTIATE(double)

}  // namespace cuda
}  // namespace pullgeom
