// What the emulated-kernel drivers share: the record files they read and write, "device" buffers
// with guard zones and poisoned contents, and the loop over cases and schedules.
//
// A record file is a sequence of arrays, each: int64 dtype (0 float32, 1 float64, 2 int64,
// 3 bytes), int64 ndim, ndim int64 sizes, then the elements (little-endian, C order); see
// tests/cuda_emulation/emulation.py, which writes and reads them.
//
// A driver is called as `driver INPUT OUTPUT SCHEDULE...`. INPUT holds cases, each an int64
// header record followed by the op's arrays; for every case and schedule OUTPUT gets an int64
// record [status, number of arrays], a bytes record (the failure message, empty when status is
// 0) and the op's output arrays (none after a failure).
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace driver {

enum Dtype : int64_t { kFloat32 = 0, kFloat64 = 1, kInt64 = 2, kBytes = 3 };

inline size_t element_size(int64_t dtype) {
  switch (dtype) {
    case kFloat32: return 4;
    case kFloat64: return 8;
    case kInt64: return 8;
    case kBytes: return 1;
  }
  throw std::runtime_error("bad dtype " + std::to_string(dtype));
}

struct Array {
  int64_t dtype = kFloat64;
  std::vector<int64_t> sizes;
  std::vector<unsigned char> bytes;

  int64_t numel() const {
    int64_t count = 1;
    for (int64_t s : sizes) count *= s;
    return count;
  }
  template <typename T>
  const T* as() const {
    return reinterpret_cast<const T*>(bytes.data());
  }
  int64_t size(int i) const { return sizes.at(i); }
};

template <typename T>
constexpr int64_t dtype_of() {
  if constexpr (std::is_same_v<T, float>) return kFloat32;
  if constexpr (std::is_same_v<T, double>) return kFloat64;
  if constexpr (std::is_same_v<T, int64_t>) return kInt64;
  return kBytes;
}

class Reader {
 public:
  explicit Reader(const char* path) : file_(std::fopen(path, "rb")) {
    if (file_ == nullptr) throw std::runtime_error(std::string("cannot open ") + path);
  }
  ~Reader() { std::fclose(file_); }
  bool at_end() {
    const int c = std::fgetc(file_);
    if (c == EOF) return true;
    std::ungetc(c, file_);
    return false;
  }
  Array next() {
    Array a;
    a.dtype = read_int();
    const int64_t ndim = read_int();
    for (int64_t i = 0; i < ndim; ++i) a.sizes.push_back(read_int());
    a.bytes.resize(size_t(a.numel()) * element_size(a.dtype));
    if (!a.bytes.empty() && std::fread(a.bytes.data(), 1, a.bytes.size(), file_) != a.bytes.size())
      throw std::runtime_error("truncated input");
    return a;
  }
  // An int64 record's values.
  std::vector<int64_t> ints() {
    const Array a = next();
    if (a.dtype != kInt64) throw std::runtime_error("expected an int64 record");
    return std::vector<int64_t>(a.as<int64_t>(), a.as<int64_t>() + a.numel());
  }
  std::vector<double> doubles() {
    const Array a = next();
    if (a.dtype != kFloat64) throw std::runtime_error("expected a float64 record");
    return std::vector<double>(a.as<double>(), a.as<double>() + a.numel());
  }

 private:
  int64_t read_int() {
    int64_t v;
    if (std::fread(&v, sizeof v, 1, file_) != 1) throw std::runtime_error("truncated input");
    return v;
  }
  std::FILE* file_;
};

class Writer {
 public:
  explicit Writer(const char* path) : file_(std::fopen(path, "wb")) {
    if (file_ == nullptr) throw std::runtime_error(std::string("cannot open ") + path);
  }
  ~Writer() { std::fclose(file_); }
  void write(int64_t dtype, const std::vector<int64_t>& sizes, const void* data) {
    int64_t count = 1;
    for (int64_t s : sizes) count *= s;
    write_int(dtype);
    write_int(static_cast<int64_t>(sizes.size()));
    for (int64_t s : sizes) write_int(s);
    std::fwrite(data, element_size(dtype), size_t(count), file_);
  }
  void write_ints(const std::vector<int64_t>& values) {
    write(kInt64, {static_cast<int64_t>(values.size())}, values.data());
  }
  void write_text(const std::string& text) {
    write(kBytes, {static_cast<int64_t>(text.size())}, text.data());
  }

 private:
  void write_int(int64_t v) { std::fwrite(&v, sizeof v, 1, file_); }
  std::FILE* file_;
};

// A "device" allocation: `count` elements between two guard zones of a fixed byte pattern, the
// elements poisoned (NaN for floating point, a large sentinel for int64) so that an output the
// kernel never writes shows up, and a write out of bounds breaks a guard.
template <typename T>
class Buffer {
 public:
  static constexpr size_t kGuard = 64;  // elements on each side

  Buffer(std::string name, int64_t count) : name_(std::move(name)), count_(count), storage_(size_t(count) + 2 * kGuard) {
    std::memset(storage_.data(), 0xA5, kGuard * sizeof(T));
    std::memset(storage_.data() + kGuard + count_, 0xA5, kGuard * sizeof(T));
    poison();
  }
  Buffer(std::string name, const Array& from) : Buffer(std::move(name), from.numel()) {
    if (from.dtype != dtype_of<T>()) throw std::runtime_error(name_ + " has the wrong dtype");
    std::memcpy(data(), from.bytes.data(), from.bytes.size());
    original_ = from.bytes;
  }

  T* data() { return storage_.data() + kGuard; }
  int64_t count() const { return count_; }
  const std::string& name() const { return name_; }

  void poison() {
    T* d = data();
    for (int64_t i = 0; i < count_; ++i) {
      if constexpr (std::is_floating_point_v<T>)
        d[i] = std::numeric_limits<T>::quiet_NaN();
      else
        d[i] = T(0x5A5A5A5A5A5A5A5Aull & std::numeric_limits<T>::max());
    }
  }
  // "" when the guards are intact (and an input still holds what was loaded), else what broke.
  std::string check() const {
    const auto* bytes = reinterpret_cast<const unsigned char*>(storage_.data());
    const size_t guard_bytes = kGuard * sizeof(T), tail = (kGuard + size_t(count_)) * sizeof(T);
    for (size_t i = 0; i < guard_bytes; ++i)
      if (bytes[i] != 0xA5) return "a write before the start of " + name_;
    for (size_t i = 0; i < guard_bytes; ++i)
      if (bytes[tail + i] != 0xA5) return "a write past the end of " + name_;
    if (!original_.empty() &&
        std::memcmp(original_.data(), storage_.data() + kGuard, original_.size()) != 0)
      return "the kernels changed the input " + name_;
    return "";
  }
  void write(Writer& out, const std::vector<int64_t>& sizes) {
    out.write(dtype_of<T>(), sizes, data());
  }

 private:
  std::string name_;
  int64_t count_;
  std::vector<T> storage_;
  std::vector<unsigned char> original_;  // inputs: what was loaded
};

// The status codes of a run.
enum Status : int64_t { kOk = 0, kLaunchError = 1, kEmulationFailure = 2, kMemoryError = 3 };

// Runs `run_one` (which returns the run's status and message and writes the outputs on success)
// for every case of the input under every schedule.
template <typename RunCase>
int main_loop(int argc, char** argv, RunCase run_case) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s INPUT OUTPUT SCHEDULE...\n", argv[0]);
    return 2;
  }
  std::vector<cuda_emu::Schedule> schedules;
  for (int i = 3; i < argc; ++i) {
    cuda_emu::Schedule s;
    if (!cuda_emu::parse_schedule(argv[i], s)) {
      std::fprintf(stderr, "bad schedule %s: use forward, reverse or random:<seed>\n", argv[i]);
      return 2;
    }
    schedules.push_back(s);
  }
  try {
    Reader in(argv[1]);
    Writer out(argv[2]);
    while (!in.at_end()) run_case(in, out, schedules);
  } catch (const std::exception& error) {
    std::fprintf(stderr, "driver: %s\n", error.what());
    return 1;
  }
  return 0;
}

// The outcome of one run: ok, or why not.
struct Outcome {
  int64_t status = kOk;
  std::string message;
};

// After the launches: the launcher's error, the emulator's failure, then the buffers' guards.
template <typename... Buffers>
Outcome outcome(cudaError_t launch_status, const Buffers&... buffers) {
  if (!cuda_emu::failure().empty()) return {kEmulationFailure, cuda_emu::failure()};
  if (launch_status != cudaSuccess) return {kLaunchError, std::string("launch failed: ") + cudaGetErrorString(launch_status)};
  for (const std::string& why : {buffers.check()...})
    if (!why.empty()) return {kMemoryError, why};
  return {};
}

inline void write_outcome(Writer& out, const Outcome& o, int64_t arrays) {
  out.write_ints({o.status, o.status == kOk ? arrays : 0});
  out.write_text(o.message);
}

}  // namespace driver
