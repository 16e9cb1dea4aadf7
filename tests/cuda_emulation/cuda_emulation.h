// A host-side emulation of the CUDA execution model, for testing pullgeom's CUDA kernels on
// machines without a GPU (tests/test_cuda_emulated.py). Test infrastructure only: the shipped
// kernels (csrc/cuda/) are plain CUDA and are compiled here by g++ unchanged, except for
// mechanical rewrites done by the test on a copy (tests/cuda_emulation/emulation.py): a launch
// `kernel<<<grid, block, shared, stream>>>(args)` becomes `::cuda_emu::launch(kernel, grid, block,
// shared, stream)(args)`, `extern __shared__ T name[];` becomes a pointer to this launch's dynamic
// shared memory, and `__shared__ T name[N];` a reference to shared_variable<T[N], id>(). g++ sees this header first (-include) and a cuda_runtime.h that is only
// this header (tests/cuda_emulation/include/).
//
// The model:
// - A launch runs its blocks one after another, in the schedule's block order. The threads of a
//   block are cooperative fibers on one OS thread: a thread runs without interruption until it
//   reaches a barrier (__syncthreads, a warp shuffle or vote, __syncwarp) or returns.
// - The schedule decides the order in which the runnable threads run between barriers: forward
//   (thread 0 first), reverse, or a seeded random permutation drawn anew for every phase. Code
//   that lacks a barrier (a thread reading what another writes in the same phase) gets another
//   answer under another order; the tests compare every order with the reference.
// - __syncthreads() releases the block once every thread that has not returned waits at it, and
//   all of them must wait at the same __syncthreads (file and line), else the launch fails
//   ("divergent __syncthreads"). Threads that returned do not take part (as on sm_70+).
// - A warp shuffle/vote is a barrier of the lanes in its mask: all of them must reach the same
//   intrinsic (line) with the same mask, and each gets the values the others passed. A lane of the
//   mask that returned, waits at __syncthreads, or does not exist fails the launch.
// - Shared memory: the rewrite turns `__shared__ T name[N];` into a reference to storage of this
//   header's (shared_variable), one per declaration and kernel instantiation, and
//   `extern __shared__` arrays into a pointer to a per-launch buffer; the threads of a block share
//   both (blocks run one at a time), and both are filled with 0xff bytes (NaN for float and
//   double, -1 for integers) before every block, so a read before the block wrote shows.
// - A launch checks its configuration as the hardware would (block <= 1024 threads, grid
//   limits, dynamic shared memory <= 48 KiB unless cudaFuncSetAttribute raised the kernel's limit,
//   which may not exceed sm_90's 227 KiB); a failure sets the error cudaGetLastError returns.
// - An emulation failure (divergence, deadlock, bad configuration) abandons the launch;
//   cuda_emu::failure() says what happened.
// Not modelled: concurrency between blocks, memory fences and atomics' ordering (a fiber is
// never interrupted, so every atomic is trivially atomic), the memory spaces' sizes other than
// dynamic shared memory, timing.
#pragma once

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#if defined(__x86_64__) && !defined(CUDA_EMU_UCONTEXT)
#define CUDA_EMU_X86_64_SWITCH 1
#endif

// ---------------------------------------------------------------- CUDA keywords and built-ins

#define __global__
#define __device__
#define __host__
#define __forceinline__
#define __shared__ static  // declarations the rewrite did not see (none in csrc/cuda)
#define __constant__ static
#define __managed__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};

// The running thread's indices: set by the scheduler before it resumes a thread's fiber.
inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
constexpr int warpSize = 32;

// ---------------------------------------------------------------- the runtime API subset

enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorLaunchFailure = 719,
};
typedef enum cudaError cudaError_t;
typedef struct CUstream_st* cudaStream_t;

enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};

namespace cuda_emu {

// ---------------------------------------------------------------- fibers

// One execution context: a stack pointer (x86-64: the registers the SysV ABI preserves are
// pushed on the fiber's own stack; about 5 ns a switch) or a ucontext (portable; ~250 ns a switch,
// as swapcontext saves the signal mask with a system call).
struct Context {
#ifdef CUDA_EMU_X86_64_SWITCH
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

#ifdef CUDA_EMU_X86_64_SWITCH
extern "C" void cuda_emu_switch(void** save_sp, void* load_sp);
// Saves rbp, rbx, r12-r15 and the SSE/x87 control words on the current stack, stores the stack
// pointer in *save_sp, loads load_sp and restores the same from there.
asm(R"(
  .text
  .p2align 4
  .type cuda_emu_switch, @function
cuda_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_emu_switch, .-cuda_emu_switch
)");
#endif

inline void switch_context(Context& from, Context& to) {
#ifdef CUDA_EMU_X86_64_SWITCH
  cuda_emu_switch(&from.sp, to.sp);
#else
  swapcontext(&from.uc, &to.uc);
#endif
}

// A fiber stack with a guard page below it (an overflow faults instead of corrupting memory).
struct Stack {
  static constexpr size_t kBytes = 256 * 1024, kGuard = 4096;
  char* base = nullptr;
  Stack() {
    void* memory = mmap(nullptr, kBytes + kGuard, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                        -1, 0);
    if (memory == MAP_FAILED) {
      std::perror("cuda_emu: mmap of a fiber stack");
      std::abort();
    }
    base = static_cast<char*>(memory);
    mprotect(base, kGuard, PROT_NONE);
  }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  ~Stack() { munmap(base, kBytes + kGuard); }
  char* top() const { return base + kGuard + kBytes; }
};

// ---------------------------------------------------------------- schedules

enum class Order { kForward, kReverse, kRandom };

struct Schedule {
  Order order = Order::kForward;
  uint64_t seed = 0;
};

// "forward", "reverse" or "random:<seed>".
inline bool parse_schedule(const std::string& text, Schedule& out) {
  if (text == "forward") {
    out = {Order::kForward, 0};
  } else if (text == "reverse") {
    out = {Order::kReverse, 0};
  } else if (text.rfind("random:", 0) == 0 && text.size() > 7) {
    char* end = nullptr;
    const unsigned long long seed = std::strtoull(text.c_str() + 7, &end, 10);
    if (*end != '\0') return false;
    out = {Order::kRandom, seed};
  } else {
    return false;
  }
  return true;
}

// ---------------------------------------------------------------- the emulator's state

enum class State { kReady, kBlockBarrier, kWarpBarrier, kDone };

struct Thread {
  uint3 idx{};
  int linear = 0;
  State state = State::kReady;
  const char* file = "";  // the __syncthreads it waits at
  int line = 0;
  Context context;
};

struct Warp {
  int arrived = 0;       // lanes waiting at the current intrinsic
  int line = 0;          // that intrinsic's line, and its mask
  unsigned mask = 0;
  uint64_t generation = 0;
  uint64_t slots[2][32] = {};  // values passed, by generation parity
};

// The storage of one static __shared__ declaration, poisoned before every block.
struct SharedVariable {
  unsigned char* data;
  size_t bytes;
};

inline std::vector<SharedVariable>& shared_variables() {
  static std::vector<SharedVariable> all;
  return all;
}

inline unsigned char* new_shared_variable(size_t bytes) {
  auto* data = static_cast<unsigned char*>(::operator new(bytes, std::align_val_t(64)));
  std::memset(data, 0xff, bytes);
  shared_variables().push_back({data, bytes});
  return data;
}

// `__shared__ T name[N];` becomes `auto& name = shared_variable<T[N], __COUNTER__>();`.
template <typename T, int Id>
T& shared_variable() {
  static unsigned char* const storage = new_shared_variable(sizeof(T));
  return *reinterpret_cast<T*>(storage);
}

struct Statistics {
  uint64_t launches = 0, blocks = 0, block_barriers = 0, warp_barriers = 0, switches = 0;
};

struct Emulator {
  Schedule schedule;
  std::mt19937_64 random;
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  std::vector<Stack*> stacks;
  Context scheduler;
  const std::function<void()>* body = nullptr;
  int current = -1;              // the running thread, -1 in the scheduler
  bool failed = false;           // the launch is being abandoned
  std::string failure;           // the first failure's message since reset()
  cudaError_t last_error = cudaSuccess;
  std::vector<unsigned char> dynamic_shared;
  std::map<const void*, int> max_dynamic_shared;  // cudaFuncAttributeMaxDynamicSharedMemorySize
  Statistics statistics;
};

inline Emulator& emulator() {
  static Emulator instance;
  return instance;
}

inline void set_schedule(const Schedule& schedule) {
  Emulator& e = emulator();
  e.schedule = schedule;
  e.random.seed(schedule.seed * 0x9E3779B97F4A7C15ull + 12345);
}

// Clears the failure message and the last error (between test cases).
inline void reset() {
  Emulator& e = emulator();
  e.failure.clear();
  e.last_error = cudaSuccess;
  e.failed = false;
}

inline const std::string& failure() { return emulator().failure; }
inline const Statistics& statistics() { return emulator().statistics; }

inline void record_failure(const std::string& message) {
  Emulator& e = emulator();
  if (e.failure.empty()) e.failure = message;
  e.failed = true;
}

// Fails the launch from inside a thread: back to the scheduler, which abandons the launch (the
// fibers' stacks are reused; kernels hold no resources to release).
[[noreturn]] inline void fail(const std::string& message) {
  Emulator& e = emulator();
  record_failure(message);
  Thread& t = e.threads[e.current];
  switch_context(t.context, e.scheduler);
  std::fprintf(stderr, "cuda_emu: an abandoned thread was resumed\n");
  std::abort();
}

inline std::string thread_name(const Thread& t) {
  return "thread (" + std::to_string(t.idx.x) + "," + std::to_string(t.idx.y) + "," + std::to_string(t.idx.z) +
         ") of block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," +
         std::to_string(blockIdx.z) + ")";
}

// Back to the scheduler, after the running thread set its state.
inline void yield_to_scheduler() {
  Emulator& e = emulator();
  ++e.statistics.switches;
  switch_context(e.threads[e.current].context, e.scheduler);
}

[[noreturn]] inline void thread_main() {
  Emulator& e = emulator();
  (*e.body)();
  e.threads[e.current].state = State::kDone;
  switch_context(e.threads[e.current].context, e.scheduler);
  std::abort();  // a finished fiber is never resumed
}

#ifndef CUDA_EMU_X86_64_SWITCH
inline void thread_main_ucontext() { thread_main(); }
#endif

inline void start_fiber(Thread& t, Stack& stack) {
#ifdef CUDA_EMU_X86_64_SWITCH
  // The frame cuda_emu_switch pops: control words, r15, r14, r13, r12, rbx, rbp, then the return
  // address thread_main; above it a zero slot so that thread_main starts with rsp + 8 16-aligned.
  auto* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(stack.top()) & ~uintptr_t(15));
  uint64_t* sp = top - 9;
  sp[0] = 0x1F80ull | (0x037Full << 32);  // MXCSR default, x87 control word default
  for (int i = 1; i <= 6; ++i) sp[i] = 0;
  sp[7] = reinterpret_cast<uint64_t>(&thread_main);
  sp[8] = 0;
  t.context.sp = sp;
#else
  getcontext(&t.context.uc);
  t.context.uc.uc_stack.ss_sp = stack.base + Stack::kGuard;
  t.context.uc.uc_stack.ss_size = Stack::kBytes;
  t.context.uc.uc_link = nullptr;
  makecontext(&t.context.uc, thread_main_ucontext, 0);
#endif
}

// The permutation of 0..count-1 the schedule runs things in (threads of a phase, blocks).
inline void schedule_order(std::vector<int>& order, int count) {
  Emulator& e = emulator();
  order.resize(count);
  std::iota(order.begin(), order.end(), 0);
  if (e.schedule.order == Order::kReverse) std::reverse(order.begin(), order.end());
  if (e.schedule.order == Order::kRandom) std::shuffle(order.begin(), order.end(), e.random);
}

// A crash (a wild pointer, a fiber's stack overflow) says where it happened before the process
// dies: the driver's caller gets the message on stderr.
inline void crash_handler(int signal_number) {
  Emulator& e = emulator();
  char message[256];
  const int length = std::snprintf(
      message, sizeof message, "cuda_emu: signal %d in launch %llu, block (%u,%u,%u), thread %d (%u,%u,%u)\n",
      signal_number, static_cast<unsigned long long>(e.statistics.launches), blockIdx.x, blockIdx.y, blockIdx.z,
      e.current, threadIdx.x, threadIdx.y, threadIdx.z);
  if (length > 0) (void)!write(2, message, static_cast<size_t>(length));
  _exit(128 + signal_number);
}

inline void install_crash_handler() {
  static bool installed = false;
  if (installed) return;
  installed = true;
  static std::vector<char> alternate(64 * 1024);
  stack_t stack{};
  stack.ss_sp = alternate.data();
  stack.ss_size = alternate.size();
  sigaltstack(&stack, nullptr);
  struct sigaction action {};
  action.sa_handler = crash_handler;
  action.sa_flags = SA_ONSTACK;
  sigaction(SIGSEGV, &action, nullptr);
  sigaction(SIGBUS, &action, nullptr);
  sigaction(SIGFPE, &action, nullptr);
}

// Runs one block to completion (or failure).
inline void run_block() {
  Emulator& e = emulator();
  const int count = static_cast<int>(blockDim.x * blockDim.y * blockDim.z);
  while (static_cast<int>(e.stacks.size()) < count) e.stacks.push_back(new Stack());
  e.threads.assign(count, Thread());
  e.warps.assign((count + 31) / 32, Warp());
  for (int i = 0; i < count; ++i) {
    Thread& t = e.threads[i];
    t.linear = i;
    t.idx = {i % blockDim.x, (i / blockDim.x) % blockDim.y, i / (blockDim.x * blockDim.y)};
    start_fiber(t, *e.stacks[i]);
  }
  std::fill(e.dynamic_shared.begin(), e.dynamic_shared.end(), 0xff);
  for (const SharedVariable& v : shared_variables()) std::memset(v.data, 0xff, v.bytes);
  std::vector<int> order;
  for (;;) {
    schedule_order(order, count);
    for (bool progress = true; progress;) {  // until no thread can run: all wait or returned
      progress = false;
      for (int i : order) {
        if (e.threads[i].state != State::kReady) continue;
        progress = true;
        e.current = i;
        threadIdx = e.threads[i].idx;
        ++e.statistics.switches;
        switch_context(e.scheduler, e.threads[i].context);
        e.current = -1;
        if (e.failed) return;
      }
    }
    int done = 0, at_barrier = 0, at_warp = 0;
    const Thread* first_at_barrier = nullptr;
    const Thread* first_at_warp = nullptr;
    for (const Thread& t : e.threads) {
      if (t.state == State::kDone) ++done;
      if (t.state == State::kBlockBarrier && !at_barrier++) first_at_barrier = &t;
      if (t.state == State::kWarpBarrier && !at_warp++) first_at_warp = &t;
    }
    if (done == count) return;
    if (at_warp > 0) {
      const Warp& w = e.warps[first_at_warp->linear / 32];
      record_failure("deadlock: " + thread_name(*first_at_warp) + " waits at the warp intrinsic of line " +
                     std::to_string(w.line) + " for lanes (mask " + std::to_string(w.mask) +
                     ") that returned or wait elsewhere (" + std::to_string(at_barrier) + " threads at __syncthreads, " +
                     std::to_string(done) + " returned)");
      return;
    }
    for (const Thread& t : e.threads) {
      if (t.state != State::kBlockBarrier) continue;
      if (t.line != first_at_barrier->line || std::strcmp(t.file, first_at_barrier->file) != 0) {
        record_failure("divergent __syncthreads: " + thread_name(*first_at_barrier) + " waits at " +
                       first_at_barrier->file + ":" + std::to_string(first_at_barrier->line) + ", " + thread_name(t) +
                       " at " + t.file + ":" + std::to_string(t.line));
        return;
      }
    }
    ++e.statistics.block_barriers;
    for (Thread& t : e.threads)
      if (t.state == State::kBlockBarrier) t.state = State::kReady;
  }
}

inline bool valid_configuration(const void* kernel, dim3 grid, dim3 block, size_t shared, std::string& why) {
  Emulator& e = emulator();
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64) {
    why = "block (" + std::to_string(block.x) + "," + std::to_string(block.y) + "," + std::to_string(block.z) +
          ") is not 1 to 1024 threads within (1024, 1024, 64)";
    return false;
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
    why = "grid (" + std::to_string(grid.x) + "," + std::to_string(grid.y) + "," + std::to_string(grid.z) +
          ") is outside (2^31 - 1, 65535, 65535)";
    return false;
  }
  const auto raised = e.max_dynamic_shared.find(kernel);
  const size_t limit = raised != e.max_dynamic_shared.end() ? size_t(raised->second) : 48 * 1024;
  if (shared > limit) {
    why = std::to_string(shared) + " bytes of dynamic shared memory exceed the kernel's limit of " +
          std::to_string(limit) + " (cudaFuncSetAttribute raises it)";
    return false;
  }
  return true;
}

// Runs a whole launch: every block, in the schedule's order.
inline void run_grid(const void* kernel, dim3 grid, dim3 block, size_t shared, const std::function<void()>& body) {
  Emulator& e = emulator();
  std::string why;
  if (!valid_configuration(kernel, grid, block, shared, why)) {
    record_failure("launch configuration: " + why);
    e.failed = false;
    e.last_error = cudaErrorInvalidConfiguration;
    return;
  }
  install_crash_handler();
  ++e.statistics.launches;
  e.body = &body;
  gridDim = grid;
  blockDim = block;
  e.dynamic_shared.assign(shared, 0xff);
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  if (blocks > (uint64_t(1) << 24)) {
    record_failure("the emulation runs at most 2^24 blocks a launch");
    e.failed = false;
    e.last_error = cudaErrorInvalidConfiguration;
    return;
  }
  std::vector<int> order;
  schedule_order(order, static_cast<int>(blocks));
  for (int linear : order) {
    blockIdx = {linear % grid.x, (linear / grid.x) % grid.y, linear / (grid.x * grid.y)};
    ++e.statistics.blocks;
    run_block();
    if (e.failed) {
      e.failed = false;
      e.last_error = cudaErrorLaunchFailure;
      break;
    }
  }
  e.body = nullptr;
}

template <typename To, typename From>
To implicit_conversion(From&& value) {
  return std::forward<From>(value);  // what passing the argument to the kernel would do
}

template <typename... Parameters>
struct Launcher {
  void (*kernel)(Parameters...);
  dim3 grid, block;
  size_t shared;

  template <typename... Arguments>
  void operator()(Arguments&&... arguments) const {
    static_assert(sizeof...(Arguments) == sizeof...(Parameters), "a kernel launch with the wrong argument count");
    // Every thread gets its own copy of the parameters, as from the kernel's parameter space.
    const std::tuple<std::decay_t<Parameters>...> values(
        implicit_conversion<std::decay_t<Parameters>>(std::forward<Arguments>(arguments))...);
    const std::function<void()> body = [&] { std::apply(kernel, values); };
    run_grid(reinterpret_cast<const void*>(kernel), grid, block, shared, body);
  }
};

// `kernel<<<grid, block, shared, stream>>>(args)` is rewritten as launch(kernel, grid, block,
// shared, stream)(args).
template <typename... Parameters>
Launcher<Parameters...> launch(void (*kernel)(Parameters...), dim3 grid, dim3 block, size_t shared = 0,
                               cudaStream_t = nullptr) {
  return {kernel, grid, block, shared};
}

// `extern __shared__ T name[];` is rewritten as a pointer to this.
inline void* dynamic_shared_memory() { return emulator().dynamic_shared.data(); }

// Whether the mutant `name` is on (environment CUDA_EMU_MUTANT): the tests' mutations of the
// kernel sources guard what they break with it, so that one binary holds the intact kernels (no
// mutant on) and each broken variant.
inline bool mutant(const char* name) {
  static const char* const active = std::getenv("CUDA_EMU_MUTANT");
  return active != nullptr && std::strcmp(active, name) == 0;
}

// ---------------------------------------------------------------- barriers

__attribute__((noinline)) inline void syncthreads(const char* file, int line) {
  asm volatile("" ::: "memory");
  Emulator& e = emulator();
  Thread& t = e.threads[e.current];
  t.state = State::kBlockBarrier;
  t.file = file;
  t.line = line;
  yield_to_scheduler();
  asm volatile("" ::: "memory");
}

// The warp barrier under every warp intrinsic: the running lane passes `value`; returns the 32
// slots holding the values of the lanes in `mask` once all of them arrived.
__attribute__((noinline)) inline const uint64_t* warp_exchange(int line, unsigned mask, uint64_t value) {
  asm volatile("" ::: "memory");
  Emulator& e = emulator();
  Thread& t = e.threads[e.current];
  const int lane = t.linear % 32, first = t.linear - lane;
  Warp& w = e.warps[t.linear / 32];
  if (!(mask >> lane & 1u))
    fail(thread_name(t) + " calls the warp intrinsic of line " + std::to_string(line) + " with a mask (" +
         std::to_string(mask) + ") that leaves out its own lane " + std::to_string(lane));
  const int lanes = std::min(32, static_cast<int>(e.threads.size()) - first);
  if (lanes < 32 && (mask >> lanes) != 0)
    fail("the warp intrinsic of line " + std::to_string(line) + " names lanes (mask " + std::to_string(mask) +
         ") past the block's last thread");
  if (w.arrived == 0) {
    w.line = line;
    w.mask = mask;
  } else if (w.line != line || w.mask != mask) {
    fail("divergent warp: " + thread_name(t) + " reaches the warp intrinsic of line " + std::to_string(line) +
         " (mask " + std::to_string(mask) + ") while other lanes wait at line " + std::to_string(w.line) +
         " (mask " + std::to_string(w.mask) + ")");
  }
  const int parity = static_cast<int>(w.generation & 1);
  w.slots[parity][lane] = value;
  ++e.statistics.warp_barriers;
  if (++w.arrived == __builtin_popcount(mask)) {
    w.arrived = 0;
    ++w.generation;
    for (int other = 0; other < 32; ++other)
      if ((mask >> other & 1u) && other != lane) e.threads[first + other].state = State::kReady;
  } else {
    t.state = State::kWarpBarrier;
    yield_to_scheduler();
  }
  asm volatile("" ::: "memory");
  return w.slots[parity];
}

template <typename T>
uint64_t to_bits(T value) {
  static_assert(sizeof(T) <= 8, "warp intrinsics take values of at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  return bits;
}

template <typename T>
T from_bits(uint64_t bits) {
  T value;
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

inline int lane_of_current() { return emulator().threads[emulator().current].linear % 32; }

// The value of lane `source` (which must be in the mask), or the caller's own.
template <typename T>
T shuffle_result(int line, unsigned mask, T value, int source, bool in_range) {
  const uint64_t* slots = warp_exchange(line, mask, to_bits(value));
  if (!in_range) return value;
  if (!(mask >> source & 1u))
    fail("the shuffle of line " + std::to_string(line) + " reads lane " + std::to_string(source) +
         ", which is not in its mask");
  return from_bits<T>(slots[source]);
}

template <typename T>
T shfl_sync(int line, unsigned mask, T value, int source_lane, int width = warpSize) {
  const int lane = lane_of_current(), segment = lane - lane % width;
  return shuffle_result(line, mask, value, segment + ((source_lane % width) + width) % width, true);
}

template <typename T>
T shfl_up_sync(int line, unsigned mask, T value, unsigned delta, int width = warpSize) {
  const int lane = lane_of_current();
  return shuffle_result(line, mask, value, lane - static_cast<int>(delta), lane % width >= static_cast<int>(delta));
}

template <typename T>
T shfl_down_sync(int line, unsigned mask, T value, unsigned delta, int width = warpSize) {
  const int lane = lane_of_current();
  return shuffle_result(line, mask, value, lane + static_cast<int>(delta), lane % width + static_cast<int>(delta) < width);
}

template <typename T>
T shfl_xor_sync(int line, unsigned mask, T value, int lane_mask, int width = warpSize) {
  const int lane = lane_of_current(), source = lane ^ lane_mask;
  return shuffle_result(line, mask, value, source, source < lane - lane % width + width);
}

inline unsigned ballot_sync(int line, unsigned mask, int predicate) {
  const uint64_t* slots = warp_exchange(line, mask, predicate != 0);
  unsigned bits = 0;
  for (int lane = 0; lane < 32; ++lane)
    if ((mask >> lane & 1u) && slots[lane]) bits |= 1u << lane;
  return bits;
}

inline int any_sync(int line, unsigned mask, int predicate) { return ballot_sync(line, mask, predicate) != 0; }
inline int all_sync(int line, unsigned mask, int predicate) { return ballot_sync(line, mask, predicate) == mask; }
inline void syncwarp(int line, unsigned mask) { warp_exchange(line, mask, 0); }

}  // namespace cuda_emu

inline cudaError_t cudaGetLastError() {
  cuda_emu::Emulator& e = cuda_emu::emulator();
  const cudaError_t error = e.last_error;
  e.last_error = cudaSuccess;
  return error;
}

inline cudaError_t cudaPeekAtLastError() { return cuda_emu::emulator().last_error; }

inline const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDeviceFunction: return "invalid device function";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}

// sm_90 allows up to 227 KiB of dynamic shared memory per block once raised.
template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute attribute, int value) {
  if (attribute == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || value > 227 * 1024) return cudaErrorInvalidValue;
    cuda_emu::emulator().max_dynamic_shared[reinterpret_cast<const void*>(kernel)] = value;
  }
  return cudaSuccess;
}

inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

// ---------------------------------------------------------------- intrinsics as macros
// (the line identifies the barrier a thread waits at)

#define __syncthreads() ::cuda_emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::cuda_emu::syncwarp(__LINE__, ##__VA_ARGS__)
#define __shfl_sync(...) ::cuda_emu::shfl_sync(__LINE__, __VA_ARGS__)
#define __shfl_up_sync(...) ::cuda_emu::shfl_up_sync(__LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) ::cuda_emu::shfl_down_sync(__LINE__, __VA_ARGS__)
#define __shfl_xor_sync(...) ::cuda_emu::shfl_xor_sync(__LINE__, __VA_ARGS__)
#define __ballot_sync(...) ::cuda_emu::ballot_sync(__LINE__, __VA_ARGS__)
#define __any_sync(...) ::cuda_emu::any_sync(__LINE__, __VA_ARGS__)
#define __all_sync(...) ::cuda_emu::all_sync(__LINE__, __VA_ARGS__)

// ---------------------------------------------------------------- atomics and math
// A fiber is never interrupted, so a read-modify-write is atomic as written.

template <typename T>
T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}
template <typename T>
T atomicMax(T* address, T value) {
  const T old = *address;
  *address = old > value ? old : value;
  return old;
}
template <typename T>
T atomicMin(T* address, T value) {
  const T old = *address;
  *address = old < value ? old : value;
  return old;
}
template <typename T>
T atomicExch(T* address, T value) {
  const T old = *address;
  *address = value;
  return old;
}
template <typename T>
T atomicCAS(T* address, T compare, T value) {
  const T old = *address;
  if (old == compare) *address = value;
  return old;
}

// <math.h> (C++) brings the float overloads of sqrt, exp, tanh, ... into the global namespace, as
// CUDA's device math does; these are CUDA's extra ones the kernels might use.
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float rsqrt(float x) { return rsqrtf(x); }
inline float __fdividef(float x, float y) { return x / y; }
