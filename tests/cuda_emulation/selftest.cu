// The emulation's own semantics (cuda_emulation.h), checked on small kernels written in plain
// CUDA and rewritten like csrc/cuda: warp intrinsics, barriers and what breaks them, schedules,
// shared memory poisoning, launch limits. Prints "ok NAME" or "FAIL NAME: why" per check; exits 1
// if any failed. Run by tests/test_cuda_emulated.py::test_emulator_semantics.
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

namespace {

int failures = 0;

void check(bool ok, const char* name, const std::string& why = "") {
  std::printf("%s %s%s%s\n", ok ? "ok" : "FAIL", name, ok ? "" : ": ", ok ? "" : why.c_str());
  if (!ok) ++failures;
}

void use(const char* schedule) {
  cuda_emu::Schedule s;
  cuda_emu::parse_schedule(schedule, s);
  cuda_emu::set_schedule(s);
  cuda_emu::reset();
}

const char* const kSchedules[] = {"forward", "reverse", "random:7"};

// out[t] = the value each intrinsic returns in thread t (blockDim.x = 64: two warps).
__global__ void shuffles(int* out) {
  const int t = threadIdx.x, lane = t % 32;
  out[0 * 64 + t] = __shfl_down_sync(0xffffffffu, 100 + lane, 3);
  out[1 * 64 + t] = __shfl_up_sync(0xffffffffu, 100 + lane, 5, 16);
  out[2 * 64 + t] = __shfl_xor_sync(0xffffffffu, 100 + lane, 6);
  out[3 * 64 + t] = __shfl_sync(0xffffffffu, 100 + lane, 9, 8);
  out[4 * 64 + t] = static_cast<int>(__ballot_sync(0xffffffffu, lane % 3 == 0));
  out[5 * 64 + t] = __any_sync(0xffffffffu, t == 40) + 2 * __all_sync(0xffffffffu, lane < 32);
  double acc = lane + 0.5;  // the warp sum of lanczos_cuda.cu's matvec
  for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, offset);
  out[6 * 64 + t] = static_cast<int>(acc * 2);
}

void test_shuffles() {
  for (const char* schedule : kSchedules) {
    use(schedule);
    std::vector<int> out(7 * 64, -1);
    shuffles<<<1, 64>>>(out.data());
    std::string why = cuda_emu::failure();
    for (int t = 0; t < 64 && why.empty(); ++t) {
      const int lane = t % 32;
      const int expected[7] = {
          100 + (lane + 3 < 32 ? lane + 3 : lane),
          100 + (lane % 16 >= 5 ? lane - 5 : lane),
          100 + (lane ^ 6),
          100 + (lane - lane % 8) + 9 % 8,
          static_cast<int>(0x49249249u),  // lanes 0, 3, 6, ..., 30
          t < 32 ? 2 : 3,                 // any: only the second warp has t == 40
          lane == 0 ? 2 * 512 : out[6 * 64 + t],  // lane 0 holds the sum 0.5 + 1.5 + ... + 31.5
      };
      for (int i = 0; i < 7; ++i)
        if (out[i * 64 + t] != expected[i])
          why = "intrinsic " + std::to_string(i) + " thread " + std::to_string(t) + ": " +
                std::to_string(out[i * 64 + t]) + " != " + std::to_string(expected[i]);
    }
    check(why.empty(), (std::string("shuffles ") + schedule).c_str(), why);
  }
}

// Thread t writes buf[t], then (without a barrier) reads its neighbour's slot.
__global__ void racy(float* out) {
  __shared__ float buf[32];
  buf[threadIdx.x] = float(threadIdx.x);
  out[threadIdx.x] = buf[(threadIdx.x + 1) % 32];
}

__global__ void race_free(float* out) {
  __shared__ float buf[32];
  buf[threadIdx.x] = float(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = buf[(threadIdx.x + 1) % 32];
}

void test_schedules_expose_a_missing_barrier() {
  std::vector<float> forward(32), reverse(32), fixed(32);
  use("forward");
  racy<<<1, 32>>>(forward.data());
  use("reverse");
  racy<<<1, 32>>>(reverse.data());
  // Forward: thread t < 31 reads slot t + 1 before thread t + 1 ran: the poison (NaN); reverse:
  // only thread 31, which runs first, reads an unwritten slot (0).
  check(std::isnan(forward[0]) && forward[31] == 0.0f && reverse[0] == 1.0f && std::isnan(reverse[31]),
        "a missing barrier reads poison under forward, the value under reverse");
  bool all_right = true;
  for (const char* schedule : kSchedules) {
    use(schedule);
    race_free<<<1, 32>>>(fixed.data());
    for (int t = 0; t < 32; ++t) all_right &= fixed[t] == float((t + 1) % 32);
  }
  check(all_right, "with the barrier every schedule reads the neighbour's value");
}

__global__ void divergent_barrier() {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

__global__ void barrier_in_a_branch(int* out) {
  if (threadIdx.x == 0) __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void shuffle_with_an_exited_lane(int* out) {
  if (threadIdx.x == 3) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, int(threadIdx.x), 1);
}

__global__ void shuffle_at_two_sites(int* out) {
  if (threadIdx.x % 2)
    out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1, 1);
  else
    out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 2, 1);
}

__global__ void early_exit_then_barrier(int* out) {
  if (threadIdx.x >= 10) return;  // legal: exited threads do not take part in barriers
  __shared__ int total;
  if (threadIdx.x == 0) total = 0;
  __syncthreads();
  atomicAdd(&total, 1);
  __syncthreads();
  out[threadIdx.x] = total;
}

void test_broken_synchronisation_fails_the_launch() {
  std::vector<int> out(64, 0);
  use("forward");
  divergent_barrier<<<1, 32>>>();
  check(cuda_emu::failure().find("divergent __syncthreads") != std::string::npos &&
            cudaGetLastError() == cudaErrorLaunchFailure,
        "__syncthreads at two places", cuda_emu::failure());
  use("reverse");
  barrier_in_a_branch<<<1, 32>>>(out.data());
  check(cuda_emu::failure().empty(), "one thread's __syncthreads while the rest returned is allowed",
        cuda_emu::failure());
  use("forward");
  shuffle_with_an_exited_lane<<<1, 32>>>(out.data());
  check(cuda_emu::failure().find("deadlock") != std::string::npos, "a shuffle whose mask names a returned lane",
        cuda_emu::failure());
  use("forward");
  shuffle_at_two_sites<<<1, 32>>>(out.data());
  check(cuda_emu::failure().find("divergent warp") != std::string::npos, "lanes at two different shuffles",
        cuda_emu::failure());
  bool ten = true;
  for (const char* schedule : kSchedules) {
    use(schedule);
    early_exit_then_barrier<<<1, 64>>>(out.data());
    for (int t = 0; t < 10; ++t) ten &= out[t] == 10;
    ten &= cuda_emu::failure().empty();
  }
  check(ten, "threads that returned early leave the barrier to the others");
}

// Block order and thread indices: each thread appends its (block, thread) to a log.
__global__ void log_order(int* log, int* count) {
  const int slot = atomicAdd(count, 1);
  log[2 * slot] = blockIdx.x + 10 * blockIdx.y;
  log[2 * slot + 1] = threadIdx.x + 10 * threadIdx.y + 100 * threadIdx.z;
}

void test_orders() {
  std::vector<int> log(2 * 4 * 12), count(1);
  use("forward");
  count[0] = 0;
  log_order<<<dim3(2, 2), dim3(3, 2, 2)>>>(log.data(), count.data());
  bool forward = count[0] == 48 && log[0] == 0 && log[1] == 0 && log[2 * 11 + 1] == 112 && log[2 * 12] == 1 &&
                 log[2 * 47] == 11;
  check(forward, "forward: blocks and threads in index order, x fastest");
  use("reverse");
  count[0] = 0;
  log_order<<<dim3(2, 2), dim3(3, 2, 2)>>>(log.data(), count.data());
  check(count[0] == 48 && log[0] == 11 && log[1] == 112 && log[2 * 47] == 0 && log[2 * 47 + 1] == 0,
        "reverse: blocks and threads in reverse index order");
  use("random:3");
  count[0] = 0;
  log_order<<<dim3(2, 2), dim3(3, 2, 2)>>>(log.data(), count.data());
  std::vector<int> seen(4 * 12, 0);
  bool in_order = true;
  for (int i = 0; i < 48; ++i) {
    const int t = log[2 * i + 1];
    ++seen[12 * (log[2 * i] % 10 + 2 * (log[2 * i] / 10)) + t % 10 + 3 * (t / 10 % 10) + 6 * (t / 100)];
    if (i > 0 && log[2 * i] == log[2 * i - 2] && log[2 * i + 1] < log[2 * i - 1]) in_order = false;
  }
  bool each_once = true;
  for (int v : seen) each_once &= v == 1;
  check(each_once && !in_order, "random: every thread once, not in index order");
}

__global__ void read_shared_first(float* out, int* flags) {
  extern __shared__ float dynamic[];
  __shared__ int counter;
  __shared__ double slots[4];
  if (threadIdx.x == 0) {
    out[blockIdx.x] = dynamic[3];  // unwritten in this block: poison
    flags[blockIdx.x] = counter;   // written by the previous block: poisoned again since
    out[2 + blockIdx.x] = float(slots[1]);
    dynamic[3] = 1.0f;
    counter = 5;
    slots[1] = 2.0;
  }
}

__global__ void big_shared() {
  extern __shared__ unsigned char bytes[];
  bytes[threadIdx.x] = 1;
}

void test_shared_memory_and_limits() {
  std::vector<float> out(4, 0.0f);
  std::vector<int> flags(2, 0);
  use("forward");
  read_shared_first<<<2, 32, 64 * sizeof(float)>>>(out.data(), flags.data());
  check(std::isnan(out[0]) && std::isnan(out[1]) && flags[0] == -1 && flags[1] == -1 && std::isnan(out[2]) &&
            std::isnan(out[3]),
        "shared memory is poisoned before every block");
  use("forward");
  big_shared<<<1, 1025>>>();
  check(cudaGetLastError() == cudaErrorInvalidConfiguration, "1025 threads a block are refused");
  use("forward");
  big_shared<<<1, 32, 64 * 1024>>>();
  check(cudaGetLastError() == cudaErrorInvalidConfiguration, "64 KiB of dynamic shared memory need the attribute");
  use("forward");
  check(cudaFuncSetAttribute(big_shared, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024) == cudaSuccess,
        "the attribute can be raised to 64 KiB");
  big_shared<<<1, 32, 64 * 1024>>>();
  check(cudaGetLastError() == cudaSuccess && cuda_emu::failure().empty(), "then 64 KiB launch");
  check(cudaFuncSetAttribute(big_shared, cudaFuncAttributeMaxDynamicSharedMemorySize, 228 * 1024) ==
            cudaErrorInvalidValue,
        "but not beyond sm_90's 227 KiB");
  use("forward");
  big_shared<<<dim3(1, 65536), 32>>>();
  check(cudaGetLastError() == cudaErrorInvalidConfiguration, "grid.y > 65535 is refused");
}

}  // namespace

int main() {
  test_shuffles();
  test_schedules_expose_a_missing_barrier();
  test_broken_synchronisation_fails_the_launch();
  test_orders();
  test_shared_memory_and_limits();
  std::printf("%d failed\n", failures);
  return failures ? 1 : 0;
}
