// Emulated pullgeom::sym_eigh on CUDA: launch_sym_eigh from csrc/cuda/sym_eigh_cuda.cu (rewritten
// for the emulation, see cuda_emulation.h), with buffers as sym_eigh_bind.cpp allocates them.
// Case: int64 header [dtype], then a (batch, n, n). Outputs: values (batch, n), vectors (batch, n, n).
#include "sym_eigh_cuda.cu"

#include "driver.h"

using namespace driver;

template <typename T>
Outcome run(const Array& a_in, const cuda_emu::Schedule& schedule, Writer& out) {
  const int64_t batch = a_in.size(0), n = a_in.size(1);
  Buffer<T> a("a", a_in), values("values", batch * n), vectors("vectors", batch * n * n);
  const size_t per_matrix = pullgeom::cuda::sym_eigh_workspace_elements(n, sizeof(T));
  Buffer<T> workspace("workspace", batch * int64_t(per_matrix));
  cuda_emu::reset();
  cuda_emu::set_schedule(schedule);
  const cudaError_t status = pullgeom::cuda::launch_sym_eigh<T>(batch, n, a.data(), values.data(), vectors.data(),
                                                                per_matrix ? workspace.data() : nullptr, nullptr);
  const Outcome o = outcome(status, a, values, vectors, workspace);
  write_outcome(out, o, 2);
  if (o.status == kOk) {
    values.write(out, {batch, n});
    vectors.write(out, {batch, n, n});
  }
  return o;
}

int main(int argc, char** argv) {
  return main_loop(argc, argv, [](Reader& in, Writer& out, const std::vector<cuda_emu::Schedule>& schedules) {
    const std::vector<int64_t> header = in.ints();
    const Array a = in.next();
    for (const cuda_emu::Schedule& s : schedules) {
      if (header.at(0) == kFloat32)
        run<float>(a, s, out);
      else
        run<double>(a, s, out);
    }
  });
}
