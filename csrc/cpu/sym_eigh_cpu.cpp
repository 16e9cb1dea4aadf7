// pullgeom::sym_eigh on CPU: one float64 tridiagonal-QL solve per matrix, OpenMP over the batch.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "symmetric_eigen.h"

namespace pullgeom {
namespace {

std::tuple<at::Tensor, at::Tensor> sym_eigh_cpu(const at::Tensor& a) {
  check_square_batch(a, "a");
  TORCH_CHECK(a.device().is_cpu(), "pullgeom: a must be a CPU tensor here");
  const int64_t batch = a.size(0), n = a.size(1);
  auto values = at::empty({batch, n}, a.options());
  auto vectors = at::empty({batch, n, n}, a.options());
  if (batch == 0 || n == 0) return {values, vectors};
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "sym_eigh_cpu", [&] {
    const scalar_t* in = a.data_ptr<scalar_t>();
    scalar_t* out_values = values.data_ptr<scalar_t>();
    scalar_t* out_vectors = vectors.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      SymmetricEigen solver;
      for (int64_t b = begin; b < end; ++b)
        solver.solve(n, in + b * n * n, out_values + b * n, out_vectors + b * n * n);
    });
  });
  return {values, vectors};
}

}  // namespace

TORCH_LIBRARY_IMPL(pullgeom, CPU, m) { m.impl("sym_eigh", &sym_eigh_cpu); }

}  // namespace pullgeom
