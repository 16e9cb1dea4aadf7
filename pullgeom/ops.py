"""Python wrappers of pullgeom's native ops (``torch.ops.pullgeom.*``).

Loading: importing this module imports the compiled extension ``pullgeom._C``, which registers
the op schemas and their CPU (and, in CUDA builds, CUDA) kernels with ``torch.library``. When
the extension is missing, or was built against a different torch, nothing is registered,
``EXTENSION_ERROR`` says why and what to do, and calling an op raises ``RuntimeError`` with that
message; the rest of pullgeom keeps working on the pure-torch backends. The shape-only "fake"
implementations below let ``torch.compile(fullgraph=True)`` trace code that calls the ops.

Every op takes and returns float32 or float64 contiguous tensors on one device.
"""

from __future__ import annotations

import importlib
import warnings

import torch
from torch import Tensor

from pullgeom.encoder import SIGMA_CODES
from pullgeom.plan import MLPPlan


def _load_extension() -> str | None:
    """Import ``pullgeom._C``; None on success, else the reason (with the fix)."""
    try:
        extension = importlib.import_module("pullgeom._C")
    except ModuleNotFoundError:
        return ("the native extension pullgeom._C is not built; install with `pip install .` "
                "(or `python setup.py build_ext --inplace` in a checkout)")
    except (ImportError, OSError) as error:
        # An undefined-symbol error here almost always means another torch built it.
        return (f"the native extension pullgeom._C failed to load ({error}); it was probably built "
                f"against another torch than the installed {torch.__version__}: rebuild it with "
                "`pip install --no-build-isolation .`")
    built = extension.torch_version()
    installed = ".".join(torch.__version__.split(".")[:2])
    if built != installed:
        return (f"the native extension pullgeom._C was built against torch {built} but torch "
                f"{torch.__version__} is installed; rebuild it with `pip install --no-build-isolation .`")
    return None


EXTENSION_ERROR: str | None = _load_extension()
if EXTENSION_ERROR is not None and "not built" not in EXTENSION_ERROR:
    warnings.warn(f"pullgeom: {EXTENSION_ERROR}; the cpp and cuda backends are disabled", stacklevel=2)


def extension_with_cuda() -> bool:
    """Whether the loaded extension has the CUDA kernels compiled in."""
    if EXTENSION_ERROR is not None:
        return False
    from pullgeom import _C

    return bool(_C.with_cuda())


def _require_extension() -> None:
    if EXTENSION_ERROR is not None:
        raise RuntimeError(f"pullgeom: {EXTENSION_ERROR}")


def plan_gram(x: Tensor, plan: MLPPlan, first_gram: Tensor, *, sigma: str = "logvar",
              stochastic: bool = True, latent_sqrt: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Fused MLP chain: per-sample small Gram and left factor (MATH.md 2).

    x: (B, N); plan: an MLPPlan with >= 1 hidden layer, on x's device and dtype; first_gram:
    W_1 W_1^T (w_1, w_1); latent_sqrt: (B, dz, dz) = G_z^{1/2} or None.
    Returns gram (B, r, r) and left (B, r, w_1), r = plan.rank_bound(stochastic) without N,
    with G = (left W_1)^T (left W_1) and gram = left first_gram left^T (symmetric).
    Deterministic for a given input, device and thread count.
    """
    _require_extension()
    layers = plan.layers
    # Traced plans are contiguous already (then this is free); hand-built ones may hold views.
    return torch.ops.pullgeom.plan_gram(
        x, [layer.weight.contiguous() for layer in layers], [layer.bias.contiguous() for layer in layers],
        [layer.activation_code for layer in layers], [float(layer.param) for layer in layers],
        [float(layer.threshold) for layer in layers], plan.mu_weight.contiguous(),
        plan.s_weight.contiguous(), plan.s_bias.contiguous(), SIGMA_CODES[sigma], stochastic,
        latent_sqrt, first_gram)


def sym_eigh(a: Tensor) -> tuple[Tensor, Tensor]:
    """All eigenpairs of symmetric ``a: (B, n, n)`` (the symmetric part (a + a^T) / 2 is used).

    Returns eigenvalues (B, n) descending and eigenvectors (B, n, n) as columns. CPU: float64
    Householder tridiagonalisation + implicit QL per matrix; CUDA: parallel cyclic Jacobi, one
    matrix per thread block. Deterministic.
    """
    _require_extension()
    return torch.ops.pullgeom.sym_eigh(a)


def lanczos_topk(a: Tensor, k: int, *, max_steps: int | None = None,
                 tol: float | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top-k eigenpairs of symmetric ``a: (B, n, n)`` by Lanczos (full reorthogonalisation).

    max_steps: Krylov steps per sample (default n); tol: relative residual at which a sample
    stops (default 1e-6 for float32, 1e-10 for float64). Returns eigenvalues (B, k)
    descending, eigenvectors (B, n, k) as unit columns, residuals ||a v - lambda v|| (B, k)
    and the steps each sample took (B,) int64. Breakdowns (rank-deficient a) are deflated,
    never NaN. Deterministic (fixed pseudo-random start vectors). The CUDA kernel runs one
    sample per thread block with a float64 workspace of about m (n + m) + (k + 4) n doubles per
    sample (m = min(max_steps, n)): 20 KB for n = 32, 1 MB for n = 256.
    """
    _require_extension()
    if tol is None:
        tol = 1e-6 if a.dtype == torch.float32 else 1e-10
    n = a.shape[-1] if a.dim() == 3 else 0
    return torch.ops.pullgeom.lanczos_topk(a, k, max_steps if max_steps is not None else max(n, k), tol)


def _check_square_batch(a: Tensor) -> None:
    """The native kernels' checks on ``a``, for the fake (meta) path, with the same messages."""
    torch._check(a.dtype in (torch.float32, torch.float64),
                 lambda: f"pullgeom: a must be float32 or float64, got {a.dtype}")
    torch._check(a.dim() == 3 and a.shape[1] == a.shape[2],
                 lambda: f"pullgeom: a must be a batch of square matrices (B, n, n), got shape "
                         f"{tuple(a.shape)}")


if EXTENSION_ERROR is None:
    @torch.library.register_fake("pullgeom::plan_gram")
    def _plan_gram_fake(x, weights, biases, activations, params, thresholds, mu_weight, s_weight, s_bias,
                        sigma, stochastic, latent_sqrt, first_gram):
        heads = mu_weight.shape[0] * (2 if stochastic else 1)
        rank = heads
        for weight in weights:
            rank = torch.sym_min(rank, weight.shape[0])
        w1 = weights[0].shape[0]
        return x.new_empty(x.shape[0], rank, rank), x.new_empty(x.shape[0], rank, w1)

    @torch.library.register_fake("pullgeom::sym_eigh")
    def _sym_eigh_fake(a):
        _check_square_batch(a)
        return a.new_empty(a.shape[0], a.shape[1]), a.new_empty(a.shape)

    @torch.library.register_fake("pullgeom::lanczos_topk")
    def _lanczos_topk_fake(a, k, max_steps, tol):
        _check_square_batch(a)
        batch, n = a.shape[0], a.shape[1]
        torch._check(1 <= k <= n, lambda: f"pullgeom: k = {k} must be between 1 and n = {n}")
        torch._check(max_steps >= k, lambda: f"pullgeom: max_steps = {max_steps} must be at least k = {k}")
        torch._check(0 < tol < 1, lambda: f"pullgeom: tol = {tol} must be a relative tolerance in (0, 1)")
        return (a.new_empty(batch, k), a.new_empty(batch, n, k), a.new_empty(batch, k),
                a.new_empty(batch, dtype=torch.int64))


__all__ = ["EXTENSION_ERROR", "extension_with_cuda", "lanczos_topk", "plan_gram", "sym_eigh"]
