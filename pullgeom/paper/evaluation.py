"""The numbers of the paper's evaluation, one model at a time: its scores, attack curves, Fig. 2's
corrupted examples, the PGD check of Theorem 3.2 and its decoder-metric scores.

``score_dataset`` scores given dataset indices: the unit of work of ``pullgeom score``, which a
distributed runner shards. For a sweep, ``plan_evaluation`` says which experiments each model
takes part in and ``evaluate_model`` computes every number of one model, so a distributed runner
can run it on that model's rank; ``pullgeom.paper.report`` then compares the models and writes
the files. ``attack_curves``, ``fig2_examples`` and ``pgd_comparison`` are the jobs ``pullgeom
attack`` runs on a checkpoint, on its own images and delta grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

import pullgeom
from pullgeom.paper import attacks as attack


# The per-image columns of ``score_dataset`` (besides "index"). Stored shards of scores name them in
# their fingerprint, so rows an older version computed without a column are never reused.
SCORE_COLUMNS = ("spectral_radius", "entropy", "eigenvalues", "recon_mse", "authors_radius",
                 "authors_entropy")


def score_dataset(
    model,
    images: Tensor,
    indices: Tensor | None = None,
    *,
    k: int = 5,
    decoder_metric: bool = False,
    batch_size: int = 256,
    progress: bool = True,
) -> dict[str, Tensor]:
    """Scores of ``images[i]`` for each dataset index i in ``indices`` (default: all).

    images: (n, *S); returns {"index" (m,) int64, "spectral_radius" (m,), "entropy" (m,),
    "eigenvalues" (m, k), "recon_mse" (m,), "authors_radius" (m,), "authors_entropy" (m,)}: the
    rows of scores.csv, in ``indices`` order. The first scores are the paper's convention (the
    eigenvalues of G); ``authors_*`` the authors' published one (``pullgeom.scores(...,
    convention="authors")``: the singular values of J_mu, s_max and the entropy over s / s_max;
    with ``decoder_metric`` those of G_z^(1/2) J_mu, the same convention on J_mu^T G_z J_mu).
    """
    model = model.eval()
    indices = torch.arange(images.shape[0]) if indices is None else torch.as_tensor(indices)
    decoder = model.decoder if decoder_metric else None
    parts: dict[str, list[Tensor]] = {name: [] for name in SCORE_COLUMNS}
    for start in tqdm(range(0, len(indices), batch_size), desc="scoring", leave=False, disable=not progress):
        x = images[indices[start : start + batch_size]]
        spec = pullgeom.spectrum(model.encoder, x, k=k, decoder=decoder)
        # The authors' convention needs the spectrum of J_mu alone: a second solve, without sigma.
        authors = pullgeom.spectrum(model.encoder, x, k=1, decoder=decoder, stochastic=False)
        authors = authors.scores(convention="authors")
        with torch.no_grad():
            recon = model.decoder(model.encoder(x)[0]).reshape(x.shape)
        parts["spectral_radius"].append(spec.spectral_radius)
        parts["entropy"].append(spec.entropy)
        parts["eigenvalues"].append(spec.eigenvalues)
        parts["recon_mse"].append((recon - x).square().reshape(x.shape[0], -1).mean(-1))
        parts["authors_radius"].append(authors.spectral_radius)
        parts["authors_entropy"].append(authors.entropy)
    empty = {
        "spectral_radius": torch.zeros(0),
        "entropy": torch.zeros(0),
        "eigenvalues": torch.zeros(0, k),
        "recon_mse": torch.zeros(0),
        "authors_radius": torch.zeros(0),
        "authors_entropy": torch.zeros(0),
    }
    out = {key: torch.cat(value) if value else empty[key] for key, value in parts.items()}
    return {"index": indices.to(torch.int64), **out}


# ----------------------------------------------------------------------------------------
# The jobs of one model, each on its own images.

FIG2_IMAGES = 8  # test images in the Fig. 2 grid


def attack_curves(model, x: Tensor, k: int, paper_grid: Tensor, unit_grid: Tensor,
                  box: tuple[float, float] | None = None) -> dict[str, Tensor]:
    """Attack curves averaged over x (B, *S), along the top-k eigenvectors of each image's G.

    The eigen attacks in the paper scaling over ``paper_grid`` (Dp,) and in the unit scaling
    over ``unit_grid`` (Du,), a random direction of the same l2 norm over ``unit_grid``, and
    with a ``box`` (lo, hi) ``attack.perturb_curves`` (``pullgeom.perturb`` inside the box) over
    ``unit_grid``. Returns float64 ``paper_mse``, ``paper_latent`` (k, Dp); ``unit_mse``,
    ``unit_latent`` (k, Du); ``random_mse``, ``random_latent`` (Du,); with a box ``box_mse``,
    ``box_latent`` (Du,).
    """
    spec = pullgeom.spectrum(model.encoder, x, k=k)
    paper = attack.eigen_attack(model, x, spec, paper_grid, "paper")
    unit = attack.eigen_attack(model, x, spec, unit_grid, "unit")
    rnd = attack.random_attack(model, x, unit_grid)
    curves = {"paper_mse": paper.mse, "paper_latent": paper.latent, "unit_mse": unit.mse,
              "unit_latent": unit.latent, "random_mse": rnd.mse[0], "random_latent": rnd.latent[0]}
    if box is not None:
        boxed = attack.perturb_curves(model, x, unit_grid, box)
        curves |= {"box_mse": boxed.mse[0], "box_latent": boxed.latent[0]}
    return curves


def fig2_examples(model, x: Tensor) -> dict[str, Tensor]:
    """Fig. 2's rows for the first ``FIG2_IMAGES`` images of x (B, *S): ``attack.corrupted_examples``
    along each image's own top right singular vector of J_mu, stepped by its singular value (the
    authors' scale); every row (min(B, 8), *S), in drawing order."""
    x = x[:FIG2_IMAGES]
    top = pullgeom.spectrum(model.encoder, x, k=1, stochastic=False)  # Fig. 2 uses v_1 of J_mu only
    return attack.corrupted_examples(model, x, top)


def pgd_comparison(model, x: Tensor, pgd_steps: int) -> dict[str, Tensor]:
    """Theorem 3.2 on x (B, *S): ``attack.theorem_check``'s lists over six l2 budgets in
    [0.05, 2], each as a (6,) float64 tensor."""
    checked = attack.theorem_check(model, x, attack.log_grid(0.05, 2.0, 6), pgd_steps)
    # float64 holds every float of the lists exactly: .tolist() gives them back unchanged.
    return {name: torch.tensor(values, dtype=torch.float64) for name, values in checked.items()}


# ----------------------------------------------------------------------------------------
# A sweep's evaluation: which model takes part in which experiment, and all numbers of one model.


@dataclass(frozen=True)
class EvalSettings:
    """How much of each experiment to run (profiles set these)."""

    score_limit: int = 500  # test images scored per model
    attack_limit: int = 64  # test images attacked per model
    attack_steps: int = 40  # delta grid size (the paper: 40)
    pgd_limit: int = 32  # test images for the PGD comparison
    pgd_steps: int = 30
    decoder_limit: int = 64  # test images for the decoder-metric variant (Eq. 11)
    decoder_models: int = 4  # betas (spread over the sweep) for the decoder-metric variant
    k: int = 5
    batch_size: int = 256
    # Pixel range (lo, hi) of the boxed attack (``attack.perturb_curves``) on the attacked images,
    # or None to skip it: a projected power iteration per image and budget, about as costly again
    # as all the unboxed curves together (BENCHMARKS.md). No profile runs it yet, so that a new
    # run's attacks.json stays comparable with the committed ones.
    box: tuple[float, float] | None = None


# The experiments a model can take part in; also the key prefixes of ``evaluate_model``'s result.
SCORES, ATTACKS, EXAMPLES, THEOREM, DECODER = "scores", "attacks", "examples", "theorem_pgd", "decoder_metric"


def pick_evenly(items: list, count: int) -> list:
    """``count`` items spread evenly over ``items`` (first and last included when count >= 2)."""
    if len(items) <= count:
        return list(items)
    return [items[round(i * (len(items) - 1) / max(count - 1, 1))] for i in range(count)]


def split_models(configs: list[dict]) -> tuple[list[int], list[int]]:
    """Positions in ``configs`` of the plain (mixup 0) models and of the mixup models, each by beta."""
    by_beta = sorted(range(len(configs)), key=lambda j: configs[j]["beta"])  # stable: ties keep their order
    plain = [j for j in by_beta if not configs[j].get("mixup")]
    return plain, [j for j in by_beta if configs[j].get("mixup")]


def plain_at_beta(plain_betas: list[float], beta: float) -> int:
    """Position in ``plain_betas`` of exactly ``beta``.

    Fig. 6 compares each mixup model with the plain model of the same beta, so a mixup beta that
    is not in the plain grid is an error rather than a comparison with a neighbouring beta.
    """
    try:
        return plain_betas.index(beta)
    except ValueError:
        raise ValueError(f"the mixup model at beta {beta} has no plain model of that beta (plain betas: "
                         f"{plain_betas}); train mixup models at betas of the plain sweep") from None


def plan_evaluation(configs: list[dict], settings: EvalSettings) -> list[tuple[str, ...]]:
    """The experiments of each model, in ``configs`` order.

    Every model is scored (Figs. 5, 6); the plain ones are attacked (Figs. 3, 5 d); the smallest
    plain beta draws Fig. 2; three plain betas spread over the sweep are checked against PGD and
    ``settings.decoder_models`` are scored with the decoder metric (Figs. 8-10).
    """
    plain, mixed = split_models(configs)
    if len(plain) < 2:
        raise ValueError("evaluate_sweep needs at least two plain (mixup 0) models to compare betas")
    for j in mixed:  # before any evaluation, not when Fig. 6 is assembled at the end
        plain_at_beta([configs[i]["beta"] for i in plain], configs[j]["beta"])
    jobs = [[SCORES] for _ in configs]
    roles = ((ATTACKS, plain), (EXAMPLES, plain[:1]), (THEOREM, pick_evenly(plain, 3)),
             (DECODER, pick_evenly(plain, settings.decoder_models)))
    for job, members in roles:
        for j in members:
            jobs[j].append(job)
    return [tuple(todo) for todo in jobs]


def mean_image_mse(images: Tensor) -> float:
    """images (n, *S) -> the mean over images and pixels of (x - the images' mean image)^2: the
    reconstruction MSE of a model that returns the mean image for every input (a collapsed VAE
    trained on these images' distribution comes within a few percent of it)."""
    images = images.double()
    return float((images - images.mean(0)).square().mean())


def images_used(settings: EvalSettings) -> int:
    """How many of the first test images ``evaluate_model`` reads, at most."""
    return max(settings.score_limit, settings.attack_limit, settings.pgd_limit, settings.decoder_limit)


def attack_grids(settings: EvalSettings) -> tuple[Tensor, Tensor]:
    """(attack_steps,) float64 delta grids: the paper scaling's (Figs. 3, 5 d) and the unit scaling's
    (the comparison with a random direction of the same l2 norm)."""
    steps = settings.attack_steps
    return attack.log_grid(1e-3, 1.0, steps), attack.log_grid(1e-2, 10.0, steps)


def _score_job(model, test_images: Tensor, settings: EvalSettings) -> dict[str, Tensor]:
    return score_dataset(model, test_images[: settings.score_limit], k=settings.k,
                         batch_size=settings.batch_size, progress=False)


def _attack_job(model, test_images: Tensor, settings: EvalSettings) -> dict[str, Tensor]:
    return attack_curves(model, test_images[: settings.attack_limit], settings.k, *attack_grids(settings),
                         box=settings.box)


def _examples_job(model, test_images: Tensor, settings: EvalSettings) -> dict[str, Tensor]:
    return fig2_examples(model, test_images[: settings.attack_limit])


def _theorem_job(model, test_images: Tensor, settings: EvalSettings) -> dict[str, Tensor]:
    return pgd_comparison(model, test_images[: settings.pgd_limit], settings.pgd_steps)


def _decoder_job(model, test_images: Tensor, settings: EvalSettings) -> dict[str, Tensor]:
    return score_dataset(model, test_images[: settings.decoder_limit], k=settings.k, decoder_metric=True,
                         batch_size=64, progress=False)


_JOBS = {SCORES: _score_job, ATTACKS: _attack_job, EXAMPLES: _examples_job, THEOREM: _theorem_job,
         DECODER: _decoder_job}


def evaluate_model(model, jobs: tuple[str, ...], test_images: Tensor,
                   settings: EvalSettings) -> dict[str, Tensor]:
    """Every number of a sweep's evaluation that depends on this model alone.

    jobs: the model's entry of ``plan_evaluation``; test_images: (n, *S). Returns
    ``"<job>/<name>" -> tensor``, in insertion order: ``scores/*`` and ``decoder_metric/*`` are
    ``score_dataset``'s rows over the first ``score_limit`` / ``decoder_limit`` images;
    ``attacks/*`` ``attack_curves`` over the first ``attack_limit`` images on ``attack_grids``;
    ``examples/*`` ``fig2_examples`` (<= 8, *S) in drawing order; ``theorem_pgd/*``
    ``pgd_comparison``'s (6,) float64 tensors. The random directions and PGD starts come from
    generators seeded inside ``attack`` on every call, so the result is the same whichever
    process computes it, and after whatever it computed before.
    """
    result = {}
    for job in jobs:
        for name, value in _JOBS[job](model, test_images, settings).items():
            # A copy: a view of the test set would carry (and pickle, when gathered) all of it.
            result[f"{job}/{name}"] = value.detach().cpu().clone()
    return result
