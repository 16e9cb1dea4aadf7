"""The figures pullgeom draws (matplotlib, Agg): each plot_* takes the pyplot module, the numbers
already computed (dicts as ``report`` writes them to JSON) and a path, and writes one PNG
atomically. matplotlib is optional: ``pyplot_or_none`` says whether it is there."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from torch import Tensor

from pullgeom.paper.outputs import atomic_write_bytes


def pyplot_or_none():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib (the ``plots`` extra) is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig, path: Path) -> None:
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
    save_figure(fig, path)
    plt.close(fig)


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
    save_figure(fig, path)
    plt.close(fig)


def plot_authors_comparison(plt, rows: list[dict], path: Path) -> None:
    """Radius and entropy against beta in the authors' convention: theirs as mean +/- std (band),
    ours as mean +/- std (error bars); rows as ``report.compare_with_authors`` gives them."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    betas = [r["beta"] for r in rows]
    for ax, score, label in ((axes[0], "radius", "largest singular value of J_mu"),
                             (axes[1], "entropy", "entropy of s / s_max")):
        theirs = np.array([r[f"authors_{score}_mean"] for r in rows])
        spread = np.array([r[f"authors_{score}_std"] for r in rows])
        ax.plot(betas, theirs, color="tab:gray", label="authors (mean +/- std)")
        ax.fill_between(betas, theirs - spread, theirs + spread, color="tab:gray", alpha=0.25, linewidth=0)
        ours, ours_spread = ([r[f"ours_{score}_{stat}"] for r in rows] for stat in ("mean", "std"))
        ax.errorbar(betas, ours, yerr=ours_spread, marker="o", markersize=3, capsize=2, linestyle="none",
                    color="tab:blue", label="ours (mean +/- std)")
        ax.set_xscale("log")
        ax.set_xlabel("beta")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    save_figure(fig, path)
    plt.close(fig)


def plot_histograms(plt, rows: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for row in rows.values():
        label = row.get("label") or f"beta={row['beta']:.3g}"
        axes[0].hist(np.log10(np.maximum(row["spectral_radius"], 1e-30)), bins=30, alpha=0.5, label=label)
        axes[1].hist(row["entropy"], bins=30, alpha=0.5, label=label)
    axes[0].set_xlabel("log10 spectral radius")
    axes[1].set_xlabel("von Neumann entropy")
    axes[0].legend(fontsize=7)
    save_figure(fig, path)
    plt.close(fig)


def plot_latent_vs_delta(plt, attacks: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for row in attacks.values():
        ax.plot(row["paper_deltas"], row["paper_latent"][0], label=f"beta={row['beta']:.3g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("delta (x + delta lambda_1 v_1)")
    ax.set_ylabel("||mu(x_c) - mu(x)||")
    ax.legend(fontsize=6, ncol=2)
    save_figure(fig, path)
    plt.close(fig)


def plot_mse_vs_step(plt, attacks: dict, path: Path) -> None:
    def draw(ax, row):
        for i, curve in enumerate(row["paper_mse"]):
            ax.plot(row["paper_deltas"], curve, label=f"v_{i + 1}")

    _panel_per_model(plt, attacks, draw, "delta", "reconstruction MSE", path)


def plot_theorem(plt, theorem: dict, path: Path) -> None:
    def draw(ax, row):
        for key in ("pgd", "eigen_G", "eigen_mu", "random"):
            ax.plot(row["budgets"], row[key], marker=".", label=key)
        ax.set_yscale("log")

    _panel_per_model(plt, theorem, draw, "l2 budget", "||mu(x + eta) - mu(x)||", path)


def _panel_per_model(plt, rows: dict, draw, xlabel: str, ylabel: str, path: Path) -> None:
    """One log-x panel per model row (titled by its beta), drawn by ``draw(ax, row)``."""
    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 3), squeeze=False)
    for ax, row in zip(axes[0], rows.values(), strict=True):
        draw(ax, row)
        ax.set_xscale("log")
        ax.set_title(f"beta={row['beta']:.3g}", fontsize=8)
        ax.set_xlabel(xlabel)
    axes[0][0].set_ylabel(ylabel)
    axes[0][0].legend(fontsize=6)
    save_figure(fig, path)
    plt.close(fig)


def plot_mixup(plt, plain_rows: list[dict], comparison: list[dict], path: Path) -> None:
    """Fig. 6. plain_rows: the plain models' score rows (``beta``, ``spectral_radius_mean``,
    ``recon_mse``), drawn sorted by radius: the beta-VAE frontier the comparison interpolates.
    comparison: ``report._mixup_comparison``'s rows (fig6_mixup.json); each mixup model is a star
    joined by a dotted line to the plain model of its beta (``plain_radius``, ``plain_mse``)."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    frontier = sorted(plain_rows, key=lambda r: r["spectral_radius_mean"])
    ax.plot([r["spectral_radius_mean"] for r in frontier], [r["recon_mse"] for r in frontier], "o-",
            label="beta-VAE (labels: beta)")
    for r in frontier:
        ax.annotate(f"{r['beta']:.2g}", (r["spectral_radius_mean"], r["recon_mse"]), fontsize=6)
    for m in comparison:
        ax.plot([m["radius"], m["plain_radius"]], [m["mse"], m["plain_mse"]], ":", color="red", linewidth=1)
        ax.annotate(f"{m['beta']:.2g}, w={m['mixup']:.2g}", (m["radius"], m["mse"]), fontsize=6, color="red")
    ax.scatter([m["radius"] for m in comparison], [m["mse"] for m in comparison], marker="*", s=120,
               color="red", label="mixup (dotted: plain model of its beta)", zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("mean spectral radius")
    ax.set_ylabel("reconstruction MSE")
    ax.legend(fontsize=7)
    save_figure(fig, path)
    plt.close(fig)


def write_histograms(scores: dict[str, Tensor], path: Path) -> bool:
    """Histograms of one model's scores (``pullgeom score``); False when matplotlib is missing."""
    plt = pyplot_or_none()
    if plt is None:
        return False
    plot_histograms(
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
