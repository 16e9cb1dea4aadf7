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


def fig2_row_label(name: str) -> str:
    """A row of ``attacks.corrupted_examples`` in words (its keys: original, reconstruction,
    corrupted_<delta>, reconstruction_<delta>)."""
    kind, _, delta = name.partition("_")
    if not delta:
        return name
    return f"corrupted,\ndelta = {delta}" if kind == "corrupted" else f"its reconstruction,\ndelta = {delta}"


def plot_fig2(plt, examples: dict[str, Tensor], beta: float, path: Path) -> None:
    """Fig. 2: one row per entry of ``attacks.corrupted_examples`` (each (B, *S), drawn in [0, 1]),
    one column per image, rows labelled in words and the model's beta in the title."""
    columns = next(iter(examples.values())).shape[0]
    fig, axes = plt.subplots(len(examples), columns, figsize=(1.2 * columns + 1.0, 1.3 * len(examples)),
                             squeeze=False)
    for r, (name, images) in enumerate(examples.items()):
        for c in range(columns):
            ax = axes[r][c]
            image = images[c].detach().float().clamp(0, 1)  # a corrupted input may leave [0, 1]
            ax.imshow(image.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(fig2_row_label(name), fontsize=7)
    fig.suptitle(f"beta = {beta:.3g}: corrupted x + delta * s_1 * v_1 (s_1, v_1: the top singular value\n"
                 "and right singular vector of J_mu, the authors' step); pixels shown clipped to [0, 1]",
                 fontsize=8)
    save_figure(fig, path)
    plt.close(fig)


def plot_scores_vs_beta(plt, summary: dict, path: Path, errors: dict | None = None,
                        error_label: str = "+/- std over images") -> None:
    """Mean radius and entropy against beta. summary: ``betas``, ``<score>_mean`` and ``<score>_std``
    for score in spectral_radius, entropy; errors: {score: half-widths} drawn instead of the std
    (``error_label`` says what they are)."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for ax, key, label in ((axes[0], "spectral_radius", "spectral radius"), (axes[1], "entropy", "entropy")):
        yerr = summary[f"{key}_std"] if errors is None else errors[key]
        ax.errorbar(summary["betas"], summary[f"{key}_mean"], yerr=yerr, marker="o", capsize=3)
        ax.set_xscale("log")
        ax.set_xlabel("beta")
        ax.set_ylabel(f"mean {label}\n({error_label})", fontsize=8)
    axes[0].set_yscale("log")
    save_figure(fig, path)
    plt.close(fig)


def plot_authors_comparison(plt, rows: list[dict], path: Path, collapsed: dict | None = None) -> None:
    """Radius and entropy against beta in the authors' convention: theirs as mean +/- std (band),
    ours as mean +/- std (error bars); rows as ``report.compare_with_authors`` gives them, and its
    ``collapsed`` entry (or None): the betas where a side's models collapsed, drawn as vertical lines."""
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
        for side, color, style in (("ours", "tab:blue", ":"), ("authors", "tab:gray", "--")):
            for i, beta in enumerate((collapsed or {}).get(side, [])):
                ax.axvline(beta, color=color, linestyle=style, linewidth=1,
                           label=f"collapsed ({side})" if i == 0 else None)
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
    """Fig. 5 (d) in the unit scaling, one panel per model: reconstruction MSE against the l2 norm t
    of the perturbation for x + t v_i (i = 1..k) and for a random unit direction x + t u, and
    when the row has ``box_mse`` for ``pullgeom.perturb`` inside the pixel box at budget t. Each
    row: ``beta``, ``unit_deltas`` (D,), ``unit_mse`` (k, D), ``random_mse`` (D,), ``box_mse`` (D,)."""
    def draw(ax, row):
        for i, curve in enumerate(row["unit_mse"]):
            ax.plot(row["unit_deltas"], curve, label=f"v_{i + 1}")
        ax.plot(row["unit_deltas"], row["random_mse"], color="black", linestyle="--", label="random u")
        if "box_mse" in row:
            ax.plot(row["unit_deltas"], row["box_mse"], color="black", linestyle=":",
                    label="perturb, pixels in the box")

    _panel_per_model(plt, attacks, draw, "l2 norm t of the perturbation\n(unit scaling: x + t v_i, x + t u)",
                     "reconstruction MSE", path)


# Theorem 3.2's curves: eigen(G) and eigen(J_mu) coincide to ~1e-5 and PGD is within 2 % of them at
# small budgets, so each gets its own line style and marker to stay visible on top of the others.
_THEOREM_STYLES = {"pgd": ("PGD", "-", "o", 7), "eigen_G": ("eigen(G), one step", "--", "s", 5),
                   "eigen_mu": ("eigen(J_mu), one step", ":", "^", 4), "random": ("random", "-.", "x", 5)}


def plot_theorem(plt, theorem: dict, path: Path) -> None:
    """Theorem 3.2, one column per model: latent distance of each attack against the l2 budget (top)
    and each one-step attack's distance divided by PGD's (bottom). Each row: ``beta``, ``budgets``
    and the lists of ``attacks.theorem_check``."""
    fig, axes = plt.subplots(2, len(theorem), figsize=(3.4 * len(theorem), 5.6), squeeze=False, sharex=True)
    for column, row in enumerate(theorem.values()):
        top, bottom = axes[0][column], axes[1][column]
        for key, (label, style, marker, size) in _THEOREM_STYLES.items():
            top.plot(row["budgets"], row[key], linestyle=style, marker=marker, markersize=size,
                     fillstyle="none", label=label)
            if key != "pgd":
                bottom.plot(row["budgets"], row[f"ratio_{key}_to_pgd"], linestyle=style, marker=marker,
                            markersize=size, fillstyle="none", label=label)
        bottom.axhline(1.0, color="gray", linewidth=0.8)
        top.set_yscale("log")
        top.set_xscale("log")
        top.set_title(f"beta={row['beta']:.3g}", fontsize=8)
        bottom.set_xlabel("l2 budget ||eta||")
    axes[0][0].set_ylabel("||mu(x + eta) - mu(x)||")
    axes[1][0].set_ylabel("ratio to PGD's distance")
    axes[0][0].legend(fontsize=6)
    save_figure(fig, path)
    plt.close(fig)


def _panel_per_model(plt, rows: dict, draw, xlabel: str, ylabel: str, path: Path) -> None:
    """One log-x panel per model row (titled by its beta), drawn by ``draw(ax, row)``."""
    fig, axes = plt.subplots(1, len(rows), figsize=(3.4 * len(rows), 3), squeeze=False)
    for ax, row in zip(axes[0], rows.values(), strict=True):
        draw(ax, row)
        ax.set_xscale("log")
        ax.set_title(f"beta={row['beta']:.3g}", fontsize=8)
        ax.set_xlabel(xlabel)
    axes[0][0].set_ylabel(ylabel)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()  # each panel has its own y range: keep its tick labels off its neighbour
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
