// The MLP chain's integer codes and their formulas, the one copy that both plan_gram kernels
// use (csrc/cpu/plan_gram_cpu.cpp, csrc/cuda/plan_gram_cuda.cu): plain C++ without torch
// headers, compiled by g++ and nvcc (host and device).
//
// A code is the index of a name in a Python list, so the enumerators below follow those lists
// name for name and in order (tests/test_chain_codes.py parses this file and checks it):
//   Activation: pullgeom/tracing/activations.py ACTIVATIONS (k + the name in CamelCase);
//   Sigma:      pullgeom/encoder_output.py SIGMA_CONVENTIONS.
// kCount ends each list. The op glue rejects codes outside [0, kCount) before any kernel runs
// (check_plan_gram in csrc/checks.h), so the formulas take valid codes only; should one slip
// through anyway it yields NaN, never another formula's value.
#pragma once

#include <math.h>
#include <stdint.h>

#include "host_device.h"

namespace pullgeom {

enum class Activation : int64_t {
  kIdentity, kTanh, kRelu, kLeakyRelu, kElu, kGelu, kGeluTanh, kSilu, kSigmoid, kSoftplus, kCount
};

enum class Sigma : int64_t { kLogvar, kLogstd, kStd, kSoftplus, kCount };

// out = act(pre) and slope = act'(pre), as pullgeom.tracing.activations computes them.
// param: negative slope (leaky_relu), alpha (elu), beta (softplus); threshold: softplus's.
template <typename T>
PULLGEOM_HOST_DEVICE inline void activation_and_derivative(Activation code, T param, T threshold, T pre, T& out,
                                                           T& slope) {
  const T one = 1;
  switch (code) {
    case Activation::kIdentity: out = pre; slope = one; return;
    case Activation::kTanh: out = tanh(pre); slope = one - out * out; return;
    case Activation::kRelu: out = pre > 0 ? pre : T(0); slope = pre > 0 ? one : T(0); return;
    case Activation::kLeakyRelu: out = pre > 0 ? pre : param * pre; slope = pre > 0 ? one : param; return;
    case Activation::kElu:
      out = pre > 0 ? pre : param * expm1(pre);
      slope = pre > 0 ? one : out + param;
      return;
    case Activation::kGelu: {
      const T cdf = T(0.5) * (one + erf(pre * T(0.70710678118654752440)));  // 1 / sqrt(2)
      out = pre * cdf;
      slope = cdf + pre * exp(T(-0.5) * pre * pre) * T(0.39894228040143267794);  // 1 / sqrt(2 pi)
      return;
    }
    case Activation::kGeluTanh: {
      const T c = T(0.79788456080286535588);  // sqrt(2 / pi)
      const T t = tanh(c * (pre + T(0.044715) * pre * pre * pre));
      out = T(0.5) * pre * (one + t);
      slope = T(0.5) * (one + t) + T(0.5) * pre * (one - t * t) * c * (one + T(3 * 0.044715) * pre * pre);
      return;
    }
    case Activation::kSilu: {
      const T sig = one / (one + exp(-pre));
      out = pre * sig;
      slope = sig * (one + pre * (one - sig));
      return;
    }
    case Activation::kSigmoid: out = one / (one + exp(-pre)); slope = out * (one - out); return;
    case Activation::kSoftplus: {
      const T scaled = pre * param;
      if (scaled > threshold) {  // torch's linear regime above the threshold
        out = pre;
        slope = one;
      } else {
        out = log1p(exp(scaled)) / param;
        slope = one / (one + exp(-scaled));
      }
      return;
    }
    case Activation::kCount: break;
  }
  out = slope = T(NAN);
}

// d sigma / d out2 for the encoder's second output under each convention.
template <typename T>
PULLGEOM_HOST_DEVICE inline T sigma_derivative(Sigma code, T s) {
  switch (code) {
    case Sigma::kLogvar: return T(0.5) * exp(T(0.5) * s);
    case Sigma::kLogstd: return exp(s);
    case Sigma::kStd: return T(1);
    case Sigma::kSoftplus: return T(1) / (T(1) + exp(-s));
    case Sigma::kCount: break;
  }
  return T(NAN);
}

}  // namespace pullgeom
