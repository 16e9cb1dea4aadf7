// Dense symmetric eigensolver for one small matrix, in float64: Householder reduction to
// tridiagonal form, then the implicit QL iteration with Wilkinson-type shifts (the EISPACK
// tql2 iteration of EISPACK / JAMA). About 4 n^3 / 3 + 2 n^3 / 3 + 3 n^3 multiply-adds with
// vectors (reduction, accumulating Q, QL rotations); used for n <= 256.
//
// Layout: row-major. tridiagonal_eigen() takes the transposed basis `qt` (row i = column i of
// Q), so its rotations touch two contiguous rows, and returns eigenvalues in d (unsorted) with
// eigenvector i in row i of qt.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "../common/tridiagonal_ql.h"

// The hot loops get AVX-512 / AVX2+FMA clones picked at load time (GCC function
// multi-versioning), so a portable build still uses the machine's vector width.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PULLGEOM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PULLGEOM_CLONES
#endif

namespace pullgeom {

// Householder tridiagonalisation of the full symmetric `a` (n x n row-major, overwritten: row k
// keeps the k-th Householder vector). Every inner loop runs along a row, so it vectorises:
// p = beta A22 v (row dot products), then the symmetric rank-2 update A22 -= v w^T + w v^T.
// Outputs d (diagonal), e (e[i] = T[i][i+1], e[n-1] = 0) and q = Q (row-major) with A = Q T Q^T.
PULLGEOM_CLONES static void tridiagonalize(int64_t n, double* __restrict a, double* __restrict d,
                                           double* __restrict e, double* __restrict q, double* __restrict work) {
  double* p = work;           // n
  double* betas = work + n;   // n
  for (int64_t k = 0; k + 2 < n; ++k) {
    const int64_t m = n - k - 1;
    double* x = a + k * n + k + 1;  // row k right of the diagonal == column k below it
    d[k] = a[k * n + k];
    double alpha2 = 0;
    for (int64_t i = 0; i < m; ++i) alpha2 += x[i] * x[i];
    if (alpha2 == 0) {
      e[k] = 0;
      betas[k] = 0;
      continue;
    }
    const double alpha = std::sqrt(alpha2);
    const double s = x[0] >= 0 ? -alpha : alpha;
    e[k] = s;
    const double beta = 1.0 / (alpha2 - s * x[0]);  // 2 / ||v||^2 with v = x - s e_1
    x[0] -= s;                                      // x is now v
    betas[k] = beta;
    double pv = 0;
    for (int64_t i = 0; i < m; ++i) {
      const double* row = a + (k + 1 + i) * n + k + 1;
      double acc = 0;
      for (int64_t j = 0; j < m; ++j) acc += row[j] * x[j];
      p[i] = beta * acc;
      pv += p[i] * x[i];
    }
    const double half = 0.5 * beta * pv;
    for (int64_t i = 0; i < m; ++i) p[i] -= half * x[i];  // p is now w
    for (int64_t i = 0; i < m; ++i) {
      double* row = a + (k + 1 + i) * n + k + 1;
      const double vi = x[i], wi = p[i];
      for (int64_t j = 0; j < m; ++j) row[j] -= vi * p[j] + wi * x[j];
    }
  }
  if (n >= 2) {
    d[n - 2] = a[(n - 2) * n + n - 2];
    e[n - 2] = a[(n - 2) * n + n - 1];
  }
  d[n - 1] = a[(n - 1) * n + n - 1];
  e[n - 1] = 0;
  // Q = H_0 H_1 ... H_{n-3}, accumulated backwards so each H_k touches the trailing block only.
  for (int64_t i = 0; i < n * n; ++i) q[i] = 0;
  for (int64_t i = 0; i < n; ++i) q[i * n + i] = 1;
  double* z = p;
  for (int64_t k = n - 3; k >= 0; --k) {
    if (betas[k] == 0) continue;
    const int64_t m = n - k - 1;
    const double* v = a + k * n + k + 1;
    for (int64_t j = 0; j < m; ++j) z[j] = 0;
    for (int64_t i = 0; i < m; ++i) {
      const double* row = q + (k + 1 + i) * n + k + 1;
      for (int64_t j = 0; j < m; ++j) z[j] += v[i] * row[j];
    }
    for (int64_t i = 0; i < m; ++i) {
      double* row = q + (k + 1 + i) * n + k + 1;
      const double scale = betas[k] * v[i];
      for (int64_t j = 0; j < m; ++j) row[j] -= scale * z[j];
    }
  }
}

// Implicit QL (csrc/common/tridiagonal_ql.h), instantiated inside each target clone so the
// rotation loop is vectorised for the machine it runs on.
PULLGEOM_CLONES static void tridiagonal_eigen(int64_t n, double* __restrict d, double* __restrict e,
                                              double* __restrict qt) {
  pullgeom::tridiagonal_ql(n, d, e, qt);
}

// Indices that sort d descending (stable, so equal eigenvalues keep QL's order).
inline std::vector<int64_t> descending_order(int64_t n, const double* d) {
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return d[a] > d[b]; });
  return order;
}

// Workspace and driver for one matrix: eigenpairs of symmetric `a` (n x n row-major, any
// scalar type); values descending, vectors as columns of `vectors` (n x n row-major).
struct SymmetricEigen {
  std::vector<double> a, q, qt, d, e, work;

  template <typename scalar_t>
  void solve(int64_t n, const scalar_t* matrix, scalar_t* values, scalar_t* vectors) {
    a.resize(n * n);
    q.resize(n * n);
    qt.resize(n * n);
    d.resize(n);
    e.resize(n);
    work.resize(2 * n);
    // Symmetrise on the way in: the result is that of (A + A^T) / 2.
    bool finite = true;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) {
        a[i * n + j] = 0.5 * (double(matrix[i * n + j]) + double(matrix[j * n + i]));
        finite = finite && std::isfinite(a[i * n + j]);
      }
    if (!finite) {  // NaN or inf input: all NaN (QL would leave some finite, meaningless entries)
      std::fill(values, values + n, std::numeric_limits<scalar_t>::quiet_NaN());
      std::fill(vectors, vectors + n * n, std::numeric_limits<scalar_t>::quiet_NaN());
      return;
    }
    tridiagonalize(n, a.data(), d.data(), e.data(), q.data(), work.data());
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) qt[i * n + j] = q[j * n + i];
    tridiagonal_eigen(n, d.data(), e.data(), qt.data());
    const auto order = descending_order(n, d.data());
    for (int64_t c = 0; c < n; ++c) {
      values[c] = static_cast<scalar_t>(d[order[c]]);
      const double* column = qt.data() + order[c] * n;
      for (int64_t r = 0; r < n; ++r) vectors[r * n + c] = static_cast<scalar_t>(column[r]);
    }
  }
};

}  // namespace pullgeom
