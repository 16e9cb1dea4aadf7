"""pullgeom: exact spectra of a VAE encoder's stochastic pullback metric.

G(x) = J_mu^T J_mu + J_sigma^T J_sigma (optionally with a decoder metric G_z inserted);
its top eigenvector is the optimal one-step l2 attack, its spectral radius and von Neumann
entropy the robustness scores (Khan & Storkey, AISTATS 2023).

The public names below are imported on first use (PEP 562), so ``import pullgeom`` alone, and
with it ``pullgeom --help``, does not pay for importing torch.
"""

import importlib

from pullgeom import _moved

__version__ = "0.1.0"

_moved.install()

# public name -> the module that defines it
_PUBLIC = {
    "PullbackMetric": "pullgeom.api", "Spectrum": "pullgeom.api", "entropy_estimate": "pullgeom.api",
    "metric": "pullgeom.api", "scores": "pullgeom.api", "spectrum": "pullgeom.api",
    "perturb": "pullgeom.perturbation",
    "BackendInfo": "pullgeom.backends", "list_backends": "pullgeom.backends",
    "EntropyEstimate": "pullgeom.linalg.slq", "Scores": "pullgeom.spectral_scores",
}

__all__ = [*sorted(_PUBLIC), "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
    else:  # a submodule not imported yet (``pullgeom.backends`` after ``import pullgeom``)
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
