// pullgeom::lanczos_topk on CPU: top-k eigenpairs of each symmetric (n x n) matrix by Lanczos
// with full reorthogonalisation, one sample per OpenMP task, all arithmetic in float64.
//
// Breakdown (beta_j <= 16 n eps ||A||_F, eps of the input's dtype) means the Krylov space is
// invariant to the input's precision, not an error: the Ritz values found so far are exact to
// that precision, and the iteration restarts from a fresh pseudo-random vector orthogonal to
// the basis (T gets a zero off-diagonal). If a restart vector is itself an
// eigenvector (it breaks down at its first step), the whole orthogonal complement of the basis
// is, with probability one, a single eigenspace: its eigenvalue fills any remaining top-k slots
// with vectors drawn from the complement. This is the normal case here, because G is
// rank-deficient: restarts land in the null space and stop the iteration after one product.
// Convergence (no breakdown) is tested on the residual estimates |beta_j s_{j,i}| of the top
// k Ritz pairs, on a geometric schedule so the tridiagonal solves stay O(m^3) in total; the
// returned residuals are recomputed explicitly as ||A v - lambda v||.
// Like every single-vector Krylov method, an eigenvalue repeated inside one Krylov segment is
// found once; its other copies appear through restarts after a breakdown.
// A sample with a NaN or inf entry gets NaN values, vectors and residuals and 0 steps.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../checks.h"
#include "symmetric_eigen.h"

namespace pullgeom {
namespace {

// Deterministic pseudo-random entries in [-1, 1) (splitmix64), so results are reproducible.
inline double random_entry(uint64_t seed, uint64_t index) {
  uint64_t z = seed * 0x9E3779B97F4A7C15ull + index + 0x632BE59BD9B4E019ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return double(z >> 11) * (2.0 / 9007199254740992.0) - 1.0;
}

inline double dot(const double* a, const double* b, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// w <- w - sum_i (q_i . w) q_i over `count` rows of `basis`, twice ("twice is enough").
inline void orthogonalise(double* w, const double* basis, int64_t count, int64_t n) {
  for (int pass = 0; pass < 2; ++pass) {
    for (int64_t i = 0; i < count; ++i) {
      const double* q = basis + i * n;
      const double c = dot(q, w, n);
      for (int64_t t = 0; t < n; ++t) w[t] -= c * q[t];
    }
  }
}

struct LanczosSample {
  int64_t n, k, max_steps;
  double tol;
  std::vector<double> a, basis, alpha, beta, w, d, e, qt;

  // A fresh unit vector orthogonal to the first `count` basis rows, written to `out`;
  // false when the basis already spans the space.
  bool restart_vector(uint64_t seed, int64_t count, const std::vector<double>& extra_rows, double* out) {
    for (int attempt = 0; attempt < 4; ++attempt) {
      for (int64_t t = 0; t < n; ++t) out[t] = random_entry(seed + 7919ull * attempt, t);
      orthogonalise(out, basis.data(), count, n);
      orthogonalise(out, extra_rows.data(), static_cast<int64_t>(extra_rows.size()) / n, n);
      const double norm = std::sqrt(dot(out, out, n));
      if (norm > 1e-8) {
        for (int64_t t = 0; t < n; ++t) out[t] /= norm;
        return true;
      }
    }
    return false;
  }

  // Ritz pairs of the m x m tridiagonal (alpha, beta): values in d, vector i in row i of qt.
  void solve_tridiagonal(int64_t m) {
    d.assign(alpha.begin(), alpha.begin() + m);
    e.assign(m, 0.0);
    for (int64_t i = 0; i + 1 < m; ++i) e[i] = beta[i];
    qt.assign(m * m, 0.0);
    for (int64_t i = 0; i < m; ++i) qt[i * m + i] = 1.0;
    tridiagonal_eigen(m, d.data(), e.data(), qt.data());
  }

  template <typename scalar_t>
  void run(uint64_t sample, const scalar_t* matrix, scalar_t* values, scalar_t* vectors, scalar_t* residuals,
           int64_t* steps_out) {
    // The input's round-off, not float64's: a float32 matrix is known to ~eps32 ||A||, so its
    // repeated eigenvalue is a cluster split by that much. With float64's eps the breakdown test
    // would resolve the cluster instead, converge on one copy and miss the others.
    const double eps = std::numeric_limits<scalar_t>::epsilon();
    a.resize(n * n);
    double norm2 = 0;
    bool finite = true;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) {
        a[i * n + j] = 0.5 * (double(matrix[i * n + j]) + double(matrix[j * n + i]));
        norm2 += a[i * n + j] * a[i * n + j];
        finite = finite && std::isfinite(a[i * n + j]);
      }
    if (!finite) {  // NaN or inf input: every output NaN (no finite Ritz pair means anything)
      const scalar_t nan = std::numeric_limits<scalar_t>::quiet_NaN();
      std::fill(values, values + k, nan);
      std::fill(residuals, residuals + k, nan);
      std::fill(vectors, vectors + n * k, nan);
      *steps_out = 0;
      return;
    }
    const double anorm = std::sqrt(norm2);
    const double breakdown = 16.0 * double(n) * eps * anorm;
    const int64_t limit = std::min(max_steps, n);
    basis.assign(limit * n, 0.0);
    alpha.assign(limit, 0.0);
    beta.assign(limit, 0.0);
    w.resize(n);
    std::vector<double> no_rows, v(n);
    uint64_t seed = sample * 1000003ull;
    restart_vector(seed, 0, no_rows, v.data());
    int64_t j = 0, segment_start = 0, next_check = k;
    bool rest_is_eigenspace = false;
    while (j < limit) {
      double* q = basis.data() + j * n;
      std::copy(v.begin(), v.end(), q);
      for (int64_t r = 0; r < n; ++r) w[r] = dot(a.data() + r * n, q, n);
      alpha[j] = dot(q, w.data(), n);
      orthogonalise(w.data(), basis.data(), j + 1, n);
      const double b = std::sqrt(dot(w.data(), w.data(), n));
      ++j;
      if (!(b > breakdown)) {
        beta[j - 1] = 0.0;
        if (j - segment_start == 1) {
          rest_is_eigenspace = true;
          break;
        }
        segment_start = j;
        if (j == limit || !restart_vector(++seed, j, no_rows, v.data())) break;
        continue;  // a breakdown's Ritz values are exact but maybe not the top ones: go on
      }
      beta[j - 1] = b;
      for (int64_t t = 0; t < n; ++t) v[t] = w[t] / b;
      if (j >= next_check && j < limit) {
        solve_tridiagonal(j);
        const auto order = descending_order(j, d.data());
        const double scale = std::max(std::abs(d[order[0]]), eps * anorm);
        bool converged = true;
        for (int64_t i = 0; i < std::min(k, j) && converged; ++i)
          converged = std::abs(b * qt[order[i] * j + (j - 1)]) <= tol * scale;
        if (converged && j >= k) break;
        next_check = j + std::max<int64_t>(1, j / 4);
      }
    }
    const int64_t m = j;
    solve_tridiagonal(m);
    const auto order = descending_order(m, d.data());
    // Merge the Ritz values with the complement's eigenvalue (n - m further copies).
    const double rest_value = rest_is_eigenspace ? alpha[m - 1] : 0.0;
    const int64_t rest_copies = rest_is_eigenspace ? n - m : 0;
    std::vector<double> extra_rows;
    std::vector<double> y(n);
    int64_t taken_ritz = 0, taken_rest = 0;
    for (int64_t c = 0; c < k; ++c) {
      const bool use_ritz = taken_ritz < m && (taken_rest >= rest_copies || d[order[taken_ritz]] >= rest_value);
      double value;
      if (use_ritz) {
        const int64_t i = order[taken_ritz++];
        value = d[i];
        std::fill(y.begin(), y.end(), 0.0);
        for (int64_t s = 0; s < m; ++s) {
          const double coefficient = qt[i * m + s];
          const double* qs = basis.data() + s * n;
          for (int64_t t = 0; t < n; ++t) y[t] += coefficient * qs[t];
        }
      } else {
        ++taken_rest;
        value = rest_value;
        if (!restart_vector(++seed, m, extra_rows, y.data())) std::fill(y.begin(), y.end(), 0.0);
        extra_rows.insert(extra_rows.end(), y.begin(), y.end());
      }
      double residual2 = 0;
      for (int64_t r = 0; r < n; ++r) {
        const double diff = dot(a.data() + r * n, y.data(), n) - value * y[r];
        residual2 += diff * diff;
      }
      values[c] = static_cast<scalar_t>(value);
      residuals[c] = static_cast<scalar_t>(std::sqrt(residual2));
      for (int64_t r = 0; r < n; ++r) vectors[r * k + c] = static_cast<scalar_t>(y[r]);
    }
    *steps_out = m;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lanczos_topk_cpu(const at::Tensor& a, int64_t k,
                                                                            int64_t max_steps, double tol) {
  check_lanczos(a, k, max_steps, tol);
  TORCH_CHECK(a.device().is_cpu(), "pullgeom: a must be a CPU tensor here");
  const int64_t batch = a.size(0), n = a.size(1);
  auto values = at::empty({batch, k}, a.options());
  auto vectors = at::empty({batch, n, k}, a.options());
  auto residuals = at::empty({batch, k}, a.options());
  auto steps = at::empty({batch}, a.options().dtype(at::kLong));
  if (batch == 0) return {values, vectors, residuals, steps};
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "lanczos_topk_cpu", [&] {
    const scalar_t* in = a.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      LanczosSample solver{n, k, max_steps, tol, {}, {}, {}, {}, {}, {}, {}, {}};
      for (int64_t b = begin; b < end; ++b)
        solver.run<scalar_t>(static_cast<uint64_t>(b), in + b * n * n, values.data_ptr<scalar_t>() + b * k,
                             vectors.data_ptr<scalar_t>() + b * n * k, residuals.data_ptr<scalar_t>() + b * k,
                             steps.data_ptr<int64_t>() + b);
    });
  });
  return {values, vectors, residuals, steps};
}

}  // namespace

TORCH_LIBRARY_IMPL(pullgeom, CPU, m) { m.impl("lanczos_topk", &lanczos_topk_cpu); }

}  // namespace pullgeom
