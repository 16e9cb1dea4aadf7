"""Reproduce the paper's Fig. 5 (c): mean spectral radius and entropy against beta.

Trains a vectorised beta sweep on mnist-small (or MNIST from --data-dir) and plots both
scores with their standard deviations; the numbers go to a JSON file beside the PNG.

    python examples/reproduce_figure.py [--smoke] [--data-dir DIR] [--out fig5c.png]
"""

import argparse
import json
import tempfile

from pullgeom.paper.datasets import load_dataset
from pullgeom.paper.evaluation import score_dataset
from pullgeom.paper.figures import plot_scores_vs_beta, pyplot_or_none
from pullgeom.paper.outputs import load_checkpoint
from pullgeom.paper.report import spearman
from pullgeom.paper.training import SweepConfig, log_spaced, train_sweep


def main(smoke: bool, data_dir: str | None, out: str) -> None:
    dataset = "mnist" if data_dir else "mnist-small"
    images, _ = load_dataset(dataset, "train", data_dir, limit=256 if smoke else 20000)
    test, _ = load_dataset(dataset, "test", data_dir, limit=16 if smoke else 1000)
    betas = log_spaced(0.01, 10, 6 if smoke else 10)
    summary = {
        "betas": betas,
        "spectral_radius_mean": [],
        "spectral_radius_std": [],
        "entropy_mean": [],
        "entropy_std": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        config = SweepConfig(betas=betas, mixup=[0.0], epochs=1 if smoke else 5, dataset=dataset)
        for path in train_sweep(config, images, tmp):
            scores = score_dataset(load_checkpoint(path)[0], test, progress=False)
            for key in ("spectral_radius", "entropy"):
                summary[f"{key}_mean"].append(float(scores[key].mean()))
                summary[f"{key}_std"].append(float(scores[key].std()))
    summary["spearman_beta_spectral_radius"] = spearman(betas, summary["spectral_radius_mean"])
    print(
        json.dumps(
            {k: summary[k] for k in ("betas", "spectral_radius_mean", "spearman_beta_spectral_radius")}
        )
    )
    with open(out.rsplit(".", 1)[0] + ".json", "w") as handle:
        json.dump(summary, handle, indent=2)
    plt = pyplot_or_none()
    if plt is not None:
        plot_scores_vs_beta(plt, summary, out)
        print(f"figure: {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    parser.add_argument(
        "--data-dir", default=None, help="real MNIST IDX folder (default: embedded mnist-small)"
    )
    parser.add_argument("--out", default="fig5c.png")
    args = parser.parse_args()
    main(args.smoke, args.data_dir, args.out)
