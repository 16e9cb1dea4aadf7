"""A sweep's results assembled into the paper's figures (drawn by ``pullgeom.paper.figures``), the
CSV/JSON of every number drawn, report.md with a reading of each figure, and summary.json.

``assemble_sweep`` compares the models of a sweep from each model's ``evaluation.evaluate_model``
result and writes every file; ``evaluate_sweep`` runs both steps in one process (a distributed
runner splits them: ``pullgeom.paper.distributed.evaluate_sweep``). ``scores_csv`` and
``attack_curves_csv`` are the CSV files of ``pullgeom score`` and ``pullgeom attack``.

Scores are reported in two conventions: the paper's equations (eigenvalues of G: the keys
``spectral_radius`` and ``entropy``) and the authors' published code (singular values of J_mu,
entropy over s / s_max: the keys ``authors_*`` and summary.json's ``authors_convention`` block).
``write_authors_comparison`` lays a sweep's numbers in the authors' convention beside the authors'
own (``authors_mnist_scores.csv``); ``reproduce`` and ``pullgeom compare-authors`` run it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import Tensor
from tqdm.auto import tqdm

from pullgeom.paper import attacks as attack
from pullgeom.paper.evaluation import (
    ATTACKS,
    DECODER,
    EXAMPLES,
    SCORES,
    THEOREM,
    EvalSettings,
    attack_grids,
    evaluate_model,
    mean_image_mse,
    pick_evenly,
    plain_at_beta,
    plan_evaluation,
    split_models,
)
from pullgeom.paper.figures import (
    plot_authors_comparison,
    plot_fig2,
    plot_histograms,
    plot_latent_vs_delta,
    plot_mixup,
    plot_mse_vs_step,
    plot_scores_vs_beta,
    plot_theorem,
    pyplot_or_none,
)
from pullgeom.paper.outputs import atomic_write_json, atomic_write_text, load_checkpoint

SUMMARY_KEYS = (
    "betas",
    "spectral_radius_mean",
    "spectral_radius_std",
    "entropy_mean",
    "entropy_std",
    "recon_mse",
    "spearman_beta_spectral_radius",
    "spearman_beta_entropy",
    "authors_convention",
    "spearman_beta_authors_radius",
    "spearman_beta_authors_entropy",
)
# summary.json's "authors_convention" block: per beta (the order of "betas"), over each model's images.
AUTHORS_CONVENTION_KEYS = ("radius_mean", "radius_median", "entropy_mean", "entropy_median")


# ----------------------------------------------------------------------------------------
# CSV files and statistics.


def scores_csv(scores: dict[str, Tensor]) -> str:
    """CSV text: index, spectral_radius, entropy, lambda_1 .. lambda_k, recon_mse (the paper's
    convention: eigenvalues of G), then authors_radius, authors_entropy (the authors' convention,
    ``evaluation.score_dataset``)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    k = scores["eigenvalues"].shape[1]
    writer.writerow(
        ["index", "spectral_radius", "entropy", *[f"lambda_{i + 1}" for i in range(k)], "recon_mse",
         "authors_radius", "authors_entropy"]
    )
    for row in range(len(scores["index"])):
        writer.writerow(
            [
                int(scores["index"][row]),
                f"{float(scores['spectral_radius'][row]):.8g}",
                f"{float(scores['entropy'][row]):.8g}",
                *[f"{float(v):.8g}" for v in scores["eigenvalues"][row]],
                f"{float(scores['recon_mse'][row]):.8g}",
                f"{float(scores['authors_radius'][row]):.8g}",
                f"{float(scores['authors_entropy'][row]):.8g}",
            ]
        )
    return buffer.getvalue()


def attack_curves_csv(curves: dict[str, Tensor], paper_grid: Tensor, unit_grid: Tensor) -> str:
    """CSV text of ``evaluation.attack_curves`` on ``paper_grid`` and ``unit_grid``: scaling,
    direction, delta, mse, latent_distance; a row per delta of each eigendirection v_1 .. v_k in
    the paper scaling, then in the unit scaling, then of the random direction (unit scaling), then
    when the curves have them of the boxed attack (scaling ``box``, direction ``perturb``: delta
    is the l2 budget, as in the unit scaling)."""
    rows = ["scaling,direction,delta,mse,latent_distance"]

    def add(scaling: str, direction: str, grid: Tensor, mse: Tensor, latent: Tensor) -> None:
        rows.extend(f"{scaling},{direction},{d:.6g},{m:.6g},{z:.6g}"
                    for d, m, z in zip(grid.tolist(), mse.tolist(), latent.tolist(), strict=True))

    for scaling, grid in (("paper", paper_grid), ("unit", unit_grid)):
        per_direction = zip(curves[f"{scaling}_mse"], curves[f"{scaling}_latent"], strict=True)
        for i, (mse, latent) in enumerate(per_direction):
            add(scaling, f"v_{i + 1}", grid, mse, latent)
    add("unit", "random", unit_grid, curves["random_mse"], curves["random_latent"])
    if "box_mse" in curves:
        add("box", "perturb", unit_grid, curves["box_mse"], curves["box_latent"])
    return "\n".join(rows) + "\n"


def spearman(a, b) -> float:
    """Spearman rank correlation of two equal-length sequences (average ranks for ties)."""

    def ranks(values):
        values = np.asarray(values, dtype=np.float64)
        order = values.argsort(kind="stable")
        result = np.empty(len(values))
        result[order] = np.arange(len(values), dtype=np.float64)
        for value in np.unique(values):
            tied = values == value
            result[tied] = result[tied].mean()
        return result

    ra, rb = ranks(a), ranks(b)
    if len(ra) < 2 or ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


# ----------------------------------------------------------------------------------------
# Figures: each writes NAME.png (when matplotlib imports) and NAME.json with the numbers drawn.


@dataclass
class Report:
    """Sections of report.md and the files written, in order."""

    out: Path
    sections: list[str] = field(default_factory=list)
    plt: object = None

    def add(self, title: str, image: str | None, numbers: str, reading: str) -> None:
        picture = f"![{title}]({image})\n\n" if image and (self.out / image).exists() else ""
        self.sections.append(f"## {title}\n\n{picture}Numbers: [{numbers}]({numbers})\n\n{reading}\n")

    def write(self, header: str) -> None:
        atomic_write_text(self.out / "report.md", header + "\n\n" + "\n".join(self.sections))


def _fmt(value: float) -> str:
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3g}"


def _spread(values: list[float]) -> str:
    """"mean (min-max)" of ``values``, for readings that summarise a few images or models."""
    return f"{_fmt(float(np.mean(values)))} ({_fmt(min(values))}-{_fmt(max(values))})"


# ----------------------------------------------------------------------------------------
# The whole evaluation of a sweep, in two steps: ``evaluation.evaluate_model`` computes everything
# that depends on one model (so a distributed runner can run it on that model's rank) and
# ``assemble_sweep`` everything that compares models, from those results.


def evaluate_sweep(
    checkpoints: list[Path],
    test_images: Tensor,
    out: str | Path,
    settings: EvalSettings,
    title: str,
    progress: bool = True,
    notes: str = "",
    authors_csv: Path | None = None,
) -> dict:
    """Score, attack and plot every model; writes figures, CSV/JSON, report.md and summary.json.

    checkpoints: model directories (plain models have mixup 0; mixup models are compared in
    Fig. 6); test_images: (n, *S); authors_csv: the authors' published scores to compare with
    (``write_authors_comparison``), or None. Returns the summary dict (keys ``SUMMARY_KEYS`` and more).
    """
    models = [load_checkpoint(path) for path in checkpoints]
    configs = [config for _, config in models]
    jobs = plan_evaluation(configs, settings)
    bar = tqdm(list(zip(models, jobs, strict=True)), desc="evaluating models", disable=not progress)
    results = [evaluate_model(model, todo, test_images, settings) for (model, _), todo in bar]
    return assemble_sweep([path.name for path in checkpoints], configs, results, test_images.shape[0], out,
                          settings, title, notes, authors_csv,
                          mean_image_mse(test_images[: settings.score_limit]))


@dataclass
class _Sweep:
    """A sweep's per-model results (checkpoint order) and the report they are assembled into."""

    names: list[str]
    configs: list[dict]
    results: list[dict[str, Tensor]]
    n_test: int
    settings: EvalSettings
    report: Report
    plain: list[int]  # positions of the plain models, by beta
    mixed: list[int]  # positions of the mixup models, by beta

    @property
    def out(self) -> Path:
        return self.report.out

    @property
    def plt(self):
        return self.report.plt

    def beta(self, j: int) -> float:
        return self.configs[j]["beta"]

    def section(self, j: int, job: str) -> dict[str, Tensor]:
        """Model j's results of one job, without the ``<job>/`` prefix."""
        prefix = f"{job}/"
        return {key[len(prefix):]: value for key, value in self.results[j].items() if key.startswith(prefix)}


# The thresholds docs/results.md states for "falls as beta grows": Spearman(beta, score) at most these.
CLAIM_THRESHOLDS = {"spectral_radius": -0.9, "entropy": -0.8}


def claim_verdicts(summary: dict) -> str:
    """One line per score: does it fall as beta grows on this run, from its Spearman correlation."""
    lines = []
    for score, threshold in CLAIM_THRESHOLDS.items():
        rho = summary.get(f"spearman_beta_{score}")
        name = score.replace("_", " ")
        if rho is None or rho != rho:
            lines.append(f"the paper's claim '{name} falls as beta grows': not decided (no Spearman correlation)")
        elif rho <= threshold:
            lines.append(f"the paper's claim '{name} falls as beta grows': holds on this run "
                         f"(Spearman {rho:.2f} <= {threshold})")
        else:
            lines.append(f"the paper's claim '{name} falls as beta grows': does not hold on this run, "
                         f"because Spearman(beta, {name}) = {rho:.2f} > {threshold}")
    return "\n".join(lines)


def assemble_sweep(
    names: list[str],
    configs: list[dict],
    results: list[dict[str, Tensor]],
    n_test: int,
    out: str | Path,
    settings: EvalSettings,
    title: str,
    notes: str = "",
    authors_csv: Path | None = None,
    reference_mse: float | None = None,
) -> dict:
    """Figures, CSV/JSON, report.md and summary.json of a sweep, from every model's ``evaluate_model``.

    names, configs, results: one per model in checkpoint order (names: the checkpoint directories'
    names); n_test: the number of test images the results were computed from; authors_csv: the
    authors' published scores, laid beside ours in the report's last section, or None;
    reference_mse: ``evaluation.mean_image_mse`` of the scored images (summary.json's
    ``mean_image_mse``, which tells collapsed models in the comparison), or None. Returns the
    summary dict (keys ``SUMMARY_KEYS`` and more).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plain, mixed = split_models(configs)
    sweep = _Sweep(names, configs, results, n_test, settings, Report(out, plt=pyplot_or_none()), plain, mixed)
    scores = _write_scores(sweep)
    summary = _fig5(sweep, scores)
    attacks = _write_attacks(sweep)
    _fig2(sweep)
    summary["eigen_vs_random"] = _fig3_fig5d(sweep, attacks)
    summary["theorem_pgd"] = _theorem(sweep)
    if mixed:
        summary["mixup"] = _fig6(sweep, scores)
    summary["decoder_metric"] = _decoder_metric(sweep)
    summary["models"] = {n: {k: v for k, v in s.items() if k not in PER_IMAGE} for n, s in scores.items()}
    epochs = {configs[j].get("epochs") for j in plain}
    summary["epochs"] = epochs.pop() if len(epochs) == 1 else None  # None: the plain models differ
    summary["mean_image_mse"] = reference_mse
    if authors_csv is not None:
        summary["authors_comparison"] = write_authors_comparison(sweep.report, summary, authors_csv)
    atomic_write_json(out / "summary.json", summary)
    missing = ("\n\nmatplotlib is not installed: numbers only "
               "(`pip install 'pullgeom[plots]'` adds the figures).")
    verdicts = "\n".join(f"- {line}" for line in claim_verdicts(summary).splitlines())
    header = f"# {title}\n\n{verdicts}\n\n{notes}" + ("" if sweep.plt is not None else missing)
    sweep.report.write(header)
    return summary


# The per-image lists of ``_score_stats``: figures' numbers, left out of summary.json's per-model entries.
PER_IMAGE = ("spectral_radius", "entropy", "authors_radius", "authors_entropy")


def _score_stats(s: dict[str, Tensor]) -> dict:
    """Over the images of one model: mean and std of the spectral radius and entropy; mean, median
    and std of both in the authors' convention (their Fig. 5 scripts plot the median); and the
    values (``PER_IMAGE``)."""
    stats = {
        "spectral_radius_mean": float(s["spectral_radius"].mean()),
        "spectral_radius_std": float(s["spectral_radius"].std()),
        "entropy_mean": float(s["entropy"].mean()),
        "entropy_std": float(s["entropy"].std()),
    }
    for score in ("authors_radius", "authors_entropy"):
        values = s[score].double().numpy()
        # np.median: the mean of the two middle values for an even count (torch.median takes the lower).
        stats |= {f"{score}_mean": float(values.mean()), f"{score}_median": float(np.median(values)),
                  f"{score}_std": float(s[score].std())}
    return stats | {name: s[name].tolist() for name in PER_IMAGE}


def _write_scores(sweep: _Sweep) -> dict[str, dict]:
    """scores/<model>.csv for every model; returns each model's beta, mixup and score statistics."""
    scores = {}
    for j, name in enumerate(sweep.names):
        s = sweep.section(j, SCORES)
        atomic_write_text(sweep.out / "scores" / f"{name}.csv", scores_csv(s))
        scores[name] = {"beta": sweep.beta(j), "mixup": sweep.configs[j].get("mixup", 0.0), **_score_stats(s),
                        "recon_mse": float(s["recon_mse"].mean())}
    return scores


def _scores_against_beta(rows: list[dict], with_mse: bool) -> dict:
    """Per-model score rows (by beta) -> columns: betas, radius / entropy mean and std, recon_mse
    (``with_mse``), the ``authors_convention`` block (``AUTHORS_CONVENTION_KEYS``) and the Spearman
    correlation of each mean score with beta in both conventions (key order is summary.json's)."""
    columns = {"betas": [r["beta"] for r in rows]}
    keys = ["spectral_radius_mean", "spectral_radius_std", "entropy_mean", "entropy_std"]
    for key in keys + (["recon_mse"] if with_mse else []):
        columns[key] = [r[key] for r in rows]
    for score in ("spectral_radius", "entropy"):
        columns[f"spearman_beta_{score}"] = spearman(columns["betas"], columns[f"{score}_mean"])
    columns["authors_convention"] = {key: [r[f"authors_{key}"] for r in rows]
                                     for key in AUTHORS_CONVENTION_KEYS}
    for score in ("radius", "entropy"):
        columns[f"spearman_beta_authors_{score}"] = spearman(columns["betas"],
                                                            columns["authors_convention"][f"{score}_mean"])
    return columns


def _fig5(sweep: _Sweep, scores: dict[str, dict]) -> dict:
    """Fig. 5 (a-c): score histograms and scores against beta; returns the summary's score entries."""
    rows = [scores[sweep.names[j]] for j in sweep.plain]
    summary = _scores_against_beta(rows, with_mse=True)
    summary["n_scored"] = min(sweep.settings.score_limit, sweep.n_test)
    summary["radius_ratio_smallest_to_largest_beta"] = summary["spectral_radius_mean"][0] / max(
        summary["spectral_radius_mean"][-1], 1e-30
    )
    out = sweep.out
    atomic_write_json(out / "fig5_scores_vs_beta.json", {k: summary[k] for k in SUMMARY_KEYS})
    four = [sweep.names[j] for j in pick_evenly(sweep.plain, 4)]
    atomic_write_json(
        out / "fig5_histograms.json",
        {
            n: {"beta": scores[n]["beta"], **{name: scores[n][name] for name in PER_IMAGE}}
            for n in four
        },
    )
    if sweep.plt is not None:
        plot_scores_vs_beta(sweep.plt, summary, out / "fig5_scores_vs_beta.png")
        plot_histograms(sweep.plt, {n: scores[n] for n in four}, out / "fig5_histograms.png")
    sweep.report.add(
        "Fig. 5 (a, b): spectral radius and entropy histograms",
        "fig5_histograms.png",
        "fig5_histograms.json",
        f"Histograms over {summary['n_scored']} test images of log10 spectral radius and von Neumann entropy "
        f"for {len(four)} betas: " + "; ".join(_histogram_reading(scores[n]) for n in four) + ".",
    )
    sweep.report.add(
        "Fig. 5 (c): scores against beta",
        "fig5_scores_vs_beta.png",
        "fig5_scores_vs_beta.json",
        f"Spearman(beta, mean spectral radius) = {_fmt(summary['spearman_beta_spectral_radius'])}; "
        f"Spearman(beta, mean entropy) = {_fmt(summary['spearman_beta_entropy'])}; mean radius at the "
        f"smallest beta / at the largest = {_fmt(summary['radius_ratio_smallest_to_largest_beta'])}. "
        f"In the authors' convention (largest singular value of J_mu; entropy over the singular values / "
        f"the largest): Spearman(beta, mean radius) = {_fmt(summary['spearman_beta_authors_radius'])}, "
        f"Spearman(beta, mean entropy) = {_fmt(summary['spearman_beta_authors_entropy'])}; "
        + _authors_ends(summary)
        + ". The paper: both scores fall as beta grows (stronger prior, smoother, more robust encoder).",
    )
    return summary


def _authors_ends(summary: dict) -> str:
    """The authors'-convention mean radius and entropy at the smallest and the largest beta."""
    block, betas = summary["authors_convention"], summary["betas"]
    return "; ".join(f"beta {_fmt(betas[i])}: radius {_fmt(block['radius_mean'][i])} (median "
                     f"{_fmt(block['radius_median'][i])}), entropy {_fmt(block['entropy_mean'][i])}"
                     for i in (0, -1))


def _histogram_reading(row: dict) -> str:
    """One model of Fig. 5 (a, b)'s reading: median and mean +/- std of its radius, and its entropy."""
    return (f"beta {_fmt(row['beta'])}: radius median {_fmt(float(np.median(row['spectral_radius'])))} "
            f"(mean {_fmt(row['spectral_radius_mean'])} +/- {_fmt(row['spectral_radius_std'])}), "
            f"entropy {_fmt(row['entropy_mean'])} +/- {_fmt(row['entropy_std'])}")


def _write_attacks(sweep: _Sweep) -> dict[str, dict]:
    """attacks.json: every plain model's attack curves (Figs. 3, 5 d); returns them."""
    paper_grid, unit_grid = attack_grids(sweep.settings)
    attacks = {}
    for j in sweep.plain:
        curves = {name: value.tolist() for name, value in sweep.section(j, ATTACKS).items()}
        attacks[sweep.names[j]] = {"beta": sweep.beta(j), "paper_deltas": paper_grid.tolist(),
                                   "unit_deltas": unit_grid.tolist(), **curves}
    atomic_write_json(sweep.out / "attacks.json", attacks)
    return attacks


def _fig2_numbers(examples: dict[str, Tensor]) -> list[dict]:
    """Per image of Fig. 2 (test index i = its column): the clean reconstruction MSE and, per delta,
    the l2 norm of the perturbation (delta * lambda_1, v_1 having unit norm) and the MSE of the
    corrupted input's reconstruction, both MSEs against the clean image as in ``attack.attack_metrics``."""
    original = examples["original"].flatten(1).double()

    def offset(name: str) -> Tensor:  # (B, N): each image of row ``name`` minus its clean image
        return examples[name].flatten(1).double() - original

    clean = offset("reconstruction").square().mean(-1).tolist()
    per_delta = [(delta, offset(f"corrupted_{delta}").norm(dim=-1).tolist(),
                  offset(f"reconstruction_{delta}").square().mean(-1).tolist())
                 for delta in attack.FIG2_DELTAS]
    return [{"test_index": i, "recon_mse_clean": clean[i],
             "corrupted": [{"delta": delta, "perturbation_norm": norms[i], "recon_mse": errors[i]}
                           for delta, norms, errors in per_delta]}
            for i in range(len(clean))]


def _fig2(sweep: _Sweep) -> None:
    """Fig. 2: corrupted inputs and their reconstructions for the smallest plain beta."""
    small = sweep.plain[0]
    examples = sweep.section(small, EXAMPLES)
    images = _fig2_numbers(examples)
    atomic_write_json(
        sweep.out / "fig2_examples.json",
        {"beta": sweep.beta(small), "deltas": list(attack.FIG2_DELTAS), "rows": list(examples),
         "images": images},
    )
    if sweep.plt is not None:
        plot_fig2(sweep.plt, examples, sweep.beta(small), sweep.out / "fig2_examples.png")
    corrupted = [
        f"at delta = {delta} the perturbation's l2 norm is "
        f"{_spread([i['corrupted'][d]['perturbation_norm'] for i in images])} and the reconstruction MSE "
        f"{_spread([i['corrupted'][d]['recon_mse'] for i in images])}"
        for d, delta in enumerate(attack.FIG2_DELTAS)
    ]
    sweep.report.add(
        "Fig. 2: corrupted inputs and reconstructions",
        "fig2_examples.png",
        "fig2_examples.json",
        f"beta = {_fmt(sweep.beta(small))}, the first {len(images)} test images: originals, reconstructions, "
        "x + delta * s_1 * v_1 and their reconstructions, at the authors' scale (s_1, v_1: the top singular "
        "value and right singular vector of J_mu, the step of their grid delta * s_1, delta in "
        "logspace(-1, 1, 40)). Clean reconstruction MSE "
        f"{_spread([i['recon_mse_clean'] for i in images])}; " + "; ".join(corrupted)
        + " (mean, min-max over the images; MSE against the clean image). For scale: an MNIST digit's "
        "l2 norm is about 9 (8.8 on average over the first 3072 test images).",
    )


def _fig3_fig5d(sweep: _Sweep, attacks: dict[str, dict]) -> dict:
    """Fig. 3 (latent distance) and Fig. 5 (d) (MSE per direction); returns the eigen-vs-random summary."""
    out, plt = sweep.out, sweep.plt
    four = [sweep.names[j] for j in pick_evenly(sweep.plain, 4)]
    if plt is not None:
        plot_latent_vs_delta(plt, attacks, out / "fig3_latent_vs_delta.png")
        plot_mse_vs_step(plt, {n: attacks[n] for n in four}, out / "fig5_mse_vs_step.png")
    atomic_write_json(
        out / "fig3_latent_vs_delta.json",
        {
            n: {"beta": a["beta"], "deltas": a["paper_deltas"], "latent_top_direction": a["paper_latent"][0]}
            for n, a in attacks.items()
        },
    )
    atomic_write_json(
        out / "fig5_mse_vs_step.json",
        {n: {"beta": attacks[n]["beta"], "scaling": "unit", "norms": attacks[n]["unit_deltas"],
             "mse": attacks[n]["unit_mse"], "random_mse": attacks[n]["random_mse"],
             **({"box_mse": attacks[n]["box_mse"]} if "box_mse" in attacks[n] else {})} for n in four},
    )
    sweep.report.add(
        "Fig. 3: latent distance against delta",
        "fig3_latent_vs_delta.png",
        "fig3_latent_vs_delta.json",
        _latent_reading(attacks, min(sweep.settings.attack_limit, sweep.n_test)),
    )
    eigen_vs_random = _eigen_vs_random(attacks, attack_grids(sweep.settings)[1])
    sweep.report.add(
        "Fig. 5 (d): reconstruction MSE against attack step, top-5 directions and a random one",
        "fig5_mse_vs_step.png",
        "fig5_mse_vs_step.json",
        f"Drawn in the unit scaling (x + t v_i and x + t u, t the perturbation's l2 norm) for "
        f"{len(four)} betas. Eigen attack vs a random direction of the same l2 norm: increase of the "
        "reconstruction MSE over the clean one, eigen / random, at "
        f"norm {_fmt(eigen_vs_random['budget'])}: "
        + ", ".join(
            f"beta {_fmt(b)}: {_fmt(r)}x"
            for b, r in zip(eigen_vs_random["betas"], eigen_vs_random["mse_ratio"], strict=True)
        )
        + ".",
    )
    return eigen_vs_random


def _latent_reading(attacks: dict[str, dict], n_attacked: int) -> str:
    """Fig. 3's reading: each beta's latent distance at the grid points nearest delta = 0.01, 0.1, 1."""
    deltas = next(iter(attacks.values()))["paper_deltas"]
    shown = [min(range(len(deltas)), key=lambda i: abs(math.log(deltas[i] / d))) for d in (0.01, 0.1, 1.0)]
    return (
        f"||mu(x_c) - mu(x)|| for the top eigendirection (paper scaling: x + delta * lambda_1 * v_1), mean "
        f"over {n_attacked} test images, at delta = {' / '.join(_fmt(deltas[i]) for i in shown)}: "
        + "; ".join(
            f"beta {_fmt(a['beta'])}: {' / '.join(_fmt(a['paper_latent'][0][i]) for i in shown)}"
            for a in attacks.values()
        )
        + "."
    )


def _theorem(sweep: _Sweep) -> dict:
    """Theorem 3.2 checked against PGD for three betas; returns the summary's ratios."""
    theorem = {
        sweep.names[j]: {"beta": sweep.beta(j),
                         **{k: v.tolist() for k, v in sweep.section(j, THEOREM).items()}}
        for j in pick_evenly(sweep.plain, 3)
    }
    atomic_write_json(sweep.out / "theorem_pgd.json", theorem)
    if sweep.plt is not None:
        plot_theorem(sweep.plt, theorem, sweep.out / "theorem_pgd.png")
    sweep.report.add(
        "Theorem 3.2 checked: one-step eigen attack vs PGD at equal l2 norm",
        "theorem_pgd.png",
        "theorem_pgd.json",
        "Latent distance of each one-step attack divided by PGD's at the same budget "
        "(smallest budget): "
        + "; ".join(
            f"beta {_fmt(t['beta'])}: eigen(G) {_fmt(t['ratio_eigen_G_to_pgd'][0])}, "
            f"eigen(J_mu) {_fmt(t['ratio_eigen_mu_to_pgd'][0])}, random {_fmt(t['ratio_random_to_pgd'][0])}"
            for t in theorem.values()
        )
        + ". A ratio near 1 at small budgets is the theorem's claim. Largest eigen(G) / PGD ratio over the "
        "budgets (above 1: PGD's steps fell short of the one-step attack): "
        + "; ".join(f"beta {_fmt(t['beta'])}: {_fmt(max(t['ratio_eigen_G_to_pgd']))} at budget "
                    f"{_fmt(t['budgets'][int(np.argmax(t['ratio_eigen_G_to_pgd']))])}"
                    for t in theorem.values())
        + ".",
    )
    ratios = ("beta", "budgets", "ratio_eigen_G_to_pgd", "ratio_eigen_mu_to_pgd", "ratio_random_to_pgd")
    return {n: {key: t[key] for key in ratios} for n, t in theorem.items()}


def _fig6(sweep: _Sweep, scores: dict[str, dict]) -> list[dict]:
    """Fig. 6: each mixup model against the beta-VAE frontier; returns the comparison rows."""
    rows = [scores[sweep.names[j]] for j in sweep.plain]
    mixed_rows = [scores[sweep.names[j]] for j in sweep.mixed]
    comparison = _mixup_comparison(rows, mixed_rows)
    atomic_write_json(sweep.out / "fig6_mixup.json", comparison)
    if sweep.plt is not None:
        plot_mixup(sweep.plt, rows, comparison, sweep.out / "fig6_mixup.png")
    sweep.report.add(
        "Fig. 6: latent mixup vs the beta-VAE",
        "fig6_mixup.png",
        "fig6_mixup.json",
        " ".join(_mixup_reading(m) for m in comparison)
        + " The beta-VAE frontier: every plain model's mean radius and MSE (fig5_scores_vs_beta.json).",
    )
    return comparison


def _mixup_reading(m: dict) -> str:
    """One sentence of report.md on one row of ``_mixup_comparison``."""
    same = (f"beta {_fmt(m['beta'])}, mixup {_fmt(m['mixup'])}: mean radius {_fmt(m['radius'])} vs "
            f"{_fmt(m['plain_radius'])} for the plain model of the same beta "
            f"({'lower' if m['lower_radius_than_plain'] else 'not lower'}); ")
    if m["frontier"] == FRONTIER_INSIDE:
        verdict = "no worse" if m["mse_no_worse_than_frontier"] else "worse"
        return same + (f"MSE {_fmt(m['mse'])} vs {_fmt(m['frontier_mse'])} for the beta-VAE reaching that "
                       f"radius (interpolated): {verdict}.")
    verdict = "no worse" if m["mse_no_worse_than_nearest_plain"] else "worse"
    return same + (f"its radius is {m['frontier']} (nearest: {_fmt(m['nearest_plain_radius'])} at beta "
                   f"{_fmt(m['nearest_plain_beta'])}), so no beta-VAE of the sweep reaches it; MSE "
                   f"{_fmt(m['mse'])} vs {_fmt(m['nearest_plain_mse'])} for that nearest one: {verdict}.")


def _decoder_metric(sweep: _Sweep) -> dict:
    """Figs. 8-10: the decoder-metric variant (Eq. 11); writes its CSVs and returns its summary."""
    out = sweep.out
    decoder_rows = []
    for j in pick_evenly(sweep.plain, sweep.settings.decoder_models):
        s = sweep.section(j, DECODER)
        atomic_write_text(out / "scores_decoder_metric" / f"{sweep.names[j]}.csv", scores_csv(s))
        decoder_rows.append({"beta": sweep.beta(j), **_score_stats(s)})
    decoder_summary = _scores_against_beta(decoder_rows, with_mse=False)
    n_images = min(sweep.settings.decoder_limit, sweep.n_test)
    decoder_summary["separation"] = {
        score: neighbour_separation(decoder_summary[f"{score}_mean"], decoder_summary[f"{score}_std"],
                                    n_images)
        for score in ("spectral_radius", "entropy")}
    atomic_write_json(
        out / "fig8_10_decoder_metric.json", {"summary": decoder_summary, "per_beta": decoder_rows}
    )
    if sweep.plt is not None:
        plot_histograms(
            sweep.plt, {str(r["beta"]): r for r in decoder_rows}, out / "fig8_10_decoder_metric_hist.png"
        )
        plot_scores_vs_beta(sweep.plt, decoder_summary, out / "fig8_10_decoder_metric.png",
                            errors={score: separation["ci95"]
                                    for score, separation in decoder_summary["separation"].items()},
                            error_label=f"95 % interval of the mean, {n_images} images")
    sweep.report.add(
        "Figs. 8-10: the decoder-induced metric (Eq. 11)",
        "fig8_10_decoder_metric.png",
        "fig8_10_decoder_metric.json",
        f"G = J^T G_z J on {n_images} images per model: "
        f"Spearman(beta, radius) = {_fmt(decoder_summary['spearman_beta_spectral_radius'])}, "
        f"Spearman(beta, entropy) = {_fmt(decoder_summary['spearman_beta_entropy'])}. Error bars: the 95 % "
        f"interval of each mean (1.96 std / sqrt({n_images})). "
        + " ".join(_separation_reading(name, decoder_summary["betas"], decoder_summary["separation"][score])
                   for score, name in (("spectral_radius", "radius"), ("entropy", "entropy")))
        + " Histograms: fig8_10_decoder_metric_hist.png.",
    )
    return decoder_summary


def neighbour_separation(means: list[float], stds: list[float], n: int) -> dict:
    """Whether neighbouring betas' means are told apart by n images each.

    means, stds: per beta (ascending), over n images each. Returns {"ci95": 1.96 std / sqrt(n) per
    beta; "separated": per neighbouring pair, whether the two 95 % intervals miss each other;
    "images_needed": per pair, the n at which they would (ceil((1.96 (s_i + s_j) / |m_i - m_j|)^2),
    at least 1, from the same stds), None for equal means}.
    """
    ci = [1.96 * sd / math.sqrt(n) for sd in stds]
    separated, needed = [], []
    for i in range(len(means) - 1):
        gap = abs(means[i + 1] - means[i])
        separated.append(gap > ci[i] + ci[i + 1])
        needed.append(max(1, math.ceil((1.96 * (stds[i] + stds[i + 1]) / gap) ** 2)) if gap > 0 else None)
    return {"ci95": ci, "separated": separated, "images_needed": needed}


def _separation_reading(name: str, betas: list[float], separation: dict) -> str:
    """One sentence: how many neighbouring pairs' intervals separate, and what the others would need."""
    pairs = len(separation["separated"])
    apart = sum(separation["separated"])
    text = f"{name.capitalize()}: the intervals of {apart} of {pairs} neighbouring betas separate"
    overlapping = [f"beta {_fmt(betas[i])} and {_fmt(betas[i + 1])} (would need "
                   + (f"{separation['images_needed'][i]:,} images)" if separation["images_needed"][i] else
                      "any number: equal means)")
                   for i, apart_i in enumerate(separation["separated"]) if not apart_i]
    return text + (f"; they overlap for {', '.join(overlapping)}." if overlapping else ".")


def _eigen_vs_random(attacks: dict, unit_grid: Tensor) -> dict:
    """How much more the top eigen attack raises MSE than a random direction of the same l2 norm.

    Increase = MSE(x_c) - MSE at the grid's smallest norm (1e-2, where both equal the clean
    MSE to 4 digits); reported at the grid point nearest norm 1.
    """
    j = int(unit_grid.log().abs().argmin())
    eigen = [a["unit_mse"][0][j] - a["unit_mse"][0][0] for a in attacks.values()]
    rnd = [a["random_mse"][j] - a["random_mse"][0] for a in attacks.values()]
    return {
        "budget": float(unit_grid[j]),
        "betas": [a["beta"] for a in attacks.values()],
        "eigen_mse_increase": eigen,
        "random_mse_increase": rnd,
        "mse_ratio": [e / r if r > 0 else float("inf") for e, r in zip(eigen, rnd, strict=True)],
    }


FRONTIER_INSIDE, FRONTIER_BELOW, FRONTIER_ABOVE = "interpolated", "below every plain radius", \
    "above every plain radius"


def _mixup_comparison(plain_rows: list[dict], mixed_rows: list[dict]) -> list[dict]:
    """Each mixup model against the plain model of exactly its beta and against the beta-VAE frontier.

    plain_rows, mixed_rows: per-model score rows (``beta``, ``spectral_radius_mean``,
    ``authors_radius_mean``, ``recon_mse``, ``mixup``); the frontier is drawn in the paper's
    convention, the authors'-convention radii are carried along. The frontier is the plain
    models' (log mean radius, MSE) points sorted by radius and joined by straight lines;
    ``frontier_mse`` is its MSE at the mixup model's radius. Outside the plain radii no beta-VAE
    of the sweep reaches that radius: ``frontier`` says on which side, ``frontier_mse`` and
    ``mse_no_worse_than_frontier`` are None, and the plain model of the nearest radius (the
    smoothest one when below) is given instead.
    Raises ValueError when a mixup beta is not one of the plain betas.
    """
    plain_betas = [r["beta"] for r in plain_rows]
    by_radius = sorted(plain_rows, key=lambda r: r["spectral_radius_mean"])
    log_r = np.log([r["spectral_radius_mean"] for r in by_radius])
    mse = np.array([r["recon_mse"] for r in by_radius])
    result = []
    for m in mixed_rows:
        same = plain_rows[plain_at_beta(plain_betas, m["beta"])]
        radius = m["spectral_radius_mean"]
        row = {
            "beta": m["beta"],
            "mixup": m["mixup"],
            "radius": radius,
            "mse": m["recon_mse"],
            "plain_radius": same["spectral_radius_mean"],
            "plain_mse": same["recon_mse"],
            "authors_radius": m["authors_radius_mean"],
            "plain_authors_radius": same["authors_radius_mean"],
            "lower_radius_than_plain": radius < same["spectral_radius_mean"],
        }
        if log_r[0] <= math.log(radius) <= log_r[-1]:
            frontier = float(np.interp(math.log(radius), log_r, mse))
            row |= {"frontier": FRONTIER_INSIDE, "frontier_mse": frontier,
                    "mse_no_worse_than_frontier": m["recon_mse"] <= frontier}
        else:
            nearest = by_radius[0] if math.log(radius) < log_r[0] else by_radius[-1]
            row |= {"frontier": FRONTIER_BELOW if nearest is by_radius[0] else FRONTIER_ABOVE,
                    "frontier_mse": None, "mse_no_worse_than_frontier": None,
                    "nearest_plain_beta": nearest["beta"],
                    "nearest_plain_radius": nearest["spectral_radius_mean"],
                    "nearest_plain_mse": nearest["recon_mse"],
                    "mse_no_worse_than_nearest_plain": m["recon_mse"] <= nearest["recon_mse"]}
        result.append(row)
    return result


# ----------------------------------------------------------------------------------------
# Beside the authors' published numbers (their MNIST result files, read into one CSV).

AUTHORS_SCORES = "authors_mnist_scores.csv"
PAPER_DIR_ENV = "PULLGEOM_PAPER_DIR"
AUTHORS_COLUMNS = ("beta", "n_images", "radius_mean", "radius_std", "entropy_mean", "entropy_std")
# Optional: their reconstruction MSE at the smallest attack step (0.1 s_1), the clean MSE where s_1 is small.
AUTHORS_MSE = "mse_top1_smallest_step"
# Their training (../shared/paper/README.md): 100 epochs, Adam, cosine schedule (T_max 200).
AUTHORS_EPOCHS = 100
# A model "collapsed" when its reconstruction MSE is at least this fraction of the MSE of predicting
# the test images' mean image for every input (what a decoder of a constant latent code can do at best).
COLLAPSE_FRACTION = 0.98
# "Within a few tens of percent" of the authors' value (issue 13's bar for the smallest beta).
MATCH_RTOL = 0.3
COMPARISON_TITLE = "Beside the authors' published numbers, in their convention"
COMPARISON_COLUMNS = ("beta", "ours_radius_mean", "authors_radius_mean", "radius_ratio", "ours_entropy_mean",
                      "authors_entropy_mean", "entropy_ratio", "ours_radius_std", "authors_radius_std",
                      "ours_entropy_std", "authors_entropy_std")
# Both sides write their betas to 6 significant digits (``training.log_spaced``, the authors' file),
# so one grid's betas agree to 5e-6 relative; neighbours on the 50-beta grid are 15% apart.
BETA_RTOL = 1e-5


def default_paper_dir() -> Path:
    """``$PULLGEOM_PAPER_DIR``, else ``../shared/paper`` (the project's shared folder, seen from the
    checkout's root)."""
    return Path(os.environ.get(PAPER_DIR_ENV) or "../shared/paper")


def read_authors_scores(path: str | os.PathLike) -> list[dict]:
    """The rows of the authors' ``authors_mnist_scores.csv`` (``AUTHORS_COLUMNS`` as floats, and
    ``AUTHORS_MSE`` when the file has it), by beta.

    Raises ValueError naming the file and what is wrong with it.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not text"
        raise ValueError(f"cannot read the authors' scores '{path}' ({reason}); pass the folder that holds "
                         f"{AUTHORS_SCORES} (--paper-dir, or ${PAPER_DIR_ENV})") from None
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in AUTHORS_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"'{path}' has no column {', '.join(missing)}: the authors' scores need the columns "
                         f"{', '.join(AUTHORS_COLUMNS)}")
    columns = AUTHORS_COLUMNS + ((AUTHORS_MSE,) if AUTHORS_MSE in reader.fieldnames else ())
    rows = []
    for line, row in enumerate(reader, start=2):
        try:
            rows.append({c: float(row[c]) for c in columns})
        except (TypeError, ValueError):
            raise ValueError(f"'{path}' line {line}: every one of {', '.join(columns)} must be a "
                             f"number, got {dict(row)}") from None
    if not rows:
        raise ValueError(f"'{path}' has a header but no rows")
    return sorted(rows, key=lambda r: r["beta"])


def _number(value) -> float:
    """A float from summary.json, where NaN was written as null."""
    return math.nan if value is None else float(value)


def _ratio(ours: float, theirs: float) -> float:
    return ours / theirs if theirs != 0 else math.nan


def compare_with_authors(summary: dict, authors: list[dict]) -> dict:
    """A sweep's plain models in the authors' convention beside the authors' rows of the same beta.

    summary: the sweep's summary (``betas``, ``authors_convention``, ``n_scored`` and ``models``,
    read for each model's spread; ``recon_mse``, ``mean_image_mse`` and ``epochs`` when there);
    authors: ``read_authors_scores``. Returns {"rows": one dict of
    ``COMPARISON_COLUMNS`` per beta of both, ascending (ratio: ours / theirs); "unmatched_betas":
    ours missing from their file; "collapsed": {"mean_image_mse", "ours", "authors": the betas whose
    reconstruction MSE (ours: clean; theirs: ``AUTHORS_MSE``) is at least ``COLLAPSE_FRACTION`` of
    the summary's ``mean_image_mse``}, or None without it; "epochs": {"ours", "authors"};
    "spearman_beta": {"radius" / "entropy": {"ours", "authors"}},
    the rank correlation of each mean with beta over those betas; "spearman_ours_authors":
    {"radius", "entropy"}; "n_images": {"ours", "authors"}}. Raises ValueError when fewer than
    two betas are in both.
    """
    spread = {m["beta"]: m for m in summary.get("models", {}).values() if not m.get("mixup")}
    block = summary["authors_convention"]
    rows, unmatched = [], []
    for i, beta in enumerate(summary["betas"]):
        theirs = next((a for a in authors if math.isclose(a["beta"], beta, rel_tol=BETA_RTOL)), None)
        if theirs is None:
            unmatched.append(beta)
            continue
        mine = spread.get(beta, {})
        ours_radius, ours_entropy = _number(block["radius_mean"][i]), _number(block["entropy_mean"][i])
        rows.append({"beta": beta, "ours_radius_mean": ours_radius,
                     "authors_radius_mean": theirs["radius_mean"],
                     "radius_ratio": _ratio(ours_radius, theirs["radius_mean"]),
                     "ours_entropy_mean": ours_entropy, "authors_entropy_mean": theirs["entropy_mean"],
                     "entropy_ratio": _ratio(ours_entropy, theirs["entropy_mean"]),
                     "ours_radius_std": _number(mine.get("authors_radius_std")),
                     "authors_radius_std": theirs["radius_std"],
                     "ours_entropy_std": _number(mine.get("authors_entropy_std")),
                     "authors_entropy_std": theirs["entropy_std"],
                     "ours_recon_mse": _number(summary["recon_mse"][i]) if "recon_mse" in summary
                     else math.nan,
                     "authors_mse": theirs.get(AUTHORS_MSE, math.nan)})
    if len(rows) < 2:
        raise ValueError(f"only {len(rows)} of the run's betas {summary['betas']} are in the authors' file "
                         f"(betas {authors[0]['beta']:.6g} to {authors[-1]['beta']:.6g}, "
                         f"{len(authors)} of them): compare a sweep on their grid, e.g. the paper profile's")
    betas = [r["beta"] for r in rows]
    column = {key: [r[key] for r in rows] for key in COMPARISON_COLUMNS}
    reference = summary.get("mean_image_mse")
    collapsed = None if reference is None else {
        "mean_image_mse": reference,
        **{side: [r["beta"] for r in rows if r[key] >= COLLAPSE_FRACTION * reference]
           for side, key in (("ours", "ours_recon_mse"), ("authors", "authors_mse"))}}
    return {
        "rows": rows,
        "unmatched_betas": unmatched,
        "collapsed": collapsed,
        "epochs": {"ours": summary.get("epochs"), "authors": AUTHORS_EPOCHS},
        "spearman_beta": {score: {side: spearman(betas, column[f"{side}_{score}_mean"])
                                  for side in ("ours", "authors")} for score in ("radius", "entropy")},
        "spearman_ours_authors": {score: spearman(column[f"ours_{score}_mean"],
                                                  column[f"authors_{score}_mean"])
                                  for score in ("radius", "entropy")},
        "n_images": {"ours": summary.get("n_scored"), "authors": int(authors[0]["n_images"])},
    }


def comparison_verdicts(comparison: dict) -> list[str]:
    """The paper's claims checked on both sides of ``compare_with_authors``, and where and why ours
    differ from theirs, each as one sentence written from the comparison's numbers."""
    rho, rows = comparison["spearman_beta"], comparison["rows"]
    lines = []
    for score, name in (("radius", "spectral_radius"), ("entropy", "entropy")):
        threshold = CLAIM_THRESHOLDS[name]
        sides = {side: rho[score][side] for side in ("ours", "authors")}
        said = {side: "holds" if value <= threshold else "does not hold" for side, value in sides.items()}
        lines.append(f"'{score} falls as beta grows' (Spearman <= {threshold}): {said['ours']} on ours "
                     f"({_fmt(sides['ours'])}), {said['authors']} on theirs ({_fmt(sides['authors'])}).")
    first = rows[0]
    for score in ("radius", "entropy"):
        ratio = first[f"{score}_ratio"]
        close = abs(ratio - 1) <= MATCH_RTOL
        lines.append(f"{score.capitalize()} at beta {_fmt(first['beta'])}: ours "
                     f"{_fmt(first[f'ours_{score}_mean'])}, "
                     f"theirs {_fmt(first[f'authors_{score}_mean'])}, ratio {_fmt(ratio)}: "
                     + (f"within {MATCH_RTOL:.0%}." if close else f"not within {MATCH_RTOL:.0%}."))
    collapsed = comparison.get("collapsed")
    if collapsed:
        def listed(betas):
            return ", ".join(_fmt(b) for b in betas) if betas else "none"

        lines.append(f"Collapse (reconstruction MSE >= {COLLAPSE_FRACTION:g} x "
                     f"{_fmt(collapsed['mean_image_mse'])}, "
                     "that of predicting the test images' mean image): at beta "
                     f"{listed(collapsed['ours'])} in ours, {listed(collapsed['authors'])} in theirs; a "
                     "collapsed encoder's mean barely moves, so its radius is tiny and its entropy (over "
                     "singular values all near zero, normalised by the largest) is not comparable: the "
                     "ratios at those betas say nothing about the claims.")
        kept = [r for r in rows if r["beta"] not in collapsed["ours"] + collapsed["authors"]]
        if len(kept) >= 2 and len(kept) < len(rows):
            betas = [r["beta"] for r in kept]
            correlations = "; ".join(
                f"{score}: ours {_fmt(spearman(betas, [r[f'ours_{score}_mean'] for r in kept]))}, theirs "
                f"{_fmt(spearman(betas, [r[f'authors_{score}_mean'] for r in kept]))}"
                for score in ("radius", "entropy"))
            lines.append(f"Without the betas collapsed on either side ({len(kept)} of {len(rows)} left), "
                         f"Spearman(beta, mean score): {correlations}.")
        if kept and kept[-1] is not rows[-1]:
            top = kept[-1]
            lines.append(f"At the largest beta collapsed on neither side ({_fmt(top['beta'])}): radius "
                         f"{_fmt(top['ours_radius_mean'])} vs {_fmt(top['authors_radius_mean'])} "
                         f"({_fmt(top['radius_ratio'])}x), entropy {_fmt(top['ours_entropy_mean'])} vs "
                         f"{_fmt(top['authors_entropy_mean'])} ({_fmt(top['entropy_ratio'])}x).")
    epochs = comparison.get("epochs") or {}
    if epochs.get("ours") is not None:
        lines.append(f"Training length: ours {epochs['ours']} epochs, theirs {epochs['authors']}: a known "
                     "difference of setting behind the gap at the smallest beta (radius "
                     f"{_fmt(first['radius_ratio'])}x "
                     "theirs); how much of it longer training closes is not measured by this run.")
    lines.append("Convention: every number here is the authors' (singular values of J_mu); the paper's "
                 "equations (eigenvalues of G, with the sigma term) are the report's other sections.")
    return lines


def authors_comparison_csv(rows: list[dict]) -> str:
    """CSV text of ``compare_with_authors``' rows: the columns ``COMPARISON_COLUMNS``."""
    lines = [",".join(COMPARISON_COLUMNS)]
    lines += [",".join(f"{row[c]:.6g}" for c in COMPARISON_COLUMNS) for row in rows]
    return "\n".join(lines) + "\n"


def _comparison_reading(comparison: dict, authors_csv: Path) -> str:
    """report.md's text on ``compare_with_authors``: correlations, the ends, then the whole table."""
    rows, rho = comparison["rows"], comparison["spearman_beta"]
    n = comparison["n_images"]
    unmatched = ", ".join(_fmt(b) for b in comparison["unmatched_betas"])
    skipped = f" (our betas {unmatched} are not in their file)" if unmatched else ""
    ends = "; ".join(
        f"beta {_fmt(r['beta'])}: radius {_fmt(r['ours_radius_mean'])} vs {_fmt(r['authors_radius_mean'])} "
        f"({_fmt(r['radius_ratio'])}x), entropy {_fmt(r['ours_entropy_mean'])} vs "
        f"{_fmt(r['authors_entropy_mean'])} ({_fmt(r['entropy_ratio'])}x)"
        for r in (rows[0], rows[-1])
    )
    table = ["| beta | radius, ours | radius, theirs | ours / theirs | entropy, ours | entropy, theirs "
             "| ours / theirs |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    cells = ("ours_radius_mean", "authors_radius_mean", "radius_ratio", "ours_entropy_mean",
             "authors_entropy_mean", "entropy_ratio")
    table += [f"| {r['beta']:.6g} | " + " | ".join(_fmt(r[c]) for c in cells) + " |" for r in rows]
    rank = comparison["spearman_ours_authors"]
    return (
        "Our plain models in the authors' convention (the largest singular value of J_mu; the entropy over "
        f"its singular values normalised by the largest), mean over our first {n['ours']} test images, "
        f"beside the authors' published means over their {n['authors']} (`{authors_csv.name}`), at the "
        f"{len(rows)} betas of both{skipped}. Spearman(beta, mean radius): ours "
        f"{_fmt(rho['radius']['ours'])}, theirs {_fmt(rho['radius']['authors'])}; Spearman(beta, mean "
        f"entropy): ours {_fmt(rho['entropy']['ours'])}, theirs {_fmt(rho['entropy']['authors'])}. Rank "
        f"correlation of ours with theirs across beta: radius {_fmt(rank['radius'])}, entropy "
        f"{_fmt(rank['entropy'])}. Ours vs theirs at the ends: {ends}.\n\n"
        + "\n".join(f"- {line}" for line in comparison_verdicts(comparison)) + "\n\n"
        + "\n".join(table)
    )


def write_authors_comparison(report: Report, summary: dict, authors_csv: Path) -> dict:
    """authors_comparison.csv / .json / .png under ``report.out`` and the section of report.md that
    reads them; returns summary.json's ``authors_comparison`` entry (everything but the rows)."""
    authors_csv = Path(authors_csv)
    comparison = compare_with_authors(summary, read_authors_scores(authors_csv))
    out = report.out
    atomic_write_text(out / "authors_comparison.csv", authors_comparison_csv(comparison["rows"]))
    atomic_write_json(out / "authors_comparison.json", comparison)
    if report.plt is not None:
        plot_authors_comparison(report.plt, comparison["rows"], out / "authors_comparison.png",
                                comparison["collapsed"])
    report.add(COMPARISON_TITLE, "authors_comparison.png", "authors_comparison.csv",
               _comparison_reading(comparison, authors_csv))
    return {key: value for key, value in comparison.items() if key != "rows"}


def add_authors_comparison(run: str | os.PathLike, authors_csv: str | os.PathLike) -> dict:
    """``write_authors_comparison`` for a finished run (``pullgeom compare-authors``): reads
    ``run``/summary.json, writes the comparison's files, puts its section in report.md (in place of
    an earlier one, else at the end) and its entry in summary.json. Returns that entry.

    Raises ValueError when the run has no summary.json or one without the authors' convention.
    """
    run = Path(run)
    try:
        summary = json.loads((run / "summary.json").read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"'{run}' holds no readable summary.json ({error}); pass a directory written by "
                         "`pullgeom reproduce`") from None
    if "authors_convention" not in summary:
        raise ValueError(f"'{run / 'summary.json'}' has no authors_convention block (it predates the "
                         "authors' convention): run the same `pullgeom reproduce` command again, which "
                         "reuses the trained models and scores them in both conventions")
    report = Report(run, plt=pyplot_or_none())
    summary["authors_comparison"] = write_authors_comparison(report, summary, Path(authors_csv))
    (section,) = report.sections
    path = run / "report.md"
    parts = path.read_text().split("\n## ") if path.is_file() else [f"# {run.name}\n"]
    kept = [part for part in parts[1:] if part.split("\n", 1)[0] != COMPARISON_TITLE]
    atomic_write_text(path, "\n## ".join([parts[0], *kept, section.removeprefix("## ")]))
    atomic_write_json(run / "summary.json", summary)
    return summary["authors_comparison"]
