"""Score your own VAE encoder with pullgeom: spectral radius and entropy per input.

Any module returning (mu, logvar) works; here a small custom MLP encoder (untrained, or
trained for a few steps on mnist-small) is scored on held-out MNIST digits.

    python examples/score_own_encoder.py [--smoke]
"""

import argparse

import torch
from torch import nn

import pullgeom
from pullgeom.paper.datasets import load_dataset


class MyEncoder(nn.Module):
    """x: (B, 1, 28, 28) -> (mu, logvar), each (B, 8)."""

    def __init__(self, latent: int = 8):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 2 * latent))

    def forward(self, x):
        mu, logvar = self.body(x).chunk(2, dim=1)
        return mu, logvar


def main(smoke: bool) -> None:
    torch.manual_seed(0)
    images, _ = load_dataset("mnist-small", "train", limit=256 if smoke else 4096)
    test, labels = load_dataset("mnist-small", "test", limit=8 if smoke else 200)
    encoder = MyEncoder()
    decoder = nn.Sequential(nn.Linear(8, 128), nn.ReLU(), nn.Linear(128, 784))  # logits of p(x | z)
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=1e-3)
    for _ in range(5 if smoke else 300):  # a short VAE fit (Bernoulli decoder, beta = 1)
        x = images[torch.randint(len(images), (64,))]
        mu, logvar = encoder(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        recon = nn.functional.binary_cross_entropy_with_logits(decoder(z), x.flatten(1), reduction="sum")
        kl = -0.5 * (1 + logvar - mu.square() - logvar.exp()).sum()
        optimizer.zero_grad()
        ((recon + kl) / len(x)).backward()
        optimizer.step()
    spec = pullgeom.spectrum(encoder.eval(), test, k=3)
    print(f"backend: {spec.backend}; eigenvectors {tuple(spec.eigenvectors.shape)}")
    for digit, radius, entropy in zip(
        labels[:8].tolist(), spec.spectral_radius[:8].tolist(), spec.entropy[:8].tolist(), strict=True
    ):
        print(f"digit {digit}: spectral radius {radius:9.4f}  entropy {entropy:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    main(parser.parse_args().smoke)
