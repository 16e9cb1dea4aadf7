"""Python wrappers of pullgeom's native ops (``torch.ops.pullgeom.*``).

Loading the kernels, first that works wins; each registers the op schemas and their CPU (and,
in CUDA builds, CUDA) kernels with ``torch.library``:

1. at import, the extension built with the package, ``pullgeom._C`` (``pip install
   --no-build-isolation .`` compiles it against the torch of the build environment);
2. at import, a CPU build of the shipped kernel sources that an earlier process compiled against
   this very torch (cached under torch's extensions directory, ``TORCH_EXTENSIONS_DIR``);
3. on first use, compiling those sources with ``torch.utils.cpp_extension.load`` (CPU kernels
   only; about a minute on two cores, once per torch version and source change; announced on
   the ``pullgeom`` logger). A plain ``pip install .`` builds in an isolated environment without
   torch, so it ships the sources (``pullgeom/_csrc``; ``csrc/`` beside the package in a checkout)
   and takes this path. "First use" is the first op call, ``load_extension()``, or the first read
   of ``EXTENSION_ERROR``, which ``pullgeom.list_backends()`` and ``backend="auto"`` do.

When none works (no C++ compiler or ninja, a compile error, or a ``pullgeom._C`` built against
another torch that still loaded and so holds the op names), ``EXTENSION_ERROR`` says why and
what to do, calling an op raises ``RuntimeError`` with that message, and the rest of pullgeom
keeps working on the pure-torch backends. The shape-only "fake" implementations registered with
the kernels let ``torch.compile(fullgraph=True)`` trace code that calls the ops.

Every op takes and returns float32 or float64 contiguous tensors on one device.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from pullgeom.encoder_output import SIGMA_CODES
from pullgeom.tracing.mlp_plan import MLPPlan, rank_bound

log = logging.getLogger("pullgeom")

# Flags of the first-use CPU build; setup.py gives its ahead-of-time CppExtension the same ones.
# C++20: torch 2.13's headers need it. OpenMP: the CPU kernels run the batch in parallel.
CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp"]
LD_FLAGS = ["-fopenmp"]
# File name of the first-use build. Whatever the file is called, it is imported as the module
# pullgeom._C, whose init function (PyInit__C, csrc/pullgeom.cpp) Python looks up by that name.
_COMPILED_NAME = "pullgeom_cpu"
_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # pullgeom/, where setup.py puts _csrc

_lock = threading.Lock()
_extension: ModuleType | None = None  # the loaded extension module
_error: str | None = None  # why the ops are unusable; None while loaded or not yet tried
_prebuilt_failure: str | None = None  # why pullgeom._C, present, did not load


def kernel_sources_dir() -> Path | None:
    """The C++ kernel sources: installed in the package (``pullgeom/_csrc``, copied there by
    setup.py), or the checkout's ``csrc/`` beside the package; None when neither is there."""
    for root in (_PACKAGE_DIR / "_csrc", _PACKAGE_DIR.parent / "csrc"):
        if (root / "pullgeom.cpp").is_file():
            return root
    return None


def _cpu_sources(root: Path) -> list[Path]:
    """The translation units of the CPU extension, as setup.py lists them."""
    return sorted([*root.glob("*.cpp"), *root.glob("cpu/*.cpp")])


def _build_directory(root: Path) -> Path:
    """Where the first-use build lives: one folder per torch build, Python, flags and source
    contents, so a cached build found there is never stale."""
    from torch.utils.cpp_extension import get_default_build_root

    digest = hashlib.sha256()
    for part in (torch.__version__, str(torch.version.git_version), sys.version, *CXX_FLAGS, *LD_FLAGS):
        digest.update(part.encode() + b"\0")
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if path.is_file() and "cuda" not in relative.parts:
            digest.update(relative.as_posix().encode() + b"\0" + path.read_bytes())
    base = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    torch_tag = re.sub(r"[^\w.]", "_", torch.__version__)
    return base / f"pullgeom_cpu_torch{torch_tag}_{digest.hexdigest()[:16]}"


def _compiled_file(build_dir: Path) -> Path:
    from torch.utils.cpp_extension import LIB_EXT

    return build_dir / f"{_COMPILED_NAME}{LIB_EXT}"


def _import_file(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("pullgeom._C", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} is not an extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _torch_mismatch(extension: ModuleType) -> str | None:
    built = extension.torch_version()
    installed = ".".join(torch.__version__.split(".")[:2])
    if built == installed:
        return None
    return (f"the native extension pullgeom._C was built against torch {built} but torch "
            f"{torch.__version__} is installed; rebuild it with `pip install --no-build-isolation .`, "
            "or reinstall with `pip install .` to compile it against this torch on first use")


def _loaded(extension: ModuleType) -> None:
    global _extension
    _extension = extension
    _register_fakes()


def _load_at_import() -> None:
    """Steps 1 and 2 of the module docstring; step 3 is left to ``load_extension``."""
    global _error, _prebuilt_failure
    try:
        prebuilt = importlib.import_module("pullgeom._C")
    except ModuleNotFoundError:
        prebuilt = None
    except (ImportError, OSError) as error:
        # Typically undefined symbols: built against another torch. The dynamic loader failed
        # before the library's initialisers ran, so no op is registered and a fresh build can be.
        prebuilt = None
        _prebuilt_failure = f"pullgeom._C does not load with torch {torch.__version__} ({error})"
    if prebuilt is not None:
        _error = _torch_mismatch(prebuilt)
        if _error is None:
            _loaded(prebuilt)
        else:  # it registered the op names, so no other build can take them in this process
            warnings.warn(f"pullgeom: {_error}; the cpp and cuda backends are disabled", stacklevel=3)
        return
    root = kernel_sources_dir()
    if root is None:
        return
    cached = _compiled_file(_build_directory(root))
    if cached.is_file():
        try:
            _loaded(_import_file(cached))
        except (ImportError, OSError) as error:  # a damaged cache: load_extension rebuilds it
            log.info("pullgeom: the cached CPU kernels at %s do not load (%s)", cached, error)


@contextlib.contextmanager
def _path_with(directory: str | None) -> Iterator[None]:
    """PATH with ``directory`` in front for the duration (torch's build runs ``ninja`` from PATH)."""
    if directory is None:
        yield
        return
    saved = os.environ.get("PATH", "")
    os.environ["PATH"] = directory + os.pathsep + saved
    try:
        yield
    finally:
        os.environ["PATH"] = saved


def ninja_directory() -> tuple[bool, str | None]:
    """(found, directory to put on PATH): ninja on PATH already, or the ``ninja`` package's binary
    (its scripts folder is not on PATH when a virtualenv's python runs without activating it)."""
    if shutil.which("ninja") is not None:
        return True, None
    try:
        import ninja
    except ImportError:
        return False, None
    directory = getattr(ninja, "BIN_DIR", "")
    return (bool(directory) and shutil.which("ninja", path=directory) is not None), directory


def _compiler_message(error: BaseException) -> str:
    """The compiler's first error lines out of torch's long build failure message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return " | ".join((errors or lines[-3:])[:3])[:1000]


def _compile_cpu_extension() -> tuple[ModuleType | None, str | None]:
    """Step 3 of the module docstring: (module, None) or (None, why not)."""
    why = (f"{_prebuilt_failure}, " if _prebuilt_failure is not None
           else "the native extension pullgeom._C is not built, ")
    root = kernel_sources_dir()
    if root is None:
        return None, (why + "and its C++ sources are not installed either: reinstall pullgeom with "
                      "`pip install .`")
    compiler = os.environ.get("CXX", "c++")  # the compiler torch's build runs
    if shutil.which(compiler) is None:
        return None, (why + f"and compiling its CPU kernels needs a C++ compiler: {compiler!r} is not "
                      "found (install g++ or clang++, or point CXX at one)")
    ninja_found, ninja_dir = ninja_directory()
    if not ninja_found:
        return None, why + "and compiling its CPU kernels needs ninja: `pip install ninja`"
    build_dir = _build_directory(root)
    log.warning("pullgeom: %scompiling the C++ CPU kernels against torch %s; once per torch version, "
                "about a minute on two cores (cached in %s)", why, torch.__version__, build_dir)
    start = time.perf_counter()
    try:
        from torch.utils.cpp_extension import load

        build_dir.mkdir(parents=True, exist_ok=True)
        with _path_with(ninja_dir):
            load(_COMPILED_NAME, [str(source) for source in _cpu_sources(root)], extra_cflags=CXX_FLAGS,
                 extra_ldflags=LD_FLAGS, build_directory=str(build_dir), is_python_module=False)
        extension = _import_file(_compiled_file(build_dir))
    except (RuntimeError, OSError, ImportError, subprocess.SubprocessError) as error:
        # RuntimeError: torch's build failed (the compiler's message inside); OSError: the cache
        # folder is not writable; ImportError: the built library does not load.
        return None, f"{why}and compiling its CPU kernels failed: {_compiler_message(error)}"
    log.warning("pullgeom: compiled the CPU kernels in %.0f s", time.perf_counter() - start)
    return extension, None


def load_extension() -> str | None:
    """Make the native ops usable: None when they are, else why not (with the fix).

    Compiles the CPU kernels on the first call when no built extension was found at import
    (module docstring); later calls return at once with the same answer, never retrying.
    """
    global _error
    with _lock:
        if _extension is None and _error is None:
            extension, _error = _compile_cpu_extension()
            if extension is not None:
                _loaded(extension)
        return _error


def __getattr__(name: str):
    # EXTENSION_ERROR reads like a constant, but reading it may first compile the kernels.
    if name == "EXTENSION_ERROR":
        return load_extension()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def extension_with_cuda() -> bool:
    """Whether the loaded extension has the CUDA kernels compiled in."""
    if load_extension() is not None:
        return False
    return bool(_extension.with_cuda())


def _require_extension() -> None:
    # A plain global test once loaded: torch.compile traces this (the native backends are traceable).
    if _extension is None:
        error = load_extension()
        if error is not None:
            raise RuntimeError(f"pullgeom: {error}")


def plan_gram(plan: MLPPlan, x2d: Tensor, *, sigma: str = "logvar", stochastic: bool = True,
              latent_sqrt: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Fused MLP chain: per-sample left factor and small Gram (MATH.md 2).

    plan: an MLPPlan with >= 1 hidden layer, on x2d's device and dtype; x2d: (B, N);
    latent_sqrt: (B, dz, dz) = G_z^{1/2} or None. Returns left (B, r, w_1) and gram (B, r, r),
    r = plan.rank_bound(stochastic) without N, with G = (left W_1)^T (left W_1) and
    gram = left (W_1 W_1^T) left^T (symmetric). The same signature as the Triton op's wrapper
    (``pullgeom.kernels.triton.plan_gram.plan_gram``). Deterministic for a given input, device
    and thread count.
    """
    _require_extension()
    layers = plan.layers
    # Traced plans are contiguous already (then this is free); hand-built ones may hold views.
    gram, left = torch.ops.pullgeom.plan_gram(
        x2d, [layer.weight.contiguous() for layer in layers], [layer.bias.contiguous() for layer in layers],
        [layer.activation_code for layer in layers], [float(layer.param) for layer in layers],
        [float(layer.threshold) for layer in layers], plan.mu_weight.contiguous(),
        plan.s_weight.contiguous(), plan.s_bias.contiguous(), SIGMA_CODES[sigma], stochastic,
        None if latent_sqrt is None else latent_sqrt.contiguous(), plan.first_layer_gram)
    return left, gram


def sym_eigh(a: Tensor) -> tuple[Tensor, Tensor]:
    """All eigenpairs of symmetric ``a: (B, n, n)`` (the symmetric part (a + a^T) / 2 is used).

    Returns eigenvalues (B, n) descending and eigenvectors (B, n, n) as columns. CPU: float64
    Householder tridiagonalisation + implicit QL per matrix; CUDA: parallel cyclic Jacobi, one
    matrix per thread block. A matrix with a NaN or inf entry gets NaN values and vectors (the
    others are unaffected). Deterministic.
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
    never NaN; a matrix with a NaN or inf entry gets NaN values, vectors and residuals, 0 steps.
    Deterministic (fixed pseudo-random start vectors). The CUDA kernel runs one sample per thread
    block with a float64 workspace of about m (n + m) + (k + 4) n doubles per
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


def _register_fakes() -> None:
    """Shape-only implementations of the ops for torch.compile, once the ops are registered."""

    @torch.library.register_fake("pullgeom::plan_gram")
    def _plan_gram_fake(x, weights, biases, activations, params, thresholds, mu_weight, s_weight, s_bias,
                        sigma, stochastic, latent_sqrt, first_gram):
        # Without N: the chain compresses its rows to the narrowest hidden width, not the input's.
        rank = rank_bound(mu_weight.shape[0], stochastic, [weight.shape[0] for weight in weights])
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


_load_at_import()

# EXTENSION_ERROR is served by the module __getattr__ above, which ruff cannot see.
__all__ = ["EXTENSION_ERROR", "extension_with_cuda", "kernel_sources_dir", "lanczos_topk",  # noqa: F822
           "load_extension", "ninja_directory", "plan_gram", "sym_eigh"]
