// Implicit QL on a symmetric tridiagonal matrix, shared by the CPU kernels (csrc/cpu/) and the
// CUDA Lanczos kernel (csrc/cuda/): plain C++ with no torch headers, compiled by g++ and nvcc.
//
// Input: diagonal d[0..n), off-diagonal e[0..n) with e[i] = T[i][i+1] (e[n-1] unused), and the
// basis qt (n x n, row-major) whose ROWS are rotated: start from the identity to get T's
// eigenvectors as rows of qt, or from Q^T of a Householder tridiagonalisation to get A's.
// Output: eigenvalues in d (unsorted), e destroyed. Iterations per eigenvalue are capped so that
// NaN input terminates (and stays NaN) instead of looping forever.
#pragma once

#include <float.h>
#include <math.h>
#include <stdint.h>

#include "host_device.h"

namespace pullgeom {

// sqrt(a^2 + b^2) without hypot's cost in the common range (one call per QL rotation; on CPU
// switching cut a 256 x (32 x 32) batch from 34 to 21 ms in one measurement); falls back to
// hypot where the squares could over/underflow.
PULLGEOM_HOST_DEVICE inline double fast_hypot(double a, double b) {
  const double big = fmax(fabs(a), fabs(b));
  if (big > 1e150 || (big < 1e-150 && big > 0)) return hypot(a, b);
  return sqrt(a * a + b * b);
}

PULLGEOM_HOST_DEVICE inline void tridiagonal_ql(int64_t n, double* __restrict__ d, double* __restrict__ e,
                                                double* __restrict__ qt) {
  const int kMaxIterations = 64;
  double f = 0.0, tst1 = 0.0;
  for (int64_t l = 0; l < n; ++l) {
    tst1 = fmax(tst1, fabs(d[l]) + fabs(e[l]));
    int64_t m = l;
    while (m < n - 1 && !(fabs(e[m]) <= DBL_EPSILON * tst1)) ++m;
    if (m > l) {
      int iteration = 0;
      do {
        double g = d[l];
        double p = (d[l + 1] - g) / (2.0 * e[l]);
        double r = fast_hypot(p, 1.0);
        if (p < 0) r = -r;
        d[l] = e[l] / (p + r);
        d[l + 1] = e[l] * (p + r);
        const double dl1 = d[l + 1];
        double h = g - d[l];
        for (int64_t i = l + 2; i < n; ++i) d[i] -= h;
        f += h;
        p = d[m];
        double c = 1.0, c2 = 1.0, c3 = 1.0, s = 0.0, s2 = 0.0;
        const double el1 = e[l + 1];
        for (int64_t i = m - 1; i >= l; --i) {
          c3 = c2;
          c2 = c;
          s2 = s;
          g = c * e[i];
          h = c * p;
          r = fast_hypot(p, e[i]);
          e[i + 1] = s * r;
          s = e[i] / r;
          c = p / r;
          p = c * d[i] - s * g;
          d[i + 1] = h + s * (c * g + s * d[i]);
          double* __restrict__ row_i = qt + i * n;
          double* __restrict__ row_next = qt + (i + 1) * n;
          for (int64_t k = 0; k < n; ++k) {
            const double upper = row_next[k];
            row_next[k] = s * row_i[k] + c * upper;
            row_i[k] = c * row_i[k] - s * upper;
          }
        }
        p = -s * s2 * c3 * el1 * e[l] / dl1;
        e[l] = s * p;
        d[l] = c * p;
      } while (fabs(e[l]) > DBL_EPSILON * tst1 && ++iteration < kMaxIterations);
    }
    d[l] += f;
    e[l] = 0.0;
  }
}

}  // namespace pullgeom
