// Torch glue of pullgeom::plan_gram on CUDA (compiled only in CUDA builds): checks, buffers and
// the GEMMs (cuBLAS, through torch's matmul ops) for launch_plan_gram (plan_gram_cuda.cu), the
// same chain as csrc/cpu/plan_gram_cpu.cpp.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <unordered_map>
#include <utility>
#include <vector>

#include "../checks.h"
#include "kernels.h"

namespace pullgeom {
namespace {

// DeviceBuffers over tensors of torch's caching allocator: a released buffer is a dropped tensor,
// whose memory the allocator reuses in stream order.
template <typename T>
class TensorBuffers final : public cuda::DeviceBuffers<T> {
 public:
  explicit TensorBuffers(const at::TensorOptions& options) : options_(options) {}

  T* allocate(int64_t count) override {
    TORCH_INTERNAL_ASSERT(count > 0, "plan_gram asked for an empty buffer");
    at::Tensor buffer = at::empty({count}, options_);
    T* data = buffer.data_ptr<T>();
    tensors_.emplace(data, std::move(buffer));
    return data;
  }
  void release(T* data) override { tensors_.erase(data); }
  // The tensor holding `data`, viewed as `sizes`.
  at::Tensor take(T* data, at::IntArrayRef sizes) const { return tensors_.at(data).view(sizes); }

 private:
  at::TensorOptions options_;
  std::unordered_map<T*, at::Tensor> tensors_;
};

// The chain's GEMMs through torch's matmul ops: cuBLAS (strided batched where batch > 1) on the
// current stream, the stream the chain's own kernels run on. The views wrap the chain's device
// pointers without copying; every product's shape is exact, so no out= tensor is resized. float32
// follows torch's matmul precision setting (TF32 only where the user allowed it), as the `torch`
// backend does.
template <typename T>
class TorchGemm final : public cuda::Gemm<T> {
 public:
  explicit TorchGemm(const at::TensorOptions& options) : options_(options) {}

  cudaError_t operator()(int64_t batch, int64_t m, int64_t n, int64_t k, cuda::MatrixView<const T> a,
                         cuda::MatrixView<const T> b, cuda::MatrixView<T> c, const T* bias) override {
    if (bias != nullptr && batch != 1) return cudaErrorInvalidValue;
    if (batch == 0 || m == 0 || n == 0) return cudaSuccess;
    at::Tensor out = view(c, batch, m, n);
    const at::Tensor left = view(a, batch, m, k), right = view(b, batch, k, n);
    if (batch > 1) {
      at::bmm_out(out, left, right);
    } else if (bias != nullptr) {
      out = out.squeeze(0);
      at::addmm_out(out, at::from_blob(const_cast<T*>(bias), {n}, options_), left.squeeze(0), right.squeeze(0));
    } else {
      out = out.squeeze(0);
      at::mm_out(out, left.squeeze(0), right.squeeze(0));
    }
    return cudaSuccess;
  }

 private:
  // Batch stride 0 (one matrix for every sample) is an expanded view, which torch's bmm passes to
  // cuBLAS as a zero stride.
  template <typename V>
  at::Tensor view(const cuda::MatrixView<V>& v, int64_t batch, int64_t rows, int64_t cols) const {
    return at::from_blob(const_cast<T*>(v.data), {batch, rows, cols}, {v.batch_stride, v.row_stride, v.col_stride},
                         options_);
  }
  at::TensorOptions options_;
};

template <typename T>
std::tuple<at::Tensor, at::Tensor> run_chain(const PlanShape& shape, const at::Tensor& x, at::TensorList weights,
                                             at::TensorList biases, at::IntArrayRef activations,
                                             at::ArrayRef<double> params, at::ArrayRef<double> thresholds,
                                             const at::Tensor& mu_weight, const at::Tensor& s_weight,
                                             const at::Tensor& s_bias, int64_t sigma, bool stochastic,
                                             const std::optional<at::Tensor>& latent_sqrt,
                                             const at::Tensor& first_gram, cudaStream_t stream) {
  const auto layers = static_cast<int64_t>(weights.size());
  std::vector<const T*> weight_data, bias_data;
  for (int64_t l = 0; l < layers; ++l) {
    weight_data.push_back(weights[l].data_ptr<T>());
    bias_data.push_back(biases[l].data_ptr<T>());
  }
  cuda::PlanGramInputs<T> in{};
  in.batch = shape.batch;
  in.layers = layers;
  in.latent = shape.latent;
  in.widths = shape.widths.data();
  in.x = x.data_ptr<T>();
  in.weights = weight_data.data();
  in.biases = bias_data.data();
  in.activations = activations.data();
  in.params = params.data();
  in.thresholds = thresholds.data();
  in.mu_weight = mu_weight.data_ptr<T>();
  in.s_weight = s_weight.data_ptr<T>();
  in.s_bias = s_bias.data_ptr<T>();
  in.sigma = sigma;
  in.stochastic = stochastic;
  in.latent_sqrt = latent_sqrt.has_value() ? latent_sqrt->data_ptr<T>() : nullptr;
  in.first_gram = first_gram.data_ptr<T>();
  TensorBuffers<T> buffers(x.options());
  T *gram = nullptr, *left = nullptr;
  int64_t r = 0;
  TorchGemm<T> gemm(x.options());
  const cudaError_t status = cuda::launch_plan_gram<T>(in, buffers, gemm, &gram, &left, &r, stream);
  TORCH_CHECK(status == cudaSuccess, "pullgeom: plan_gram kernel failed: ", cudaGetErrorString(status));
  TORCH_INTERNAL_ASSERT(r == shape.rank, "row count ", r, " differs from the rank bound ", shape.rank);
  return {buffers.take(gram, {shape.batch, r, r}), buffers.take(left, {shape.batch, r, shape.widths[1]})};
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
