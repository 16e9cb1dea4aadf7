// Emulated pullgeom::plan_gram on CUDA: launch_plan_gram from csrc/cuda/plan_gram_cuda.cu (the
// chain and its kernels, rewritten for the emulation, see cuda_emulation.h), with the buffers it
// asks for and a plain host GEMM where the CUDA build calls cuBLAS. Case: int64 header [dtype, layers, sigma, stochastic, has_latent_sqrt], int64 widths
// (layers + 1), int64 activations, float64 params, float64 thresholds (layers each), then x,
// weights[0..L), biases[0..L), mu_weight, s_weight, s_bias, latent_sqrt (if any), first_gram.
// Outputs: gram (batch, r, r), left (batch, r, w_1).
#include "plan_gram_cuda.cu"

#include "driver.h"

using namespace driver;

// The chain's buffers: a released buffer is poisoned again and kept, so a launch that still
// read it afterwards would see NaN; every guard is checked at the end.
template <typename T>
class Buffers final : public pullgeom::cuda::DeviceBuffers<T> {
 public:
  T* allocate(int64_t count) override {
    if (count <= 0) {
      error_ = "the chain asked for an empty buffer";
      count = 1;
    }
    all_.push_back(std::make_unique<Buffer<T>>("chain buffer " + std::to_string(all_.size()), count));
    return all_.back()->data();
  }
  void release(T* data) override {
    for (auto& b : all_)
      if (b->data() == data) {
        b->poison();
        return;
      }
    error_ = "the chain released a buffer it did not allocate";
  }
  std::string check() const {
    if (!error_.empty()) return error_;
    for (const auto& b : all_) {
      std::string why = b->check();
      if (!why.empty()) return why;
    }
    return "";
  }
  int64_t count_of(const T* data) const {
    for (const auto& b : all_)
      if (b->data() == data) return b->count();
    return -1;
  }

 private:
  std::vector<std::unique_ptr<Buffer<T>>> all_;
  std::string error_;
};

// The chain's GEMMs (kernels.h, Gemm) as loops on the host, which holds the emulation's "device"
// memory: cuBLAS's part on the GPU, whose correctness is not under test here, while the strides,
// shapes and order the chain asks for are.
template <typename T>
class HostGemm final : public pullgeom::cuda::Gemm<T> {
 public:
  cudaError_t operator()(int64_t batch, int64_t m, int64_t n, int64_t k, pullgeom::cuda::MatrixView<const T> a,
                         pullgeom::cuda::MatrixView<const T> b, pullgeom::cuda::MatrixView<T> c,
                         const T* bias) override {
    if (batch < 0 || m < 0 || n < 0 || k < 0 || (bias != nullptr && batch != 1)) return cudaErrorInvalidValue;
    for (int64_t s = 0; s < batch; ++s)
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < n; ++j) {
          T acc = 0;
          for (int64_t t = 0; t < k; ++t)
            acc += a.data[s * a.batch_stride + i * a.row_stride + t * a.col_stride] *
                   b.data[s * b.batch_stride + t * b.row_stride + j * b.col_stride];
          if (bias != nullptr) acc += bias[j];
          c.data[s * c.batch_stride + i * c.row_stride + j * c.col_stride] = acc;
        }
    return cudaSuccess;
  }
};

struct Case {
  std::vector<int64_t> header, widths, activations;
  std::vector<double> params, thresholds;
  std::vector<Array> arrays;  // x, weights, biases, mu_weight, s_weight, s_bias, [latent_sqrt], first_gram
};

template <typename T>
struct Inputs {
  std::vector<std::unique_ptr<Buffer<T>>> buffers;
  T* add(const std::string& name, const Array& a) {
    buffers.push_back(std::make_unique<Buffer<T>>(name, a));
    return buffers.back()->data();
  }
  std::string check() const {
    for (const auto& b : buffers) {
      std::string why = b->check();
      if (!why.empty()) return why;
    }
    return "";
  }
};

template <typename T>
void run(const Case& c, const cuda_emu::Schedule& schedule, Writer& out) {
  const int64_t layers = c.header.at(1), sigma = c.header.at(2);
  const bool stochastic = c.header.at(3) != 0, has_latent = c.header.at(4) != 0;
  Inputs<T> inputs;
  size_t next = 0;
  pullgeom::cuda::PlanGramInputs<T> in{};
  in.batch = c.arrays.at(0).size(0);
  in.layers = layers;
  in.widths = c.widths.data();
  in.x = inputs.add("x", c.arrays.at(next++));
  std::vector<const T*> weights, biases;
  for (int64_t l = 0; l < layers; ++l) weights.push_back(inputs.add("weights[" + std::to_string(l) + "]", c.arrays.at(next++)));
  for (int64_t l = 0; l < layers; ++l) biases.push_back(inputs.add("biases[" + std::to_string(l) + "]", c.arrays.at(next++)));
  in.weights = weights.data();
  in.biases = biases.data();
  in.activations = c.activations.data();
  in.params = c.params.data();
  in.thresholds = c.thresholds.data();
  in.latent = c.arrays.at(next).size(0);
  in.mu_weight = inputs.add("mu_weight", c.arrays.at(next++));
  in.s_weight = inputs.add("s_weight", c.arrays.at(next++));
  in.s_bias = inputs.add("s_bias", c.arrays.at(next++));
  in.sigma = sigma;
  in.stochastic = stochastic;
  in.latent_sqrt = has_latent ? inputs.add("latent_sqrt", c.arrays.at(next++)) : nullptr;
  in.first_gram = inputs.add("first_gram", c.arrays.at(next++));
  Buffers<T> buffers;
  T *gram = nullptr, *left = nullptr;
  int64_t r = 0;
  cuda_emu::reset();
  cuda_emu::set_schedule(schedule);
  HostGemm<T> gemm;
  const cudaError_t status = pullgeom::cuda::launch_plan_gram<T>(in, buffers, gemm, &gram, &left, &r, nullptr);
  Outcome o = outcome(status, inputs, buffers);
  const int64_t w1 = c.widths.at(1);
  if (o.status == kOk &&
      (buffers.count_of(gram) != in.batch * r * r || buffers.count_of(left) != in.batch * r * w1))
    o = {kMemoryError, "gram or left is not a chain buffer of the size the outputs need"};
  write_outcome(out, o, 2);
  if (o.status == kOk) {
    out.write(dtype_of<T>(), {in.batch, r, r}, gram);
    out.write(dtype_of<T>(), {in.batch, r, w1}, left);
  }
}

int main(int argc, char** argv) {
  return main_loop(argc, argv, [](Reader& in, Writer& out, const std::vector<cuda_emu::Schedule>& schedules) {
    Case c;
    c.header = in.ints();
    c.widths = in.ints();
    c.activations = in.ints();
    c.params = in.doubles();
    c.thresholds = in.doubles();
    const int64_t layers = c.header.at(1);
    const size_t count = 1 + 2 * size_t(layers) + 3 + (c.header.at(4) != 0 ? 1 : 0) + 1;
    for (size_t i = 0; i < count; ++i) c.arrays.push_back(in.next());
    for (const cuda_emu::Schedule& s : schedules) {
      if (c.header.at(0) == kFloat32)
        run<float>(c, s, out);
      else
        run<double>(c, s, out);
    }
  });
}
