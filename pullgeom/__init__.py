"""pullgeom: exact spectra of a VAE encoder's stochastic pullback metric.

G(x) = J_mu^T J_mu + J_sigma^T J_sigma (optionally with a decoder metric G_z inserted);
its top eigenvector is the optimal one-step l2 attack, its spectral radius and von Neumann
entropy the robustness scores (Khan & Storkey, AISTATS 2023).
"""

from pullgeom import _moved
from pullgeom.api import PullbackMetric, Spectrum, entropy_estimate, metric, scores, spectrum
from pullgeom.backends import BackendInfo, list_backends
from pullgeom.linalg.slq import EntropyEstimate
from pullgeom.spectral_scores import Scores

__version__ = "0.1.0"

_moved.install()

__all__ = ["BackendInfo", "EntropyEstimate", "PullbackMetric", "Scores", "Spectrum", "entropy_estimate",
           "list_backends", "metric", "scores", "spectrum", "__version__"]
