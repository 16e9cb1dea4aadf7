// Torch glue of pullgeom::lanczos_topk on CUDA (compiled only in CUDA builds).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"
#include "kernels.h"

namespace pullgeom {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lanczos_topk_cuda(const at::Tensor& a, int64_t k,
                                                                             int64_t max_steps, double tol) {
  check_lanczos(a, k, max_steps, tol);
  TORCH_CHECK(a.is_cuda(), "pullgeom: a must be a CUDA tensor here");
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t batch = a.size(0), n = a.size(1);
  auto values = at::empty({batch, k}, a.options());
  auto vectors = at::empty({batch, n, k}, a.options());
  auto residuals = at::empty({batch, k}, a.options());
  auto steps = at::empty({batch}, a.options().dtype(at::kLong));
  if (batch == 0) return {values, vectors, residuals, steps};
  // One chunk's workspace (kernels.h, kWorkspaceBudgetBytes), not the whole batch's.
  const auto per_sample = static_cast<int64_t>(cuda::lanczos_workspace_elements(n, k, max_steps));
  const int64_t chunk = cuda::workspace_chunk(batch, size_t(per_sample) * sizeof(double));
  auto workspace = at::empty({chunk * per_sample}, a.options().dtype(at::kDouble));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "lanczos_topk_cuda", [&] {
    const cudaError_t status = cuda::launch_lanczos_topk<scalar_t>(
        batch, n, k, max_steps, tol, a.data_ptr<scalar_t>(), values.data_ptr<scalar_t>(),
        vectors.data_ptr<scalar_t>(), residuals.data_ptr<scalar_t>(), steps.data_ptr<int64_t>(),
        workspace.data_ptr<double>(), chunk, stream);
    TORCH_CHECK(status == cudaSuccess, "pullgeom: lanczos_topk kernel failed: ", cudaGetErrorString(status));
  });
  return {values, vectors, residuals, steps};
}

}  // namespace

TORCH_LIBRARY_IMPL(pullgeom, CUDA, m) { m.impl("lanczos_topk", &lanczos_topk_cuda); }

}  // namespace pullgeom
