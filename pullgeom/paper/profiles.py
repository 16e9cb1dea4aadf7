"""The sizes of ``pullgeom reproduce`` runs: each dataset's ``quick`` and ``paper`` profiles
(``pullgeom.paper.datasets.DATASETS`` says which dataset runs which)."""

from __future__ import annotations

from dataclasses import dataclass

from pullgeom.paper.evaluation import EvalSettings
from pullgeom.paper.training import log_spaced


@dataclass(frozen=True)
class Profile:
    """Sizes of a reproduction run."""

    betas: list[float]
    mixup_models: list[tuple[float, float]]  # (beta, mixup weight)
    epochs: int
    limit: int | None  # training images (None: all of them)
    batch_size: int
    evaluation: EvalSettings
    likelihood: str | None = None  # None: the architecture's (``pullgeom.paper.models.ARCHITECTURES``)
    lr_schedule: str = "constant"  # ``pullgeom.paper.training.LR_SCHEDULES``


def on_grid(betas: list[float], mixup_models: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(beta, weight) pairs with each beta moved to the grid beta nearest it on a log scale: Fig. 6
    compares a mixup model with the plain model of exactly its beta, so it must be a grid point."""
    return [(min(betas, key=lambda b: max(b / beta, beta / b)), weight) for beta, weight in mixup_models]


def _paper_sweep(evaluation: EvalSettings, likelihood: str | None = None) -> Profile:
    """The paper's sweep as its authors ran it (docs/reproduction.md): 50 betas (logspace(-2, 1, 50)),
    100 epochs on every training image with Adam on a cosine schedule (T_max 200 epochs), and the
    mixup model of the paper's Fig. 6: beta 1 (the grid's nearest, 1.048), weight 1, Beta(0.5, 0.5).
    Their batch size and learning rate are not known: 128 and the CLI's --lr are ours."""
    betas = log_spaced(0.01, 10, 50)
    return Profile(betas, on_grid(betas, [(1.0, 1.0)]), 100, None, 128, evaluation, likelihood=likelihood,
                   lr_schedule="cosine")


_QUICK_BETAS = log_spaced(0.01, 10, 8)
# The paper's MLP (MNIST, Fashion-MNIST, mnist-small).
MLP_PROFILES = {
    # 8 betas + 3 mixup models on 20k training images for 5 epochs: 2 min on 2 quiet CPU cores
    # (--epochs 20 --train-images 0, all 60k images: 21 min, within the 30 minutes quick is meant for).
    "quick": Profile(_QUICK_BETAS, on_grid(_QUICK_BETAS, [(0.01, 10.0), (0.1, 1.0), (0.1, 10.0)]), 5, 20000,
                     128, EvalSettings(score_limit=1000, attack_limit=100, pgd_limit=32, decoder_limit=48)),
    # The authors scored the first 3072 test images. Their loss is not known; their models collapse
    # to the mean image at beta >= 7.5, which a Bernoulli likelihood does not do and the summed
    # squared error ("sse", F.mse_loss(reduction="sum"), the usual choice in VAE code) can.
    "paper": _paper_sweep(EvalSettings(score_limit=3072, attack_limit=500, pgd_limit=128, decoder_limit=256,
                                       decoder_models=8), likelihood="sse"),
}

# The conv VAE's spectra and attacks cost ~100x the MLP's per image, so celeba has its own sizes.
_CELEBA_QUICK_BETAS = log_spaced(0.01, 10, 6)
CELEBA_PROFILES = {
    # The paper's conv VAE (32..512 filters, latent 128): 6 betas + 2 mixup models, 2 epochs on
    # 1024 images. Its spectra run on autograd at ~1 s per image on 2 CPU cores (12,288 inputs,
    # 256 Jacobian rows), so evaluation is kept to 32 scored and 8 attacked images per model.
    # Measured (pullgeom reproduce --profile quick --dataset celeba on 1,200 generated 178 x 218
    # JPEGs, 2 quiet CPU cores, 2026-11-24): 3 min 37 s wall (training 96 s, 392 s of CPU), 2.0 GB
    # peak resident. On the same cores loaded by other jobs (load average 3.5-6) training alone
    # took 4 min 50 s.
    "quick": Profile(_CELEBA_QUICK_BETAS, on_grid(_CELEBA_QUICK_BETAS, [(0.01, 10.0), (0.1, 10.0)]), 2, 1024,
                     64, EvalSettings(score_limit=32, attack_limit=8, attack_steps=20, pgd_limit=4,
                                      decoder_limit=4, decoder_models=2)),
    # The paper's sweep on every CelebA training image (162,770 with list_eval_partition.txt);
    # its runtime is not measured (no GPU was available to this change).
    "paper": _paper_sweep(EvalSettings(score_limit=2000, attack_limit=128, pgd_limit=32, decoder_limit=64,
                                       decoder_models=8)),
}
