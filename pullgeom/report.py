"""Scoring datasets, the paper's figures (PNG beside CSV/JSON of the numbers drawn) and report.md.

``score_dataset`` is the unit of work the CLI's ``score`` runs (and that a distributed runner
can shard): it scores given dataset indices and returns rows keyed by those indices.
``evaluate_sweep`` runs every experiment of the paper on a trained sweep and writes
figures, numbers, ``report.md`` and ``summary.json``.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

import pullgeom
from pullgeom import attack
from pullgeom.io import atomic_write_bytes, atomic_write_json, atomic_write_text, load_checkpoint

SUMMARY_KEYS = (
    "betas",
    "spectral_radius_mean",
    "spectral_radius_std",
    "entropy_mean",
    "entropy_std",
    "recon_mse",
    "spearman_beta_spectral_radius",
    "spearman_beta_entropy",
)


# ----------------------------------------------------------------------------------------
# Scoring.


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
    "eigenvalues" (m, k), "recon_mse" (m,)}: the rows of scores.csv, in ``indices`` order.
    """
    model = model.eval()
    indices = torch.arange(images.shape[0]) if indices is None else torch.as_tensor(indices)
    decoder = model.decoder if decoder_metric else None
    parts: dict[str, list[Tensor]] = {
        "spectral_radius": [],
        "entropy": [],
        "eigenvalues": [],
        "recon_mse": [],
    }
    for start in tqdm(range(0, len(indices), batch_size), desc="scoring", leave=False, disable=not progress):
        x = images[indices[start : start + batch_size]]
        spec = pullgeom.spectrum(model.encoder, x, k=k, decoder=decoder)
        with torch.no_grad():
            recon = model.decoder(model.encoder(x)[0]).reshape(x.shape)
        parts["spectral_radius"].append(spec.spectral_radius)
        parts["entropy"].append(spec.entropy)
        parts["eigenvalues"].append(spec.eigenvalues)
        parts["recon_mse"].append((recon - x).square().reshape(x.shape[0], -1).mean(-1))
    empty = {
        "spectral_radius": torch.zeros(0),
        "entropy": torch.zeros(0),
        "eigenvalues": torch.zeros(0, k),
        "recon_mse": torch.zeros(0),
    }
    out = {key: torch.cat(value) if value else empty[key] for key, value in parts.items()}
    return {"index": indices.to(torch.int64), **out}


def scores_csv(scores: dict[str, Tensor]) -> str:
    """CSV text: index, spectral_radius, entropy, lambda_1 .. lambda_k, recon_mse."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    k = scores["eigenvalues"].shape[1]
    writer.writerow(
        ["index", "spectral_radius", "entropy", *[f"lambda_{i + 1}" for i in range(k)], "recon_mse"]
    )
    for row in range(len(scores["index"])):
        writer.writerow(
            [
                int(scores["index"][row]),
                f"{float(scores['spectral_radius'][row]):.8g}",
                f"{float(scores['entropy'][row]):.8g}",
                *[f"{float(v):.8g}" for v in scores["eigenvalues"][row]],
                f"{float(scores['recon_mse'][row]):.8g}",
            ]
        )
    return buffer.getvalue()


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


def pyplot_or_none():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save_figure(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())
    fig.clf()


def plot_image_grid(plt, rows: list[tuple[str, Tensor]], path: Path, columns: int) -> None:
    fig, axes = plt.subplots(len(rows), columns, figsize=(1.2 * columns, 1.3 * len(rows)), squeeze=False)
    for r, (title, images) in enumerate(rows):
        for c in range(columns):
            ax = axes[r][c]
            image = images[c].detach().float().clamp(0, 1)
            ax.imshow(image.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(title, fontsize=7)
    _save_figure(fig, path)
    plt.close(fig)


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


# ----------------------------------------------------------------------------------------
# The whole evaluation of a sweep.


@dataclass
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


def _pick(items: list, count: int) -> list:
    """``count`` items spread evenly over ``items`` (first and last included)."""
    if len(items) <= count:
        return list(items)
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


def evaluate_sweep(
    checkpoints: list[Path],
    test_images: Tensor,
    out: str | Path,
    settings: EvalSettings,
    title: str,
    progress: bool = True,
    notes: str = "",
) -> dict:
    """Score, attack and plot every model; writes figures, CSV/JSON, report.md and summary.json.

    checkpoints: model directories (plain models have mixup 0; mixup models are compared in
    Fig. 6); test_images: (n, *S). Returns the summary dict (keys ``SUMMARY_KEYS`` and more).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plt = pyplot_or_none()
    report = Report(out, plt=plt)
    models = [(path, *load_checkpoint(path)) for path in checkpoints]
    plain = sorted([m for m in models if not m[2].get("mixup")], key=lambda m: m[2]["beta"])
    mixed = sorted([m for m in models if m[2].get("mixup")], key=lambda m: m[2]["beta"])
    if len(plain) < 2:
        raise ValueError("evaluate_sweep needs at least two plain (mixup 0) models to compare betas")

    # Scores of every model (Fig. 5 a-c, Fig. 6).
    scores: dict[str, dict] = {}
    x_score = test_images[: settings.score_limit]
    for path, model, config in tqdm(models, desc="scoring models", disable=not progress):
        s = score_dataset(model, x_score, k=settings.k, batch_size=settings.batch_size, progress=False)
        atomic_write_text(out / "scores" / f"{path.name}.csv", scores_csv(s))
        scores[path.name] = {
            "beta": config["beta"],
            "mixup": config.get("mixup", 0.0),
            "spectral_radius_mean": float(s["spectral_radius"].mean()),
            "spectral_radius_std": float(s["spectral_radius"].std()),
            "entropy_mean": float(s["entropy"].mean()),
            "entropy_std": float(s["entropy"].std()),
            "recon_mse": float(s["recon_mse"].mean()),
            "spectral_radius": s["spectral_radius"].tolist(),
            "entropy": s["entropy"].tolist(),
        }
    rows = [scores[p.name] for p, _, _ in plain]
    betas = [r["beta"] for r in rows]
    summary = {
        "betas": betas,
        "spectral_radius_mean": [r["spectral_radius_mean"] for r in rows],
        "spectral_radius_std": [r["spectral_radius_std"] for r in rows],
        "entropy_mean": [r["entropy_mean"] for r in rows],
        "entropy_std": [r["entropy_std"] for r in rows],
        "recon_mse": [r["recon_mse"] for r in rows],
        "spearman_beta_spectral_radius": spearman(betas, [r["spectral_radius_mean"] for r in rows]),
        "spearman_beta_entropy": spearman(betas, [r["entropy_mean"] for r in rows]),
        "n_scored": int(x_score.shape[0]),
    }
    summary["radius_ratio_smallest_to_largest_beta"] = summary["spectral_radius_mean"][0] / max(
        summary["spectral_radius_mean"][-1], 1e-30
    )
    atomic_write_json(out / "fig5_scores_vs_beta.json", {k: summary[k] for k in SUMMARY_KEYS})
    four = _pick(plain, 4)
    atomic_write_json(
        out / "fig5_histograms.json",
        {
            p.name: {
                "beta": c["beta"],
                "spectral_radius": scores[p.name]["spectral_radius"],
                "entropy": scores[p.name]["entropy"],
            }
            for p, _, c in four
        },
    )
    if plt is not None:
        plot_scores_vs_beta(plt, summary, out / "fig5_scores_vs_beta.png")
        _plot_histograms(plt, {p.name: scores[p.name] for p, _, _ in four}, out / "fig5_histograms.png")
    report.add(
        "Fig. 5 (a, b): spectral radius and entropy histograms",
        "fig5_histograms.png",
        "fig5_histograms.json",
        "Histograms over test images of log10 spectral radius and von Neumann entropy for four betas.",
    )
    report.add(
        "Fig. 5 (c): scores against beta",
        "fig5_scores_vs_beta.png",
        "fig5_scores_vs_beta.json",
        f"Spearman(beta, mean spectral radius) = {_fmt(summary['spearman_beta_spectral_radius'])}; "
        f"Spearman(beta, mean entropy) = {_fmt(summary['spearman_beta_entropy'])}; mean radius at the "
        f"smallest beta / at the largest = {_fmt(summary['radius_ratio_smallest_to_largest_beta'])}. "
        "The paper: both scores fall as beta grows (stronger prior, smoother, more robust encoder).",
    )

    # Attacks (Fig. 2, Fig. 3, Fig. 5 d) and the PGD comparison.
    x_attack = test_images[: settings.attack_limit]
    paper_grid = attack.log_grid(1e-3, 1.0, settings.attack_steps)
    unit_grid = attack.log_grid(1e-2, 10.0, settings.attack_steps)
    attacks: dict[str, dict] = {}
    for path, model, config in tqdm(plain, desc="attacking models", disable=not progress):
        spec = pullgeom.spectrum(model.encoder, x_attack, k=settings.k)
        paper = attack.eigen_attack(model, x_attack, spec, paper_grid, "paper")
        unit = attack.eigen_attack(model, x_attack, spec, unit_grid, "unit")
        rnd = attack.random_attack(model, x_attack, unit_grid)
        attacks[path.name] = {
            "beta": config["beta"],
            "paper_deltas": paper_grid.tolist(),
            "paper_mse": paper.mse.tolist(),
            "paper_latent": paper.latent.tolist(),
            "unit_deltas": unit_grid.tolist(),
            "unit_mse": unit.mse.tolist(),
            "unit_latent": unit.latent.tolist(),
            "random_mse": rnd.mse[0].tolist(),
            "random_latent": rnd.latent[0].tolist(),
        }
    atomic_write_json(out / "attacks.json", attacks)
    small = plain[0]
    examples = attack.corrupted_examples(
        small[1], x_attack[:8], pullgeom.spectrum(small[1].encoder, x_attack[:8])
    )
    atomic_write_json(
        out / "fig2_examples.json",
        {"beta": small[2]["beta"], "deltas": list(attack.FIG2_DELTAS), "rows": list(examples)},
    )
    if plt is not None:
        plot_image_grid(
            plt,
            [(name, images) for name, images in examples.items()],
            out / "fig2_examples.png",
            columns=min(8, x_attack.shape[0]),
        )
        _plot_latent_vs_delta(plt, attacks, out / "fig3_latent_vs_delta.png")
        plot_mse_vs_step(plt, {p.name: attacks[p.name] for p, _, _ in four}, out / "fig5_mse_vs_step.png")
    atomic_write_json(
        out / "fig3_latent_vs_delta.json",
        {
            n: {"beta": a["beta"], "deltas": a["paper_deltas"], "latent_top_direction": a["paper_latent"][0]}
            for n, a in attacks.items()
        },
    )
    atomic_write_json(
        out / "fig5_mse_vs_step.json",
        {
            p.name: {
                "beta": attacks[p.name]["beta"],
                "deltas": attacks[p.name]["paper_deltas"],
                "mse": attacks[p.name]["paper_mse"],
            }
            for p, _, _ in four
        },
    )
    report.add(
        "Fig. 2: corrupted inputs and reconstructions",
        "fig2_examples.png",
        "fig2_examples.json",
        f"beta = {small[2]['beta']}: originals, reconstructions, x + delta * lambda_1 * v_1 at delta = "
        f"{attack.FIG2_DELTAS} and their reconstructions.",
    )
    report.add(
        "Fig. 3: latent distance against delta",
        "fig3_latent_vs_delta.png",
        "fig3_latent_vs_delta.json",
        "||mu(x_c) - mu(x)|| for the top eigendirection (paper scaling) per beta.",
    )
    eigen_vs_random = _eigen_vs_random(attacks, unit_grid)
    summary["eigen_vs_random"] = eigen_vs_random
    report.add(
        "Fig. 5 (d): reconstruction MSE against attack step, top-5 directions",
        "fig5_mse_vs_step.png",
        "fig5_mse_vs_step.json",
        "Eigen attack vs a random direction of the same l2 norm (unit scaling): increase of the "
        "reconstruction MSE over the clean one, eigen / random, at "
        f"norm {_fmt(eigen_vs_random['budget'])}: "
        + ", ".join(
            f"beta {_fmt(b)}: {_fmt(r)}x"
            for b, r in zip(eigen_vs_random["betas"], eigen_vs_random["mse_ratio"], strict=True)
        )
        + ".",
    )

    budgets = attack.log_grid(0.05, 2.0, 6)
    theorem = {}
    for path, model, config in tqdm(_pick(plain, 3), desc="PGD comparison", disable=not progress):
        theorem[path.name] = {
            "beta": config["beta"],
            **attack.theorem_check(model, test_images[: settings.pgd_limit], budgets, settings.pgd_steps),
        }
    atomic_write_json(out / "theorem_pgd.json", theorem)
    summary["theorem_pgd"] = {
        n: {
            "beta": t["beta"],
            "budgets": t["budgets"],
            "ratio_eigen_G_to_pgd": t["ratio_eigen_G_to_pgd"],
            "ratio_eigen_mu_to_pgd": t["ratio_eigen_mu_to_pgd"],
            "ratio_random_to_pgd": t["ratio_random_to_pgd"],
        }
        for n, t in theorem.items()
    }
    if plt is not None:
        _plot_theorem(plt, theorem, out / "theorem_pgd.png")
    report.add(
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
        + ". A ratio near 1 at small budgets is the theorem's claim.",
    )

    # Fig. 6: mixup against the beta-VAE frontier.
    if mixed:
        summary["mixup"] = _mixup_comparison(rows, [scores[p.name] for p, _, _ in mixed])
        atomic_write_json(out / "fig6_mixup.json", summary["mixup"])
        if plt is not None:
            _plot_mixup(plt, rows, [scores[p.name] for p, _, _ in mixed], out / "fig6_mixup.png")
        report.add(
            "Fig. 6: latent mixup vs the beta-VAE",
            "fig6_mixup.png",
            "fig6_mixup.json",
            " ".join(
                f"beta {_fmt(m['beta'])} mixup {_fmt(m['mixup'])}: radius {_fmt(m['radius'])} vs plain "
                f"{_fmt(m['plain_radius'])}; MSE {_fmt(m['mse'])} vs {_fmt(m['frontier_mse'])} for the "
                "beta-VAE reaching that radius."
                for m in summary["mixup"]
            ),
        )

    # Figs. 8-10: the decoder-metric variant (Eq. 11).
    decoder_rows = []
    x_dec = test_images[: settings.decoder_limit]
    for path, model, config in tqdm(
        _pick(plain, settings.decoder_models), desc="decoder metric", disable=not progress
    ):
        s = score_dataset(model, x_dec, k=settings.k, decoder_metric=True, batch_size=64, progress=False)
        atomic_write_text(out / "scores_decoder_metric" / f"{path.name}.csv", scores_csv(s))
        decoder_rows.append(
            {
                "beta": config["beta"],
                "spectral_radius_mean": float(s["spectral_radius"].mean()),
                "spectral_radius_std": float(s["spectral_radius"].std()),
                "entropy_mean": float(s["entropy"].mean()),
                "entropy_std": float(s["entropy"].std()),
                "spectral_radius": s["spectral_radius"].tolist(),
                "entropy": s["entropy"].tolist(),
            }
        )
    decoder_summary = {
        "betas": [r["beta"] for r in decoder_rows],
        "spectral_radius_mean": [r["spectral_radius_mean"] for r in decoder_rows],
        "spectral_radius_std": [r["spectral_radius_std"] for r in decoder_rows],
        "entropy_mean": [r["entropy_mean"] for r in decoder_rows],
        "entropy_std": [r["entropy_std"] for r in decoder_rows],
        "spearman_beta_spectral_radius": spearman(
            [r["beta"] for r in decoder_rows], [r["spectral_radius_mean"] for r in decoder_rows]
        ),
        "spearman_beta_entropy": spearman(
            [r["beta"] for r in decoder_rows], [r["entropy_mean"] for r in decoder_rows]
        ),
    }
    summary["decoder_metric"] = decoder_summary
    atomic_write_json(
        out / "fig8_10_decoder_metric.json", {"summary": decoder_summary, "per_beta": decoder_rows}
    )
    if plt is not None:
        _plot_histograms(
            plt, {str(r["beta"]): r for r in decoder_rows}, out / "fig8_10_decoder_metric_hist.png"
        )
        plot_scores_vs_beta(plt, decoder_summary, out / "fig8_10_decoder_metric.png")
    report.add(
        "Figs. 8-10: the decoder-induced metric (Eq. 11)",
        "fig8_10_decoder_metric.png",
        "fig8_10_decoder_metric.json",
        f"G = J^T G_z J on {x_dec.shape[0]} images per model: Spearman(beta, radius) = "
        f"{_fmt(decoder_summary['spearman_beta_spectral_radius'])}, Spearman(beta, entropy) = "
        f"{_fmt(decoder_summary['spearman_beta_entropy'])}. Histograms: fig8_10_decoder_metric_hist.png.",
    )

    summary["models"] = {
        n: {k: v for k, v in s.items() if k not in ("spectral_radius", "entropy")} for n, s in scores.items()
    }
    atomic_write_json(out / "summary.json", summary)
    header = f"# {title}\n\n{notes}" + (
        "" if plt is not None else "\n\nmatplotlib is not installed: numbers only (pip install matplotlib)."
    )
    report.write(header)
    return summary


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


def _mixup_comparison(plain_rows: list[dict], mixed_rows: list[dict]) -> list[dict]:
    """Each mixup model against the plain model at its beta and the beta-VAE frontier at its radius.

    frontier_mse: the plain models' MSE interpolated (in log radius) at the mixup model's radius.
    """
    log_r = np.log([r["spectral_radius_mean"] for r in plain_rows])
    mse = np.array([r["recon_mse"] for r in plain_rows])
    order = np.argsort(log_r)
    result = []
    for m in mixed_rows:
        same = min(plain_rows, key=lambda r: abs(math.log(r["beta"] / m["beta"])))
        radius = m["spectral_radius_mean"]
        inside = log_r.min() <= math.log(radius) <= log_r.max()
        frontier = float(np.interp(math.log(radius), log_r[order], mse[order])) if inside else float("nan")
        result.append(
            {
                "beta": m["beta"],
                "mixup": m["mixup"],
                "radius": radius,
                "mse": m["recon_mse"],
                "plain_beta": same["beta"],
                "plain_radius": same["spectral_radius_mean"],
                "plain_mse": same["recon_mse"],
                "frontier_mse": frontier,
                "lower_radius_than_plain": radius < same["spectral_radius_mean"],
                "mse_no_worse_than_frontier": (m["recon_mse"] <= frontier) if inside else None,
            }
        )
    return result


def plot_scores_vs_beta(plt, summary: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for ax, key, label in ((axes[0], "spectral_radius", "spectral radius"), (axes[1], "entropy", "entropy")):
        ax.errorbar(
            summary["betas"], summary[f"{key}_mean"], yerr=summary[f"{key}_std"], marker="o", capsize=3
        )
        ax.set_xscale("log")
        ax.set_xlabel("beta")
        ax.set_ylabel(f"mean {label}")
    axes[0].set_yscale("log")
    _save_figure(fig, path)
    plt.close(fig)


def _plot_histograms(plt, rows: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for row in rows.values():
        label = row.get("label") or f"beta={row['beta']:.3g}"
        axes[0].hist(np.log10(np.maximum(row["spectral_radius"], 1e-30)), bins=30, alpha=0.5, label=label)
        axes[1].hist(row["entropy"], bins=30, alpha=0.5, label=label)
    axes[0].set_xlabel("log10 spectral radius")
    axes[1].set_xlabel("von Neumann entropy")
    axes[0].legend(fontsize=7)
    _save_figure(fig, path)
    plt.close(fig)


def _plot_latent_vs_delta(plt, attacks: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for row in attacks.values():
        ax.plot(row["paper_deltas"], row["paper_latent"][0], label=f"beta={row['beta']:.3g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("delta (x + delta lambda_1 v_1)")
    ax.set_ylabel("||mu(x_c) - mu(x)||")
    ax.legend(fontsize=6, ncol=2)
    _save_figure(fig, path)
    plt.close(fig)


def plot_mse_vs_step(plt, attacks: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, len(attacks), figsize=(3.2 * len(attacks), 3), squeeze=False)
    for ax, row in zip(axes[0], attacks.values(), strict=True):
        for i, curve in enumerate(row["paper_mse"]):
            ax.plot(row["paper_deltas"], curve, label=f"v_{i + 1}")
        ax.set_xscale("log")
        ax.set_title(f"beta={row['beta']:.3g}", fontsize=8)
        ax.set_xlabel("delta")
    axes[0][0].set_ylabel("reconstruction MSE")
    axes[0][0].legend(fontsize=6)
    _save_figure(fig, path)
    plt.close(fig)


def _plot_theorem(plt, theorem: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, len(theorem), figsize=(3.2 * len(theorem), 3), squeeze=False)
    for ax, row in zip(axes[0], theorem.values(), strict=True):
        for key in ("pgd", "eigen_G", "eigen_mu", "random"):
            ax.plot(row["budgets"], row[key], marker=".", label=key)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"beta={row['beta']:.3g}", fontsize=8)
        ax.set_xlabel("l2 budget")
    axes[0][0].set_ylabel("||mu(x + eta) - mu(x)||")
    axes[0][0].legend(fontsize=6)
    _save_figure(fig, path)
    plt.close(fig)


def _plot_mixup(plt, plain_rows: list[dict], mixed_rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(
        [r["spectral_radius_mean"] for r in plain_rows],
        [r["recon_mse"] for r in plain_rows],
        "o-",
        label="beta-VAE",
    )
    for r in plain_rows:
        ax.annotate(f"{r['beta']:.2g}", (r["spectral_radius_mean"], r["recon_mse"]), fontsize=6)
    ax.scatter(
        [r["spectral_radius_mean"] for r in mixed_rows],
        [r["recon_mse"] for r in mixed_rows],
        marker="*",
        s=120,
        color="red",
        label="mixup",
        zorder=3,
    )
    ax.set_xscale("log")
    ax.set_xlabel("mean spectral radius")
    ax.set_ylabel("reconstruction MSE")
    ax.legend(fontsize=7)
    _save_figure(fig, path)
    plt.close(fig)


def write_histograms(scores: dict[str, Tensor], path: Path) -> bool:
    """Histograms of one model's scores (``pullgeom score``); False when matplotlib is missing."""
    plt = pyplot_or_none()
    if plt is None:
        return False
    _plot_histograms(
        plt,
        {
            "model": {
                "label": f"{len(scores['index'])} images",
                "spectral_radius": scores["spectral_radius"].tolist(),
                "entropy": scores["entropy"].tolist(),
            }
        },
        path,
    )
    return True
