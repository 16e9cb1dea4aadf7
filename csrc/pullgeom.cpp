// Schemas of pullgeom's native ops and the Python module init.
//
// Every op is declared once here; the CPU implementations live in csrc/cpu/, the CUDA ones in
// csrc/cuda/ (registered only in CUDA builds), and the shape-only "fake" implementations in
// pullgeom/kernels/native.py (register_fake), which is what torch.compile traces.
#include <Python.h>
#include <torch/library.h>
#include <torch/version.h>

#include <string>

TORCH_LIBRARY(pullgeom, m) {
  // Fused MLP plan -> per-sample left factor and its small Gram (MATH.md 2).
  //   x: (B, N); weights[l]: (w_l, w_{l-1}); biases[l]: (w_l,); activations/params/thresholds
  //   one per layer (codes of common/chain_codes.h = pullgeom.tracing.activations.ACTIVATION_CODES);
  //   mu_weight, s_weight: (dz, w_L); s_bias: (dz,); sigma: code of common/chain_codes.h =
  //   pullgeom.encoder_output.SIGMA_CODES; latent_sqrt: (B, dz, dz) or None; first_gram:
  //   W_1 W_1^T (w_1, w_1).
  //   Returns gram (B, r, r) and left (B, r, w_1), r = min(2dz or dz, w_1, ..., w_L), with
  //   G = (left W_1)^T (left W_1) and gram = left first_gram left^T.
  m.def(
      "plan_gram(Tensor x, Tensor[] weights, Tensor[] biases, int[] activations, float[] params, "
      "float[] thresholds, Tensor mu_weight, Tensor s_weight, Tensor s_bias, int sigma, "
      "bool stochastic, Tensor? latent_sqrt, Tensor first_gram) -> (Tensor, Tensor)");
  // All eigenpairs of symmetric (B, n, n): eigenvalues (B, n) descending, eigenvectors
  // (B, n, n) as columns.
  m.def("sym_eigh(Tensor a) -> (Tensor, Tensor)");
  // Top-k eigenpairs of symmetric (B, n, n) by Lanczos with full reorthogonalisation:
  // values (B, k) descending, vectors (B, n, k), residuals ||A v - lambda v|| (B, k),
  // steps (B,) int64 (Lanczos steps taken per sample).
  m.def("lanczos_topk(Tensor a, int k, int max_steps, float tol) -> (Tensor, Tensor, Tensor, Tensor)");
}

namespace {

std::string torch_version() {
  return std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR);
}

bool with_cuda() {
#ifdef PULLGEOM_WITH_CUDA
  return true;
#else
  return false;
#endif
}

PyObject* py_torch_version(PyObject*, PyObject*) { return PyUnicode_FromString(torch_version().c_str()); }

PyObject* py_with_cuda(PyObject*, PyObject*) { return PyBool_FromLong(with_cuda()); }

PyMethodDef methods[] = {
    {"torch_version", py_torch_version, METH_NOARGS, "major.minor of the torch this extension was built against"},
    {"with_cuda", py_with_cuda, METH_NOARGS, "whether the CUDA kernels were compiled in"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "pullgeom's native kernels (ops under torch.ops.pullgeom)", -1,
                      methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
