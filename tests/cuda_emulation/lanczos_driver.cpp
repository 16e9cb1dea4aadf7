// Emulated pullgeom::lanczos_topk on CUDA: launch_lanczos_topk from csrc/cuda/lanczos_cuda.cu
// (rewritten for the emulation, see cuda_emulation.h), with buffers as lanczos_bind.cpp allocates
// them: a workspace for one chunk of workspace_chunk(batch, ..., budget) samples (kernels.h).
// Case: int64 header [dtype, k, max_steps, workspace budget in bytes (0: the shipped
// kWorkspaceBudgetBytes)], float64 [tol], then a (batch, n, n).
// Outputs: values (batch, k), vectors (batch, n, k), residuals (batch, k), steps (batch) int64,
// and int64 [chunk] (samples per launch).
#include "lanczos_cuda.cu"

#include "driver.h"

using namespace driver;

template <typename T>
Outcome run(const Array& a_in, int64_t k, int64_t max_steps, double tol, size_t budget,
            const cuda_emu::Schedule& schedule, Writer& out) {
  const int64_t batch = a_in.size(0), n = a_in.size(1);
  Buffer<T> a("a", a_in), values("values", batch * k), vectors("vectors", batch * n * k),
      residuals("residuals", batch * k);
  Buffer<int64_t> steps("steps", batch);
  const auto per_sample = static_cast<int64_t>(pullgeom::cuda::lanczos_workspace_elements(n, k, max_steps));
  const int64_t chunk = pullgeom::cuda::workspace_chunk(batch, size_t(per_sample) * sizeof(double), budget);
  Buffer<double> workspace("workspace", chunk * per_sample);
  cuda_emu::reset();
  cuda_emu::set_schedule(schedule);
  const cudaError_t status =
      pullgeom::cuda::launch_lanczos_topk<T>(batch, n, k, max_steps, tol, a.data(), values.data(), vectors.data(),
                                             residuals.data(), steps.data(), workspace.data(), chunk, nullptr);
  const Outcome o = outcome(status, a, values, vectors, residuals, steps, workspace);
  write_outcome(out, o, 5);
  if (o.status == kOk) {
    values.write(out, {batch, k});
    vectors.write(out, {batch, n, k});
    residuals.write(out, {batch, k});
    steps.write(out, {batch});
    out.write_ints({chunk});
  }
  return o;
}

int main(int argc, char** argv) {
  return main_loop(argc, argv, [](Reader& in, Writer& out, const std::vector<cuda_emu::Schedule>& schedules) {
    const std::vector<int64_t> header = in.ints();
    const double tol = in.doubles().at(0);
    const Array a = in.next();
    const size_t budget = header.at(3) > 0 ? size_t(header.at(3)) : pullgeom::cuda::kWorkspaceBudgetBytes;
    for (const cuda_emu::Schedule& s : schedules) {
      if (header.at(0) == kFloat32)
        run<float>(a, header.at(1), header.at(2), tol, budget, s, out);
      else
        run<double>(a, header.at(1), header.at(2), tol, budget, s, out);
    }
  });
}
