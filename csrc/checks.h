// Argument checks shared by the CPU and CUDA implementations: bad input is a TORCH_CHECK
// error that names the argument and says what to pass instead.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "common/chain_codes.h"

namespace pullgeom {

inline void check_float_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "pullgeom: ", name,
              " must be float32 or float64, got ", t.scalar_type(), "; convert it with .float() or .double()");
  TORCH_CHECK(t.is_contiguous(), "pullgeom: ", name, " must be contiguous; pass ", name, ".contiguous()");
}

inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  check_float_tensor(t, name);
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "pullgeom: ", name, " has dtype ", t.scalar_type(),
              " but x has ", ref.scalar_type(), "; use one dtype for every argument");
  TORCH_CHECK(t.device() == ref.device(), "pullgeom: ", name, " is on ", t.device(), " but x is on ",
              ref.device(), "; move every argument to one device");
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef expected, const std::string& name) {
  TORCH_CHECK(t.sizes() == expected, "pullgeom: ", name, " must have shape ", expected, ", got ", t.sizes());
}

// The validated sizes of one plan_gram call.
struct PlanShape {
  int64_t batch = 0, input = 0, latent = 0, heads = 0, rank = 0;
  std::vector<int64_t> widths;  // w_0 = N, w_1, ..., w_L
};

inline PlanShape check_plan_gram(const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                                 at::IntArrayRef activations, at::ArrayRef<double> params,
                                 at::ArrayRef<double> thresholds, const at::Tensor& mu_weight,
                                 const at::Tensor& s_weight, const at::Tensor& s_bias, int64_t sigma,
                                 bool stochastic, const std::optional<at::Tensor>& latent_sqrt,
                                 const at::Tensor& first_gram) {
  check_float_tensor(x, "x");
  TORCH_CHECK(x.dim() == 2, "pullgeom: x must be (B, N), got shape ", x.sizes(), "; flatten the inputs first");
  const auto layers = static_cast<int64_t>(weights.size());
  TORCH_CHECK(layers >= 1, "pullgeom: weights is empty; plans without a hidden layer use the torch backend");
  TORCH_CHECK(static_cast<int64_t>(biases.size()) == layers && static_cast<int64_t>(activations.size()) == layers &&
                  static_cast<int64_t>(params.size()) == layers && static_cast<int64_t>(thresholds.size()) == layers,
              "pullgeom: weights, biases, activations, params and thresholds need one entry per layer, got ",
              weights.size(), ", ", biases.size(), ", ", activations.size(), ", ", params.size(), ", ",
              thresholds.size());
  PlanShape shape;
  shape.batch = x.size(0);
  shape.input = x.size(1);
  shape.widths.push_back(shape.input);
  for (int64_t l = 0; l < layers; ++l) {
    const std::string w_name = "weights[" + std::to_string(l) + "]";
    check_like(weights[l], x, w_name.c_str());
    TORCH_CHECK(weights[l].dim() == 2 && weights[l].size(1) == shape.widths.back(), "pullgeom: ", w_name,
                " must be (width, ", shape.widths.back(), "), got ", weights[l].sizes());
    TORCH_CHECK(weights[l].size(0) >= 1, "pullgeom: ", w_name, " has no rows");
    shape.widths.push_back(weights[l].size(0));
    const std::string b_name = "biases[" + std::to_string(l) + "]";
    check_like(biases[l], x, b_name.c_str());
    check_shape(biases[l], {shape.widths.back()}, b_name);
    // Every code is checked here, before any kernel runs: the formulas (common/chain_codes.h)
    // take valid codes only.
    TORCH_CHECK(activations[l] >= 0 && activations[l] < static_cast<int64_t>(Activation::kCount),
                "pullgeom: activations[", l, "] = ", activations[l],
                " is not a code of pullgeom.tracing.activations.ACTIVATION_CODES");
  }
  const int64_t last = shape.widths.back();
  check_like(mu_weight, x, "mu_weight");
  TORCH_CHECK(mu_weight.dim() == 2 && mu_weight.size(1) == last && mu_weight.size(0) >= 1,
              "pullgeom: mu_weight must be (dz, ", last, "), got ", mu_weight.sizes());
  shape.latent = mu_weight.size(0);
  check_like(s_weight, x, "s_weight");
  check_shape(s_weight, {shape.latent, last}, "s_weight");
  check_like(s_bias, x, "s_bias");
  check_shape(s_bias, {shape.latent}, "s_bias");
  TORCH_CHECK(sigma >= 0 && sigma < static_cast<int64_t>(Sigma::kCount), "pullgeom: sigma = ", sigma,
              " is not a code of pullgeom.encoder_output.SIGMA_CODES");
  if (latent_sqrt.has_value()) {
    check_like(*latent_sqrt, x, "latent_sqrt");
    check_shape(*latent_sqrt, {shape.batch, shape.latent, shape.latent}, "latent_sqrt");
  }
  check_like(first_gram, x, "first_gram");
  check_shape(first_gram, {shape.widths[1], shape.widths[1]}, "first_gram");
  shape.heads = stochastic ? 2 * shape.latent : shape.latent;
  shape.rank = shape.heads;
  for (size_t i = 1; i < shape.widths.size(); ++i) shape.rank = std::min(shape.rank, shape.widths[i]);
  return shape;
}

inline void check_square_batch(const at::Tensor& a, const char* name) {
  check_float_tensor(a, name);
  TORCH_CHECK(a.dim() == 3 && a.size(1) == a.size(2), "pullgeom: ", name,
              " must be a batch of square matrices (B, n, n), got shape ", a.sizes());
}

inline void check_lanczos(const at::Tensor& a, int64_t k, int64_t max_steps, double tol) {
  check_square_batch(a, "a");
  TORCH_CHECK(k >= 1 && k <= a.size(1), "pullgeom: k = ", k, " must be between 1 and n = ", a.size(1));
  TORCH_CHECK(max_steps >= k, "pullgeom: max_steps = ", max_steps, " must be at least k = ", k);
  TORCH_CHECK(tol > 0 && tol < 1, "pullgeom: tol = ", tol, " must be a relative tolerance in (0, 1)");
}

}  // namespace pullgeom
