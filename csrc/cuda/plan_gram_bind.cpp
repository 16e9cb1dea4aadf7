// Torch glue of pullgeom::plan_gram on CUDA (compiled only in CUDA builds): checks, buffers,
// and the sequence of kernels from plan_gram_cuda.cu (the same chain as csrc/cpu/plan_gram_cpu.cpp).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "kernels.h"

namespace pullgeom {
namespace {

#define PULLGEOM_CUDA_CHECK(call)                                                                   \
  do {                                                                                              \
    const cudaError_t status = (call);                                                              \
    TORCH_CHECK(status == cudaSuccess, "pullgeom: plan_gram kernel failed: ", cudaGetErrorString(status)); \
  } while (0)

template <typename T>
cuda::MatrixView<const T> view(const at::Tensor& t, int64_t batch_stride, int64_t row_stride, int64_t col_stride,
                               int64_t offset = 0) {
  return {t.data_ptr<T>() + offset, batch_stride, row_stride, col_stride};
}

template <typename T>
cuda::MatrixView<T> out_view(at::Tensor& t, int64_t batch_stride, int64_t row_stride, int64_t col_stride,
                             int64_t offset = 0) {
  return {t.data_ptr<T>() + offset, batch_stride, row_stride, col_stride};
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> run_chain(const PlanShape& shape, const at::Tensor& x, at::TensorList weights,
                                             at::TensorList biases, at::IntArrayRef activations,
                                             at::ArrayRef<double> params, at::ArrayRef<double> thresholds,
                                             const at::Tensor& mu_weight, const at::Tensor& s_weight,
                                             const at::Tensor& s_bias, int64_t sigma, bool stochastic,
                                             const std::optional<at::Tensor>& latent_sqrt,
                                             const at::Tensor& first_gram, cudaStream_t stream) {
  const int64_t batch = shape.batch, layers = static_cast<int64_t>(weights.size()), dz = shape.latent;
  const std::vector<int64_t>& w = shape.widths;
  // Forward: pre = h W_l^T + b_l, then act/act' in place.
  std::vector<at::Tensor> slopes;
  at::Tensor h = x;
  for (int64_t l = 0; l < layers; ++l) {
    at::Tensor pre = at::empty({batch, w[l + 1]}, x.options());
    PULLGEOM_CUDA_CHECK(cuda::launch_gemm<T>(1, batch, w[l + 1], w[l], view<T>(h, 0, w[l], 1),
                                             view<T>(weights[l], 0, 1, w[l]), out_view<T>(pre, 0, w[l + 1], 1),
                                             nullptr, 1, biases[l].data_ptr<T>(), stream));
    at::Tensor slope = at::empty_like(pre);
    PULLGEOM_CUDA_CHECK(cuda::launch_activation<T>(pre.numel(), activations[l], params[l], thresholds[l],
                                                   pre.data_ptr<T>(), slope.data_ptr<T>(), stream));
    slopes.push_back(slope);
    h = pre;
  }
  const int64_t last = w[layers];
  at::Tensor out2;
  if (stochastic) {
    out2 = at::empty({batch, dz}, x.options());
    PULLGEOM_CUDA_CHECK(cuda::launch_gemm<T>(1, batch, dz, last, view<T>(h, 0, last, 1), view<T>(s_weight, 0, 1, last),
                                             out_view<T>(out2, 0, dz, 1), nullptr, 1, s_bias.data_ptr<T>(), stream));
  }
  T* out2_ptr = stochastic ? out2.data_ptr<T>() : nullptr;
  int64_t r = shape.heads;
  at::Tensor rows = at::empty({batch, r, last}, x.options());
  if (!latent_sqrt.has_value()) {
    PULLGEOM_CUDA_CHECK(cuda::launch_head_rows<T>(batch, dz, last, sigma, stochastic, false, mu_weight.data_ptr<T>(),
                                                  s_weight.data_ptr<T>(), out2_ptr, rows.data_ptr<T>(), stream));
  } else {
    // K^{1/2} C: G_z^{1/2} times each head block.
    PULLGEOM_CUDA_CHECK(cuda::launch_gemm<T>(batch, dz, last, dz, view<T>(*latent_sqrt, dz * dz, dz, 1),
                                             view<T>(mu_weight, 0, last, 1), out_view<T>(rows, r * last, last, 1),
                                             nullptr, 1, nullptr, stream));
    if (stochastic) {
      at::Tensor sigma_rows = at::empty({batch, dz, last}, x.options());
      PULLGEOM_CUDA_CHECK(cuda::launch_head_rows<T>(batch, dz, last, sigma, true, true, mu_weight.data_ptr<T>(),
                                                    s_weight.data_ptr<T>(), out2_ptr, sigma_rows.data_ptr<T>(), stream));
      PULLGEOM_CUDA_CHECK(cuda::launch_gemm<T>(batch, dz, last, dz, view<T>(*latent_sqrt, dz * dz, dz, 1),
                                               view<T>(sigma_rows, dz * last, last, 1),
                                               out_view<T>(rows, r * last, last, 1, dz * last), nullptr, 1, nullptr,
                                               stream));
    }
  }
  auto compress_if_needed = [&](int64_t width) {
    if (r <= width) return;
    at::Tensor compressed = at::empty({batch, width, width}, x.options());
    PULLGEOM_CUDA_CHECK(cuda::launch_compress<T>(batch, r, width, rows.data_ptr<T>(), compressed.data_ptr<T>(), stream));
    rows = compressed;
    r = width;
  };
  compress_if_needed(last);
  // Reverse chain: R <- (R D_l) W_l, D_l applied while the GEMM loads R.
  for (int64_t l = layers - 1; l >= 1; --l) {
    at::Tensor next = at::empty({batch, r, w[l]}, x.options());
    PULLGEOM_CUDA_CHECK(cuda::launch_gemm<T>(1, batch * r, w[l], w[l + 1], view<T>(rows, 0, w[l + 1], 1),
                                             view<T>(weights[l], 0, w[l], 1), out_view<T>(next, 0, w[l], 1),
                                             slopes[l].data_ptr<T>(), r, nullptr, stream));
    rows = next;
    compress_if_needed(w[l]);
  }
  const int64_t w1 = w[1];
  PULLGEOM_CUDA_CHECK(cuda::launch_scale_rows<T>(batch, r, w1, slopes[0].data_ptr<T>(), rows.data_ptr<T>(), stream));
  TORCH_INTERNAL_ASSERT(r == shape.rank, "row count ", r, " differs from the rank bound ", shape.rank);
  at::Tensor projected = at::empty({batch, r, w1}, x.options());
  PULLGEOM_CUDA_CHECK(cuda::launch_gemm<T>(1, batch * r, w1, w1, view<T>(rows, 0, w1, 1), view<T>(first_gram, 0, w1, 1),
                                           out_view<T>(projected, 0, w1, 1), nullptr, 1, nullptr, stream));
  at::Tensor gram = at::empty({batch, r, r}, x.options());
  PULLGEOM_CUDA_CHECK(cuda::launch_gemm<T>(batch, r, r, w1, view<T>(projected, r * w1, w1, 1),
                                           view<T>(rows, r * w1, 1, w1), out_view<T>(gram, r * r, r, 1), nullptr, 1,
                                           nullptr, stream));
  PULLGEOM_CUDA_CHECK(cuda::launch_symmetrize<T>(batch, r, gram.data_ptr<T>(), stream));
  return {gram, rows};
}

std::tuple<at::Tensor, at::Tensor> plan_gram_cuda(const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                                                  at::IntArrayRef activations, at::ArrayRef<double> params,
                                                  at::ArrayRef<double> thresholds, const at::Tensor& mu_weight,
                                                  const at::Tensor& s_weight, const at::Tensor& s_bias, int64_t sigma,
                                                  bool stochastic, const std::optional<at::Tensor>& latent_sqrt,
                                                  const at::Tensor& first_gram) {
  const PlanShape shape = check_plan_gram(x, weights, biases, activations, params, thresholds, mu_weight, s_weight,
                                          s_bias, sigma, stochastic, latent_sqrt, first_gram);
  TORCH_CHECK(x.is_cuda(), "pullgeom: x must be a CUDA tensor here");
  const c10::cuda::CUDAGuard guard(x.device());
  if (shape.batch == 0)
    return {x.new_zeros({0, shape.rank, shape.rank}), x.new_zeros({0, shape.rank, shape.widths[1]})};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  std::tuple<at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "plan_gram_cuda", [&] {
    result = run_chain<scalar_t>(shape, x, weights, biases, activations, params, thresholds, mu_weight, s_weight,
                                 s_bias, sigma, stochastic, latent_sqrt, first_gram, stream);
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(pullgeom, CUDA, m) { m.impl("plan_gram", &plan_gram_cuda); }

}  // namespace pullgeom
