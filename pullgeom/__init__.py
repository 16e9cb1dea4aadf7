"""pullgeom: exact spectra of a VAE encoder's stochastic pullback metric.

G(x) = J_mu^T J_mu + J_sigma^T J_sigma (optionally with a decoder metric G_z inserted);
its top eigenvector is the optimal one-step l2 attack, its spectral radius and von Neumann
entropy the robustness scores (Khan & Storkey, AISTATS 2023).
"""

from pullgeom.api import PullbackMetric, Spectrum, metric, scores, spectrum
from pullgeom.backends import BackendInfo, backend_infos as backends
from pullgeom.linalg.slq import EntropyEstimate, entropy_estimate
from pullgeom.spectral_scores import Scores

__version__ = "0.1.0"

__all__ = ["BackendInfo", "EntropyEstimate", "PullbackMetric", "Scores", "Spectrum", "backends",
           "entropy_estimate", "metric", "scores", "spectrum", "__version__"]
