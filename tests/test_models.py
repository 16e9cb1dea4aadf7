"""The paper's VAEs: shapes, architecture and the pullgeom contract."""

import pytest
import torch

import pullgeom
from pullgeom.paper.models import CelebAVAE, PaperVAE, build_model


@pytest.fixture(autouse=True)
def _no_autotune(monkeypatch):
    """Skip backend="auto"'s one-time timing of every backend (tens of seconds on a busy 2-core box):
    these tests check results, not which backend is fastest."""
    monkeypatch.setenv("PULLGEOM_AUTOTUNE", "0")


def test_paper_vae_architecture():
    model = PaperVAE()
    linears = [m for m in model.encoder.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 256), (256, 256), (256, 512),
                                                                   (512, 32), (32, 32), (32, 32)]
    dec = [m for m in model.decoder.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in dec] == [(32, 512), (512, 256), (256, 256), (256, 784)]
    # BatchNorm directly before every tanh
    for part in (model.encoder.body, model.decoder.body):
        layers = list(part)
        for i, layer in enumerate(layers):
            if isinstance(layer, torch.nn.Tanh):
                assert isinstance(layers[i - 1], torch.nn.BatchNorm1d)


def test_paper_vae_shapes_and_spectrum():
    torch.manual_seed(0)
    model = PaperVAE().eval()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        recon, mu, logvar = model(x)
    assert recon.shape == x.shape and mu.shape == (3, 32) and logvar.shape == (3, 32)
    assert float(recon.min()) >= 0 and float(recon.max()) <= 1
    spec = pullgeom.spectrum(model.encoder, x, k=5)
    assert spec.eigenvalues.shape == (3, 5) and spec.eigenvectors.shape == (3, 5, 1, 28, 28)
    # the 32-wide bottleneck bounds the rank of G by 32, not 2 * dz = 64
    assert spec.all_eigenvalues.shape[1] <= 32


def test_celeba_vae_shapes_and_config_roundtrip():
    torch.manual_seed(0)
    model = CelebAVAE().eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        recon, mu, logvar = model(x)
    assert recon.shape == x.shape and mu.shape == (2, 128) and logvar.shape == (2, 128)
    rebuilt = build_model(model.config)
    assert type(rebuilt) is CelebAVAE
    assert sum(p.numel() for p in rebuilt.parameters()) == sum(p.numel() for p in model.parameters())


def test_celeba_vae_small_widths_and_channel_validation():
    model = CelebAVAE(latent_dim=3, channels=(2, 4, 6)).eval()
    assert [m.out_channels for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d)] == [2, 4, 6]
    assert model.encoder.mu.in_features == 6 * 8 * 8  # three stride-2 blocks: 64 -> 8 pixels
    with torch.no_grad():
        recon, mu, _ = model(torch.rand(2, 3, 64, 64))
    assert recon.shape == (2, 3, 64, 64) and mu.shape == (2, 3)
    assert build_model(model.config).config == model.config
    for channels in ((), (4,) * 7, (4, 0)):
        with pytest.raises(ValueError, match="1 to 6 positive conv widths"):
            CelebAVAE(channels=channels)
