"""Train the paper's MNIST VAE and a vectorised beta sweep with the Python API.

All betas train together as one stacked model (one batched matmul per layer); the sweep
directory can be interrupted and resumed. Then each model is scored on held-out digits.

    python examples/train_sweep.py [--smoke] [--out DIR]
"""

import argparse
import tempfile

from pullgeom.paper.datasets import load_dataset
from pullgeom.paper.evaluation import score_dataset
from pullgeom.paper.outputs import load_checkpoint
from pullgeom.paper.report import spearman
from pullgeom.paper.training import SweepConfig, log_spaced, train_sweep


def main(smoke: bool, out: str) -> None:
    images, _ = load_dataset("mnist-small", "train", limit=256 if smoke else None)
    test, _ = load_dataset("mnist-small", "test", limit=16 if smoke else 500)
    betas = log_spaced(0.01, 10, 6)
    config = SweepConfig(betas=betas, mixup=[0.0], epochs=1 if smoke else 5, dataset="mnist-small")
    checkpoints = train_sweep(config, images, out)  # resumable: run it again and it skips finished models
    radii = []
    for path in checkpoints:
        model, saved = load_checkpoint(path)
        scores = score_dataset(model, test, progress=False)
        radii.append(float(scores["spectral_radius"].mean()))
        print(
            f"beta {saved['beta']:<8g} mean spectral radius {radii[-1]:9.4f}  "
            f"entropy {float(scores['entropy'].mean()):.3f}  "
            f"recon MSE {float(scores['recon_mse'].mean()):.4f}"
        )
    print(f"Spearman(beta, spectral radius) = {spearman(betas, radii):.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--out", default=None, help="sweep directory (default: a temporary one)")
    args = parser.parse_args()
    if args.out is None:
        with tempfile.TemporaryDirectory() as tmp:
            main(args.smoke, tmp)
    else:
        main(args.smoke, args.out)
