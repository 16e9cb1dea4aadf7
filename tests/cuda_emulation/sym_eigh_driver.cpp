// Emulated pullgeom::sym_eigh on CUDA: launch_sym_eigh from csrc/cuda/sym_eigh_cuda.cu (rewritten
// for the emulation, see cuda_emulation.h), with buffers as sym_eigh_bind.cpp allocates them: a
// workspace for one chunk of workspace_chunk(batch, ..., budget) matrices (kernels.h).
// Case: int64 header [dtype, workspace budget in bytes (0: the shipped kWorkspaceBudgetBytes)],
// then a (batch, n, n). Outputs: values (batch, n), vectors (batch, n, n), and int64 [chunk]
// (matrices per launch; the batch when the matrices fit in shared memory).
#include "sym_eigh_cuda.cu"

#include "driver.h"

using namespace driver;

template <typename T>
Outcome run(const Array& a_in, size_t budget, const cuda_emu::Schedule& schedule, Writer& out) {
  const int64_t batch = a_in.size(0), n = a_in.size(1);
  Buffer<T> a("a", a_in), values("values", batch * n), vectors("vectors", batch * n * n);
  const auto per_matrix = static_cast<int64_t>(pullgeom::cuda::sym_eigh_workspace_elements(n, sizeof(T)));
  const int64_t chunk = pullgeom::cuda::workspace_chunk(batch, size_t(per_matrix) * sizeof(T), budget);
  Buffer<T> workspace("workspace", chunk * per_matrix);
  cuda_emu::reset();
  cuda_emu::set_schedule(schedule);
  const cudaError_t status = pullgeom::cuda::launch_sym_eigh<T>(
      batch, n, a.data(), values.data(), vectors.data(), per_matrix ? workspace.data() : nullptr, chunk, nullptr);
  const Outcome o = outcome(status, a, values, vectors, workspace);
  write_outcome(out, o, 3);
  if (o.status == kOk) {
    values.write(out, {batch, n});
    vectors.write(out, {batch, n, n});
    out.write_ints({per_matrix ? chunk : batch});
  }
  return o;
}

int main(int argc, char** argv) {
  return main_loop(argc, argv, [](Reader& in, Writer& out, const std::vector<cuda_emu::Schedule>& schedules) {
    const std::vector<int64_t> header = in.ints();
    const Array a = in.next();
    const size_t budget = header.at(1) > 0 ? size_t(header.at(1)) : pullgeom::cuda::kWorkspaceBudgetBytes;
    for (const cuda_emu::Schedule& s : schedules) {
      if (header.at(0) == kFloat32)
        run<float>(a, budget, s, out);
      else
        run<double>(a, budget, s, out);
    }
  });
}
