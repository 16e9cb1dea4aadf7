// Torch glue of pullgeom::sym_eigh on CUDA (compiled only in CUDA builds).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "kernels.h"

namespace pullgeom {
namespace {

std::tuple<at::Tensor, at::Tensor> sym_eigh_cuda(const at::Tensor& a) {
  check_square_batch(a, "a");
  TORCH_CHECK(a.is_cuda(), "pullgeom: a must be a CUDA tensor here");
  TORCH_CHECK(a.size(1) <= cuda::kSymEighMaxN, "pullgeom: a is ", a.size(1), " x ", a.size(1),
              "; the CUDA Jacobi solver takes n <= ", cuda::kSymEighMaxN, ", use torch.linalg.eigh beyond");
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t batch = a.size(0), n = a.size(1);
  auto values = at::empty({batch, n}, a.options());
  auto vectors = at::empty({batch, n, n}, a.options());
  // Matrices too big for shared memory work in a global workspace, sized for one chunk of the
  // batch (kernels.h, kWorkspaceBudgetBytes), not the whole batch.
  const auto per_matrix = static_cast<int64_t>(cuda::sym_eigh_workspace_elements(n, a.element_size()));
  const int64_t chunk = cuda::workspace_chunk(batch, size_t(per_matrix) * a.element_size());
  at::Tensor workspace = per_matrix ? at::empty({chunk * per_matrix}, a.options()) : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "sym_eigh_cuda", [&] {
    const cudaError_t status = cuda::launch_sym_eigh<scalar_t>(
        batch, n, a.data_ptr<scalar_t>(), values.data_ptr<scalar_t>(), vectors.data_ptr<scalar_t>(),
        per_matrix ? workspace.data_ptr<scalar_t>() : nullptr, chunk, stream);
    TORCH_CHECK(status == cudaSuccess, "pullgeom: sym_eigh kernel failed: ", cudaGetErrorString(status));
  });
  return {values, vectors};
}

}  // namespace

TORCH_LIBRARY_IMPL(pullgeom, CUDA, m) { m.impl("sym_eigh", &sym_eigh_cuda); }

}  // namespace pullgeom
