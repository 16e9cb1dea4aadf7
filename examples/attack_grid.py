"""An eigendirection attack on the paper's VAE, against a random direction of the same norm.

Trains one small beta-VAE on mnist-small, attacks test digits along the top eigenvector of
the pullback metric (x + delta * v_1), and saves the image grid of Fig. 2 (x + delta * s_1 * v_1).

    python examples/attack_grid.py [--smoke] [--out grid.png]
"""

import argparse
import tempfile

import pullgeom
from pullgeom.paper import attacks as attack
from pullgeom.paper.datasets import load_dataset
from pullgeom.paper.evaluation import fig2_examples
from pullgeom.paper.figures import plot_fig2, pyplot_or_none
from pullgeom.paper.outputs import load_checkpoint
from pullgeom.paper.training import SweepConfig, train_sweep


BETA = 0.01


def main(smoke: bool, out: str) -> None:
    images, _ = load_dataset("mnist-small", "train", limit=256 if smoke else None)
    test, _ = load_dataset("mnist-small", "test", limit=4 if smoke else 32)
    with tempfile.TemporaryDirectory() as tmp:
        [path] = train_sweep(
            SweepConfig(betas=[BETA], mixup=[0.0], epochs=1 if smoke else 3, dataset="mnist-small"),
            images,
            tmp,
        )
        model, _ = load_checkpoint(path)
    spec = pullgeom.spectrum(model.encoder, test, k=5)
    deltas = attack.log_grid(0.1, 5.0, 3 if smoke else 10)
    eigen = attack.eigen_attack(model, test, spec, deltas, "unit")
    rnd = attack.random_attack(model, test, deltas)
    for j, delta in enumerate(deltas.tolist()):
        print(
            f"||eta|| = {delta:6.3f}: recon MSE eigen v_1 {eigen.mse[0, j]:.4f}  random {rnd.mse[0, j]:.4f}  "
            f"latent shift eigen {eigen.latent[0, j]:.3f}  random {rnd.latent[0, j]:.3f}"
        )
    plt = pyplot_or_none()
    if plt is not None:
        # The first 8 images, each along its own top singular vector of J_mu, at the authors' scale.
        plot_fig2(plt, fig2_examples(model, test), BETA, out)
        print(f"image grid: {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--out", default="attack_grid.png")
    args = parser.parse_args()
    main(args.smoke, args.out)
