"""The arithmetic behind the report's claims, against values computed by hand.

Spearman correlations (with ties), the Fig. 6 comparison of mixup models with the beta-VAE,
the eigen-vs-random attack ratio, which models get the expensive evaluations, and a whole
``assemble_sweep`` on made-up per-model results whose every number is known.
"""

import csv
import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from pullgeom.paper import attacks as attack
from pullgeom.paper.datasets import DATASETS
from pullgeom.paper.evaluation import EvalSettings, attack_grids, mean_image_mse, pick_evenly, plan_evaluation
from pullgeom.paper.figures import fig2_row_label, plot_mixup, pyplot_or_none
from pullgeom.paper.report import (
    AUTHORS_SCORES,
    COMPARISON_TITLE,
    FRONTIER_ABOVE,
    FRONTIER_BELOW,
    FRONTIER_INSIDE,
    PAPER_DIR_ENV,
    _eigen_vs_random,
    _fig2_numbers,
    _mixup_comparison,
    _mixup_reading,
    add_authors_comparison,
    assemble_sweep,
    attack_curves_csv,
    authors_comparison_csv,
    compare_with_authors,
    comparison_verdicts,
    neighbour_separation,
    read_authors_scores,
    spearman,
)
from pullgeom.paper.training import log_spaced

ROOT = Path(__file__).resolve().parents[1]


def test_pick_spreads_over_the_sweep_with_the_ends_included():
    betas = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0]
    assert pick_evenly(betas, 3) == [0.01, 0.3, 10.0]
    assert pick_evenly(betas, 2) == [0.01, 10.0]
    assert pick_evenly(betas, 1) == [0.01]  # once divided by zero
    assert pick_evenly(betas, 9) == betas
    assert pick_evenly(betas, 0) == []


# ----------------------------------------------------------------------------------------
# Spearman.


def test_spearman_with_ties_uses_average_ranks():
    # b = [3, 1, 3, 5, 4]: ranks (from 0) [1.5, 0, 1.5, 4, 3], mean 2, deviations
    # [-0.5, -2, -0.5, 2, 1]; a's rank deviations [-2, -1, 0, 1, 2]. Covariance sum
    # 1 + 2 + 0 + 2 + 2 = 7; squares 10 and 0.25 + 4 + 0.25 + 4 + 1 = 9.5: rho = 7 / sqrt(95).
    assert spearman([1, 2, 3, 4, 5], [3, 1, 3, 5, 4]) == pytest.approx(7 / math.sqrt(95), rel=1e-12)
    # Ranks, not values: any decreasing sequence gives -1, however uneven.
    assert spearman([0.01, 0.1, 1, 10], [1000.0, 3.0, 2.9, -5.0]) == pytest.approx(-1.0, rel=1e-12)
    # Ties on both sides: a ranks [0.5, 0.5, 2], b ranks [2, 0.5, 0.5] -> deviations
    # [-0.5, -0.5, 1] and [1, -0.5, -0.5]: (-0.5 + 0.25 - 0.5) / 1.5 = -0.5.
    assert spearman([1, 1, 2], [9, 4, 4]) == pytest.approx(-0.5, rel=1e-12)


def test_spearman_is_nan_without_variation():
    assert math.isnan(spearman([1, 2, 3], [5, 5, 5]))
    assert math.isnan(spearman([1], [2]))


# ----------------------------------------------------------------------------------------
# Fig. 6: mixup against the beta-VAE.


def _row(beta, radius, mse, mixup=0.0):
    # The authors'-convention radius only travels along (here the square root, as for J_mu alone).
    return {"beta": beta, "mixup": mixup, "spectral_radius_mean": radius,
            "authors_radius_mean": math.sqrt(radius), "recon_mse": mse}


# Radius rises and falls with beta (as in the 20-epoch run), so radius order is not beta order.
PLAIN = [_row(0.01, 8.0, 0.010), _row(0.1, 10.0, 0.012), _row(1.0, 2.0, 0.030), _row(10.0, 1.0, 0.050)]


def test_mixup_inside_the_frontier_is_compared_at_its_radius_and_at_its_beta():
    (got,) = _mixup_comparison(PLAIN, [_row(1.0, 4.0, 0.019, mixup=10.0)])
    # Sorted by radius the frontier runs (1, 0.05), (2, 0.03), (8, 0.01), (10, 0.012); radius 4
    # lies on the (2, 0.03)-(8, 0.01) segment, halfway in log radius: MSE 0.02.
    assert got["frontier"] == FRONTIER_INSIDE
    assert got["frontier_mse"] == pytest.approx(0.02, rel=1e-12)
    assert got["mse_no_worse_than_frontier"] is True  # 0.019 <= 0.02
    assert (got["plain_radius"], got["plain_mse"]) == (2.0, 0.030)  # beta 1 exactly, not the nearest radius
    assert (got["authors_radius"], got["plain_authors_radius"]) == (2.0, math.sqrt(2.0))
    assert got["lower_radius_than_plain"] is False  # 4 > 2
    (worse,) = _mixup_comparison(PLAIN, [_row(0.1, 9.0, 0.02, mixup=1.0)])
    # Between (8, 0.01) and (10, 0.012): t = log(9/8) / log(10/8).
    t = math.log(9 / 8) / math.log(10 / 8)
    assert worse["frontier_mse"] == pytest.approx(0.01 + t * 0.002, rel=1e-12)
    assert worse["mse_no_worse_than_frontier"] is False
    assert worse["lower_radius_than_plain"] is True  # 9 < 10


def test_mixup_outside_the_frontier_says_which_side_and_compares_with_the_nearest_plain_model():
    mixed = [_row(0.01, 0.5, 0.04, mixup=10.0), _row(10.0, 12.0, 0.2, mixup=1.0)]
    below, above = _mixup_comparison(PLAIN, mixed)
    assert below["frontier"] == FRONTIER_BELOW
    assert below["frontier_mse"] is None and below["mse_no_worse_than_frontier"] is None
    assert (below["nearest_plain_beta"], below["nearest_plain_radius"], below["nearest_plain_mse"]) == (
        10.0, 1.0, 0.050)
    assert below["mse_no_worse_than_nearest_plain"] is True  # 0.04 <= 0.05
    assert (below["plain_radius"], below["lower_radius_than_plain"]) == (8.0, True)
    assert above["frontier"] == FRONTIER_ABOVE
    assert (above["nearest_plain_beta"], above["nearest_plain_mse"]) == (0.1, 0.012)
    assert above["mse_no_worse_than_nearest_plain"] is False
    assert json.loads(json.dumps([below, above])) == [below, above]  # strict JSON: no NaN


def test_mixup_at_a_beta_without_a_plain_model_is_an_error():
    with pytest.raises(ValueError, match="no plain model of that beta"):
        _mixup_comparison(PLAIN, [_row(0.0719686, 1.0, 0.01, mixup=1.0)])
    configs = [{"beta": 0.01, "mixup": 0.0}, {"beta": 1.0, "mixup": 0.0}, {"beta": 0.1, "mixup": 1.0}]
    with pytest.raises(ValueError, match="no plain model of that beta"):
        plan_evaluation(configs, EvalSettings())  # before anything is evaluated


@pytest.mark.parametrize("name", sorted(DATASETS["mnist"].profiles))
def test_profiles_train_mixup_models_at_betas_of_their_grid(name):
    profile = DATASETS["mnist"].profiles[name]
    assert all(beta in profile.betas for beta, _ in profile.mixup_models)
    # The paper's mixup betas moved to the nearest grid point (in log beta): 0.1 -> 0.0719686 on
    # the quick grid (0.0268, 0.0720, 0.193: log distances 1.32, 0.33, 0.66).
    if name == "quick":
        assert profile.mixup_models == [(0.01, 10.0), (0.0719686, 1.0), (0.0719686, 10.0)]


# ----------------------------------------------------------------------------------------
# Eigen attack against a random direction.


def test_eigen_vs_random_compares_increases_over_the_clean_mse_near_norm_one():
    grid = torch.tensor([0.01, 0.1, 0.9, 3.0], dtype=torch.float64)  # |log 0.9| < |log 3|: index 2
    attacks = {  # unit_mse: (k = 2 directions, 4 norms); the second direction must not count
        "a": {"beta": 0.01, "unit_mse": [[0.10, 0.11, 0.50, 0.90], [9.0] * 4],
              "random_mse": [0.10, 0.10, 0.12, 0.2]},
        "b": {"beta": 1.0, "unit_mse": [[0.20, 0.20, 0.26, 0.40], [9.0] * 4],
              "random_mse": [0.20, 0.20, 0.20, 0.3]},
    }
    got = _eigen_vs_random(attacks, grid)
    assert got["budget"] == pytest.approx(0.9)
    assert got["betas"] == [0.01, 1.0]
    assert got["eigen_mse_increase"] == pytest.approx([0.40, 0.06])  # the top direction only
    assert got["random_mse_increase"] == pytest.approx([0.02, 0.0])
    assert got["mse_ratio"][0] == pytest.approx(20.0)
    assert got["mse_ratio"][1] == math.inf  # the random direction did nothing


# ----------------------------------------------------------------------------------------
# A whole report from made-up results.

SETTINGS = EvalSettings(score_limit=4, attack_limit=4, attack_steps=5, pgd_limit=2, pgd_steps=2,
                        decoder_limit=3, decoder_models=2, k=2)
CONFIGS = [{"beta": 0.01, "mixup": 0.0}, {"beta": 0.1, "mixup": 0.0}, {"beta": 1.0, "mixup": 0.0},
           {"beta": 0.1, "mixup": 10.0}]
NAMES = ["p0.01", "p0.1", "p1", "m0.1"]
RADIUS = [10.0, 5.0, 1.0, 2.0]  # per model, the mean over its 4 images
ENTROPY = [2.0, 2.0, 1.0, 1.5]  # a tie: Spearman over the plain models is -1.5 / sqrt(3)
MSE = [0.01, 0.02, 0.04, 0.02]
# The authors' convention, per model: the images' radii are (1, 2, 3, 10) / 4 x AUTHORS_RADIUS (mean
# AUTHORS_RADIUS, median 2.5 / 4 of it: the middle pair's mean, not torch.median's lower 2 / 4).
AUTHORS_RADIUS = [4.0, 3.0, 0.5, 1.0]
AUTHORS_ENTROPY = [3.0, 2.5, 1.0, 2.0]
# The plain frontier by radius: (1, 0.04), (5, 0.02), (10, 0.01); the mixup radius 2 is on the first segment.
FRONTIER = 0.04 + (0.02 - 0.04) * math.log(2) / math.log(5)


def _scores(radius: float, entropy: float, mse: float, n: int, authors_radius: float,
            authors_entropy: float) -> dict[str, torch.Tensor]:
    spread = torch.tensor([0.5, 1.5, 1.0, 1.0]) if n == 4 else torch.ones(n)
    authors_spread = torch.tensor([1.0, 2.0, 3.0, 10.0]) / 4 if n == 4 else torch.ones(n)
    return {"index": torch.arange(n), "spectral_radius": radius * spread,
            "entropy": torch.full((n,), entropy), "eigenvalues": torch.ones(n, SETTINGS.k),
            "recon_mse": torch.full((n,), mse), "authors_radius": authors_radius * authors_spread,
            "authors_entropy": torch.full((n,), authors_entropy)}


def _results(j: int, jobs: tuple[str, ...]) -> dict[str, torch.Tensor]:
    steps, k = SETTINGS.attack_steps, SETTINGS.k
    sections = {"scores": _scores(RADIUS[j], ENTROPY[j], MSE[j], 4, AUTHORS_RADIUS[j], AUTHORS_ENTROPY[j])}
    if "attacks" in jobs:
        # Unit grid log_grid(0.01, 10, 5): the point nearest norm 1 is 10^0.25 (index 3).
        eigen = torch.tensor([0.1, 0.1, 0.2, 0.5, 0.9], dtype=torch.float64)
        random = torch.tensor([0.1, 0.1, 0.1, 0.12, 0.2], dtype=torch.float64)
        latent = torch.linspace(0.1, 1.0, steps, dtype=torch.float64) * (j + 1)
        sections["attacks"] = {"paper_mse": eigen.expand(k, steps), "paper_latent": latent.expand(k, steps),
                               "unit_mse": eigen.expand(k, steps), "unit_latent": latent.expand(k, steps),
                               "random_mse": random, "random_latent": latent}
    if "examples" in jobs:
        x = torch.zeros(2, 1, 2, 2)
        step = torch.tensor([[0.3, 0.4], [0.0, 0.0]]).expand(2, 1, 2, 2)  # l2 norm 0.5
        per_image = torch.tensor([0.1, 0.2]).reshape(2, 1, 1, 1)  # clean reconstruction MSE 0.01, 0.04
        sections["examples"] = {"original": x, "reconstruction": x + per_image}
        for i, delta in enumerate(attack.FIG2_DELTAS):
            sections["examples"][f"corrupted_{delta}"] = x + step * (i + 1)
            sections["examples"][f"reconstruction_{delta}"] = x + 0.2 * (i + 1)
    if "theorem_pgd" in jobs:
        names = ("budgets", "pgd", "eigen_G", "eigen_mu", "random", "ratio_eigen_G_to_pgd",
                 "ratio_eigen_mu_to_pgd", "ratio_random_to_pgd")
        sections["theorem_pgd"] = {name: torch.linspace(1.0, 2.0, 6, dtype=torch.float64) for name in names}
    if "decoder_metric" in jobs:
        sections["decoder_metric"] = _scores(RADIUS[j] * 3, ENTROPY[j], MSE[j], 3, AUTHORS_RADIUS[j] * 2,
                                             AUTHORS_ENTROPY[j])
    return {f"{job}/{name}": value for job, values in sections.items() for name, value in values.items()}


@pytest.fixture(scope="module")
def assembled(tmp_path_factory):
    out = tmp_path_factory.mktemp("assembled")
    jobs = plan_evaluation(CONFIGS, SETTINGS)
    results = [_results(j, todo) for j, todo in enumerate(jobs)]
    summary = assemble_sweep(NAMES, CONFIGS, results, 10, out, SETTINGS, "made up")
    return out, summary


def test_summary_claims_from_known_results(assembled):
    out, summary = assembled
    assert summary["betas"] == [0.01, 0.1, 1.0]  # the plain models only
    assert summary["spectral_radius_mean"] == pytest.approx([10.0, 5.0, 1.0])
    assert summary["spearman_beta_spectral_radius"] == pytest.approx(-1.0)
    assert summary["spearman_beta_entropy"] == pytest.approx(-1.5 / math.sqrt(3))  # entropy 2, 2, 1
    assert summary["radius_ratio_smallest_to_largest_beta"] == pytest.approx(10.0)
    ratio = summary["eigen_vs_random"]
    assert ratio["budget"] == pytest.approx(10 ** 0.25)
    assert ratio["mse_ratio"] == pytest.approx([(0.5 - 0.1) / (0.12 - 0.1)] * 3)  # 20x for every beta
    (mixup,) = summary["mixup"]
    assert mixup["frontier_mse"] == pytest.approx(FRONTIER, rel=1e-6)
    assert mixup["plain_radius"] == pytest.approx(5.0)
    assert mixup["lower_radius_than_plain"] is True and mixup["mse_no_worse_than_frontier"] is True
    assert json.loads((out / "fig6_mixup.json").read_text()) == [mixup]
    decoder = summary["decoder_metric"]
    assert decoder["betas"] == [0.01, 1.0] and decoder["spectral_radius_mean"] == pytest.approx([30.0, 3.0])
    assert decoder["authors_convention"]["radius_mean"] == pytest.approx([8.0, 1.0])


def test_summary_carries_the_authors_convention_per_beta(assembled):
    out, summary = assembled
    block = summary["authors_convention"]
    assert set(block) == {"radius_mean", "radius_median", "entropy_mean", "entropy_median"}
    assert block["radius_mean"] == pytest.approx([4.0, 3.0, 0.5])  # the plain models, by beta
    assert block["radius_median"] == pytest.approx([2.5, 1.875, 0.3125])
    assert block["entropy_mean"] == pytest.approx([3.0, 2.5, 1.0]) == block["entropy_median"]
    assert summary["spearman_beta_authors_radius"] == pytest.approx(-1.0)
    assert summary["spearman_beta_authors_entropy"] == pytest.approx(-1.0)
    written = json.loads((out / "summary.json").read_text())
    assert written["authors_convention"] == block
    assert json.loads((out / "fig5_scores_vs_beta.json").read_text())["authors_convention"] == block
    model = written["models"]["m0.1"]  # a mixup model: in "models", not in the per-beta block
    assert model["authors_radius_mean"] == pytest.approx(1.0)
    assert model["authors_radius_median"] == pytest.approx(0.625)
    assert "authors_radius" not in model  # the per-image values stay out of summary.json
    (mixup,) = summary["mixup"]
    assert (mixup["authors_radius"], mixup["plain_authors_radius"]) == pytest.approx((1.0, 3.0))


def test_score_files_carry_both_conventions(assembled):
    out, _ = assembled
    with (out / "scores" / "p0.1.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["index", "spectral_radius", "entropy", "lambda_1", "lambda_2", "recon_mse",
                             "authors_radius", "authors_entropy"]
    assert [float(r["authors_radius"]) for r in rows] == pytest.approx([0.75, 1.5, 2.25, 7.5])
    assert [float(r["spectral_radius"]) for r in rows] == pytest.approx([2.5, 7.5, 5.0, 5.0])  # unchanged
    histograms = json.loads((out / "fig5_histograms.json").read_text())
    assert histograms["p1"]["authors_entropy"] == pytest.approx([1.0] * 4)


def test_fig2_json_holds_the_numbers_drawn(assembled):
    out, _ = assembled
    fig2 = json.loads((out / "fig2_examples.json").read_text())
    assert fig2["beta"] == 0.01 and len(fig2["images"]) == 2
    for i, image in enumerate(fig2["images"]):
        assert image["test_index"] == i
        assert image["recon_mse_clean"] == pytest.approx([0.01, 0.04][i])  # 0.1^2, 0.2^2 on every pixel
        # Corruption i + 1 times (0.3, 0.4, 0, 0): l2 norm 0.5 (i + 1); reconstruction 0.2 (i + 1).
        assert [c["delta"] for c in image["corrupted"]] == list(attack.FIG2_DELTAS)
        assert [c["perturbation_norm"] for c in image["corrupted"]] == pytest.approx([0.5, 1.0])
        assert [c["recon_mse"] for c in image["corrupted"]] == pytest.approx([0.04, 0.16])


def test_report_readings_state_the_numbers(assembled):
    out, _ = assembled
    sections = {part.split("\n", 1)[0]: part for part in (out / "report.md").read_text().split("\n## ")[1:]}
    reading = {title.split(":")[0]: text for title, text in sections.items()}
    assert "Clean reconstruction MSE 0.025 (0.01-0.04)" in reading["Fig. 2"]
    corrupted = "at delta = 0.7443 the perturbation's l2 norm is 1 (1-1) and the reconstruction MSE 0.16"
    assert corrupted in reading["Fig. 2"]
    # Latent curves: linspace(0.1, 1, 5) * (j + 1) over the paper grid log_grid(1e-3, 1, 5), whose points
    # nearest 0.01, 0.1 and 1 are 10^-2.25, 10^-0.75 and 1.
    latent = "at delta = 0.00562 / 0.178 / 1: beta 0.01: 0.325 / 0.775 / 1; beta 0.1: 0.65 / 1.55 / 2"
    assert latent in reading["Fig. 3"]
    assert "beta 0.01: radius median 10 (mean 10 +/- 4.08), entropy 2 +/- 0" in reading["Fig. 5 (a, b)"]
    mixup = (f"mean radius 2 vs 5 for the plain model of the same beta (lower); MSE 0.02 vs {FRONTIER:.3g} "
             "for the beta-VAE reaching that radius (interpolated): no worse.")
    assert mixup in reading["Fig. 6"]
    # _results' theorem lists are all linspace(1, 2, 6) over budgets linspace(1, 2, 6): the largest at 2.
    assert "Largest eigen(G) / PGD ratio over the budgets" in reading["Theorem 3.2 checked"]
    assert "beta 0.01: 2 at budget 2" in reading["Theorem 3.2 checked"]


def test_attack_grids_are_the_ones_the_readings_assume():
    paper, unit = attack_grids(SETTINGS)
    assert paper.tolist() == pytest.approx([10 ** e for e in (-3, -2.25, -1.5, -0.75, 0)])
    assert unit.tolist() == pytest.approx([10 ** e for e in (-2, -1.25, -0.5, 0.25, 1)])


def test_fig2_numbers_per_image_and_delta():
    # Two 1 x 2 x 2 images. Image i at delta d is corrupted by (i + 1)(d + 1) (3, 4, 0, 0): l2 norm
    # 5 (i + 1)(d + 1). Every pixel of the reconstructions is off by 0.1 and -0.2 (clean: MSE 0.01, 0.04)
    # and by -0.1 (d + 2) (corrupted: MSE 0.04, 0.09 for both images).
    per_image = torch.tensor([1.0, 2.0]).reshape(2, 1, 1, 1)
    original = torch.tensor([0.2, 0.5]).reshape(2, 1, 1, 1).expand(2, 1, 2, 2)
    direction = torch.tensor([[3.0, 4.0], [0.0, 0.0]]).expand(2, 1, 2, 2) * per_image
    examples = {"original": original,
                "reconstruction": original + torch.tensor([0.1, -0.2]).reshape(2, 1, 1, 1)}
    for d, delta in enumerate(attack.FIG2_DELTAS):
        examples[f"corrupted_{delta}"] = original + direction * (d + 1)
        examples[f"reconstruction_{delta}"] = original - 0.1 * (d + 2)
    got = _fig2_numbers(examples)
    assert [image["test_index"] for image in got] == [0, 1]
    assert [image["recon_mse_clean"] for image in got] == pytest.approx([0.01, 0.04])
    assert [[c["delta"] for c in image["corrupted"]] for image in got] == [list(attack.FIG2_DELTAS)] * 2
    assert [[c["perturbation_norm"] for c in image["corrupted"]] for image in got] == [
        pytest.approx([5.0, 10.0]), pytest.approx([10.0, 20.0])]
    errors = [[c["recon_mse"] for c in image["corrupted"]] for image in got]
    assert errors == [pytest.approx([0.04, 0.09])] * 2


def test_mixup_reading_outside_the_frontier_names_the_nearest_plain_model():
    (below,) = _mixup_comparison(PLAIN, [_row(0.01, 0.5, 0.06, mixup=10.0)])
    assert _mixup_reading(below) == (
        "beta 0.01, mixup 10: mean radius 0.5 vs 8 for the plain model of the same beta (lower); its "
        "radius is below every plain radius (nearest: 1 at beta 10), so no beta-VAE of the sweep reaches "
        "it; MSE 0.06 vs 0.05 for that nearest one: worse.")


def _decoded(path):
    return pyplot_or_none().imread(str(path))


def test_fig6_is_drawn_from_the_comparison_rows(assembled, tmp_path):
    out, _ = assembled
    assert _decoded(out / "fig6_mixup.png").ndim == 3
    assert "![Fig. 6: latent mixup vs the beta-VAE](fig6_mixup.png)" in (out / "report.md").read_text()
    # Outside the frontier on both sides, where the comparison rows lack frontier_mse.
    rows = _mixup_comparison(PLAIN, [_row(0.01, 0.5, 0.04, mixup=10.0), _row(10.0, 12.0, 0.2, mixup=1.0)])
    plot_mixup(pyplot_or_none(), PLAIN, rows, tmp_path / "outside.png")
    assert _decoded(tmp_path / "outside.png").ndim == 3


def test_without_matplotlib_every_number_is_written_and_no_figure(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    assert pyplot_or_none() is None
    jobs = plan_evaluation(CONFIGS, SETTINGS)
    summary = assemble_sweep(NAMES, CONFIGS, [_results(j, todo) for j, todo in enumerate(jobs)], 10, tmp_path,
                             SETTINGS, "made up")
    assert not list(tmp_path.rglob("*.png"))
    report = (tmp_path / "report.md").read_text()
    assert "matplotlib is not installed: numbers only" in report and "![" not in report
    assert json.loads((tmp_path / "fig6_mixup.json").read_text()) == summary["mixup"]
    names = {path.name for path in tmp_path.glob("*.json")}
    assert names == {"summary.json", "attacks.json", "fig2_examples.json", "fig3_latent_vs_delta.json",
                     "fig5_histograms.json", "fig5_mse_vs_step.json", "fig5_scores_vs_beta.json",
                     "fig6_mixup.json", "fig8_10_decoder_metric.json", "theorem_pgd.json"}


def test_json_outputs_are_strict_json(tmp_path):
    """An undefined Spearman (NaN) or a ratio over a zero baseline (inf) is written as null, so
    strict JSON parsers (which reject NaN / Infinity) read every file reproduce writes."""
    from pullgeom.paper.outputs import atomic_write_json

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    path = tmp_path / "out.json"
    atomic_write_json(path, {"spearman": float("nan"), "ratio": [1.5, float("inf"), -float("inf")],
                             "nested": {"x": (2.0, float("nan"))}, "n": 3})
    assert json.loads(path.read_text(), parse_constant=refuse) == {
        "spearman": None, "ratio": [1.5, None, None], "nested": {"x": [2.0, None]}, "n": 3}


# ----------------------------------------------------------------------------------------
# Beside the authors' published numbers.

AUTHORS_HEADER = "beta,n_images,radius_mean,radius_std,entropy_mean,entropy_std,mse_top1_smallest_step\n"


def _authors_file(path, rows: list[tuple[float, float, float]]):
    """An authors_mnist_scores.csv of (beta, radius_mean, entropy_mean) rows, spreads 0.5 and 0.1."""
    path.write_text(AUTHORS_HEADER + "".join(f"{b},3072,{r},0.5,{e},0.1,0.01\n" for b, r, e in rows))
    return path


def test_comparison_lays_ours_beside_theirs_at_the_betas_of_both(assembled, tmp_path):
    _, summary = assembled
    # Ours: betas 0.01, 0.1, 1 with radius 4, 3, 0.5 and entropy 3, 2.5, 1. Theirs (unsorted, with a
    # beta 0.5 we lack): radius 2, 3, 1, so ranked against beta (1, 2, 3) it is (2, 3, 1): Spearman
    # -0.5, and against ours (3, 2, 1): +0.5.
    rows = [(0.1, 3.0, 2.0), (0.01, 2.0, 4.0), (1.0, 1.0, 1.5), (0.5, 1.0, 1.5)]
    authors = read_authors_scores(_authors_file(tmp_path / "a.csv", rows))
    assert [a["beta"] for a in authors] == [0.01, 0.1, 0.5, 1.0]
    got = compare_with_authors(summary, authors)
    assert [r["beta"] for r in got["rows"]] == [0.01, 0.1, 1.0] and got["unmatched_betas"] == []
    first, second, _ = got["rows"]
    assert (first["ours_radius_mean"], first["authors_radius_mean"], first["radius_ratio"]) == (4.0, 2.0, 2.0)
    assert (second["ours_entropy_mean"], second["authors_entropy_mean"]) == (2.5, 2.0)
    assert second["entropy_ratio"] == pytest.approx(1.25)
    # Our spread from the model's images (1, 2, 3, 10) x 3 / 4: the sample std.
    assert second["ours_radius_std"] == pytest.approx(float(torch.tensor([1.0, 2, 3, 10]).std()) * 0.75)
    assert second["authors_radius_std"] == 0.5
    rho = got["spearman_beta"]
    assert (rho["radius"]["ours"], rho["radius"]["authors"]) == pytest.approx((-1.0, -0.5))
    assert (rho["entropy"]["ours"], rho["entropy"]["authors"]) == pytest.approx((-1.0, -1.0))
    assert got["spearman_ours_authors"] == pytest.approx({"radius": 0.5, "entropy": 1.0})
    assert got["n_images"] == {"ours": 4, "authors": 3072}
    text = authors_comparison_csv(got["rows"]).splitlines()
    assert text[0].startswith("beta,ours_radius_mean,authors_radius_mean,radius_ratio,ours_entropy_mean")
    assert text[1].startswith("0.01,4,2,2,3,4,0.75,") and len(text) == 4


def test_comparison_matches_betas_to_six_digits_and_needs_two_of_them(tmp_path):
    summary = {"betas": [0.0719686, 0.2, 0.3], "n_scored": 8,
               "authors_convention": {"radius_mean": [3.0, 2.0, 1.0], "radius_median": [3.0, 2.0, 1.0],
                                      "entropy_mean": [2.0, None, 1.0], "entropy_median": [2.0, None, 1.0]}}
    # 0.07196857 is the grid's 0.0719686 at 7 digits; 0.202 is 1% off 0.2 and matches nothing.
    rows = [(0.07196857, 3.0, 1.0), (0.202, 1.0, 1.0), (0.3, 0.5, 0.5)]
    authors = read_authors_scores(_authors_file(tmp_path / "a.csv", rows))
    got = compare_with_authors(summary, authors)
    assert [r["beta"] for r in got["rows"]] == [0.0719686, 0.3] and got["unmatched_betas"] == [0.2]
    assert math.isnan(got["rows"][0]["ours_radius_std"])  # no per-model entries in this summary
    summary["betas"] = [0.0719686, 0.2, 0.25]
    with pytest.raises(ValueError, match="only 1 of the run's betas"):
        compare_with_authors(summary, authors)


@pytest.mark.parametrize("text, message", [
    (None, "cannot read the authors' scores"),
    ("beta,n_images,radius_mean,entropy_mean,entropy_std\n0.01,3072,1,1,1\n", "has no column radius_std"),
    (AUTHORS_HEADER + "0.01,3072,1,0.5,1,0.1,0.01\n0.1,3072,n/a,0.5,1,0.1,0.01\n", "line 3"),
    (AUTHORS_HEADER, "no rows"),
])
def test_bad_authors_files_are_refused_with_the_reason(tmp_path, text, message):
    path = tmp_path / "authors_mnist_scores.csv"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_authors_scores(path)


def test_compare_authors_on_a_finished_run_replaces_its_section(assembled, tmp_path):
    source, _ = assembled
    run = tmp_path / "run"
    shutil.copytree(source, run)
    before = (run / "report.md").read_text()
    add_authors_comparison(run, _authors_file(tmp_path / "a.csv", [(0.01, 8.0, 4.0), (1.0, 1.0, 2.0)]))
    second = _authors_file(tmp_path / "b.csv", [(0.01, 2.0, 6.0), (0.1, 1.0, 5.0)])
    entry = add_authors_comparison(run, second)
    report = (run / "report.md").read_text()
    assert report.startswith(before) and report.count(f"## {COMPARISON_TITLE}") == 1  # the second replaced it
    assert "| 0.01 | 4 | 2 | 2 | 3 | 6 | 0.5 |" in report and "`b.csv`" in report
    assert entry["spearman_ours_authors"] == pytest.approx({"radius": 1.0, "entropy": 1.0})
    assert json.loads((run / "summary.json").read_text())["authors_comparison"] == entry
    assert (run / "authors_comparison.csv").read_text().splitlines()[2].startswith("0.1,3,1,3,2.5,5,0.5,")
    assert (run / "authors_comparison.png").stat().st_size > 1000
    old = json.loads((run / "summary.json").read_text())
    del old["authors_convention"]
    (run / "summary.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="no authors_convention block"):
        add_authors_comparison(run, tmp_path / "b.csv")
    with pytest.raises(ValueError, match="no readable summary.json"):
        add_authors_comparison(tmp_path / "nothing", tmp_path / "b.csv")


def test_the_authors_published_numbers_are_what_the_docs_say():
    """docs/reproduction.md's facts about the authors' file: their 50-beta grid is ours, the mean
    radius rises between neighbouring betas 14 times of 49, and both curves rank-correlate with
    beta at about -0.97."""
    path = Path(os.environ.get(PAPER_DIR_ENV) or ROOT.parent / "shared" / "paper") / AUTHORS_SCORES
    if not path.is_file():
        pytest.skip(f"the authors' scores are not at {path}")
    authors = read_authors_scores(path)
    betas = [a["beta"] for a in authors]
    assert betas == pytest.approx(log_spaced(0.01, 10, 50), rel=1e-6)
    radius = [a["radius_mean"] for a in authors]
    assert sum(b > a for a, b in zip(radius, radius[1:], strict=False)) == 14
    assert spearman(betas, radius) == pytest.approx(-0.969, abs=1e-3)
    assert spearman(betas, [a["entropy_mean"] for a in authors]) == pytest.approx(-0.967, abs=1e-3)
    assert (radius[0], authors[0]["entropy_mean"]) == (4.26662, 4.94815)


def test_fig5d_json_holds_the_unit_scaling_curves_and_the_random_direction(assembled):
    out, _ = assembled
    drawn = json.loads((out / "fig5_mse_vs_step.json").read_text())["p0.01"]
    assert drawn["scaling"] == "unit"
    assert drawn["norms"] == pytest.approx(attack_grids(SETTINGS)[1].tolist())
    assert drawn["random_mse"] == pytest.approx([0.1, 0.1, 0.1, 0.12, 0.2])  # _results' random curve
    assert len(drawn["mse"]) == SETTINGS.k


def test_decoder_reading_says_which_neighbouring_intervals_separate(assembled):
    out, summary = assembled
    # Decoder radius 30 and 3, entropy 2 and 1, each the same on its 3 images: zero-width intervals.
    separation = summary["decoder_metric"]["separation"]
    assert separation["spectral_radius"] == {"ci95": [0.0, 0.0], "separated": [True], "images_needed": [1]}
    report = (out / "report.md").read_text()
    assert "95 % interval of each mean (1.96 std / sqrt(3))" in report
    assert "Radius: the intervals of 1 of 1 neighbouring betas separate." in report


def test_neighbour_separation_against_hand_computed_intervals():
    # n = 100: half-widths 1.96 * (2, 2, 1) / 10. Means 10 and 10.1 overlap (0.1 < 0.784) and would
    # separate at ceil((1.96 * 4 / 0.1)^2) = 6147 images; 10.1 and 5 separate (5.1 > 0.588); equal
    # means never do.
    got = neighbour_separation([10.0, 10.1, 5.0, 5.0], [2.0, 2.0, 1.0, 1.0], 100)
    assert got["ci95"] == pytest.approx([0.392, 0.392, 0.196, 0.196])
    assert got["separated"] == [False, True, False]
    assert got["images_needed"] == [6147, 2, None]


def test_comparison_verdicts_name_the_claims_the_collapse_and_the_training_length(tmp_path):
    # Predicting the mean image costs 0.05: a model at >= 0.049 collapsed. Ours collapsed at beta 10,
    # theirs at 1 and 10; betas 0.01 and 0.1 are left, the largest of them 0.1.
    summary = {"betas": [0.01, 0.1, 1.0, 10.0], "n_scored": 8, "recon_mse": [0.01, 0.02, 0.03, 0.0495],
               "mean_image_mse": 0.05, "epochs": 6,
               "authors_convention": {"radius_mean": [2.0, 1.5, 1.0, 0.1], "radius_median": [0] * 4,
                                      "entropy_mean": [5.0, 3.0, 2.0, 3.5], "entropy_median": [0] * 4}}
    path = tmp_path / "a.csv"
    path.write_text(AUTHORS_HEADER + "0.01,3072,4,1,5,0.1,0.01\n0.1,3072,2,1,3.9,0.1,0.02\n"
                    "1,3072,0.01,1,2.5,0.1,0.049\n10,3072,0.02,1,0.2,0.1,0.05\n")
    comparison = compare_with_authors(summary, read_authors_scores(path))
    assert comparison["collapsed"] == {"mean_image_mse": 0.05, "ours": [10.0], "authors": [1.0, 10.0]}
    assert comparison["epochs"] == {"ours": 6, "authors": 100}
    lines = comparison_verdicts(comparison)
    # Ours: radius falls (-1); entropy 5, 3, 2, 3.5 ranks (4, 2, 1, 3) against (1, 2, 3, 4): -0.4.
    # Theirs: radius 4, 2, 0.01, 0.02 ranks (4, 3, 1, 2): -0.8.
    assert lines[0] == ("'radius falls as beta grows' (Spearman <= -0.9): holds on ours (-1), does not hold "
                        "on theirs (-0.8).")
    assert lines[1] == ("'entropy falls as beta grows' (Spearman <= -0.8): does not hold on ours (-0.4), "
                        "holds on theirs (-1).")
    assert lines[2] == "Radius at beta 0.01: ours 2, theirs 4, ratio 0.5: not within 30%."
    assert lines[3] == "Entropy at beta 0.01: ours 5, theirs 5, ratio 1: within 30%."
    assert lines[4].startswith("Collapse (reconstruction MSE >= 0.98 x 0.05, that of predicting the test "
                               "images' mean image): at beta 10 in ours, 1, 10 in theirs;")
    assert lines[5] == ("Without the betas collapsed on either side (2 of 4 left), Spearman(beta, mean "
                        "score): radius: ours -1, theirs -1; entropy: ours -1, theirs -1.")
    assert lines[6] == ("At the largest beta collapsed on neither side (0.1): radius 1.5 vs 2 (0.75x), "
                        "entropy 3 vs 3.9 (0.769x).")
    assert lines[7].startswith("Training length: ours 6 epochs, theirs 100:")
    del summary["mean_image_mse"]  # a run written before the reference MSE: no collapse lines
    assert not any(line.startswith("Collapse") for line in comparison_verdicts(
        compare_with_authors(summary, read_authors_scores(path))))


def test_mean_image_mse_and_fig2_labels():
    images = torch.tensor([0.0, 2.0, 4.0, 6.0]).reshape(2, 1, 1, 2)  # mean image (2, 4): every pixel off by 2
    assert mean_image_mse(images) == 4.0
    assert fig2_row_label("original") == "original"
    assert fig2_row_label("corrupted_0.5233") == "corrupted,\ndelta = 0.5233"
    assert fig2_row_label("reconstruction_0.7443") == "its reconstruction,\ndelta = 0.7443"


def test_attack_curves_csv_carries_the_boxed_attack_when_run():
    grid = torch.tensor([0.1, 1.0], dtype=torch.float64)
    curves = {name: torch.zeros(1, 2, dtype=torch.float64) for name in
              ("paper_mse", "paper_latent", "unit_mse", "unit_latent")}
    curves |= {name: torch.zeros(2, dtype=torch.float64) for name in ("random_mse", "random_latent")}
    assert "box" not in attack_curves_csv(curves, grid, grid)
    curves |= {"box_mse": torch.tensor([0.01, 0.02]), "box_latent": torch.tensor([0.5, 1.5])}
    lines = attack_curves_csv(curves, grid, grid).splitlines()
    assert lines[-2:] == ["box,perturb,0.1,0.01,0.5", "box,perturb,1,0.02,1.5"]
