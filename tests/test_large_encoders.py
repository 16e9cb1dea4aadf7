"""Encoders too large for the whole spectrum: ``auto``'s rule (``lanczos_mode``) and the top-k
Lanczos path it then runs, against the float64 dense reference.

The full-size case (Stable Diffusion's VAE encoder, r = 8,192) is measured in
benchmarks/bench_sd_vae.py, not here: these are its shapes in miniature, with the limits that
make auto choose (``MATERIALISE_LIMIT_BYTES``, ``WHOLE_SPECTRUM_MAX_FLOPS``) set to 0. Tolerances:
Lanczos stops at residuals 1e-5 lambda_1 (the backend's tol), so float64 eigenvalues are good to
~1e-10 / gap relative; 1e-8 of lambda_1 would catch any wrong pair, a missed or a spurious one.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_lanczos import single_thread  # noqa: F401 (autouse fixture)

import pullgeom
from pullgeom.api import build_problem
from pullgeom.backends import choose_backend, lanczos_backend
from pullgeom.paper.models import CelebAEncoder
from pullgeom.reference import dense_spectrum

RTOL = 1e-8


class ConvAttentionEncoder(nn.Module):
    """The SD encoder's ingredients in miniature: (B, 1, 6, 6) -> conv, GroupNorm, SiLU, a
    stride-2 conv, self-attention over the 3 x 3 positions (F.scaled_dot_product_attention, as
    diffusers' attention processor calls it), a 1 x 1 conv to (mu, logvar) latents (B, 2, 3, 3).
    N = 36, dz = 18, r = 36."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(1, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.qkv = nn.Linear(8, 24)
        self.heads = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = self.down(F.silu(self.norm(self.conv_in(x))))
        tokens = h.flatten(2).transpose(1, 2)  # (B, 9, 8)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        attended = F.scaled_dot_product_attention(q, k, v)
        h = h + attended.transpose(1, 2).reshape(h.shape)
        mu, logvar = self.heads(h).chunk(2, dim=1)
        return mu, logvar


def encoder_and_inputs(batch: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    encoder = ConvAttentionEncoder().double().eval()
    x = torch.rand(batch, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    return encoder, x


def test_auto_rule_materialises_runs_whole_spectrum_or_top_k(monkeypatch):
    """autograd while A is small and cheap; past the materialising limit, Lanczos to the whole
    spectrum while it fits the FLOP budget, else the top k (what the SD VAE encoder gets)."""
    encoder, x = encoder_and_inputs()
    problem = build_problem(encoder, x)[0]
    assert problem.rank == 36
    assert lanczos_backend.lanczos_mode(problem, "cpu") is None
    assert choose_backend("auto", problem, torch.device("cpu")).name != "lanczos"
    monkeypatch.setattr(lanczos_backend, "MATERIALISE_LIMIT_BYTES", 0)
    assert lanczos_backend.lanczos_mode(problem, "cpu") == "whole spectrum"
    chosen = choose_backend("auto", problem, torch.device("cpu"))
    assert chosen.name == "lanczos" and chosen.whole_spectrum
    monkeypatch.setattr(lanczos_backend, "WHOLE_SPECTRUM_MAX_FLOPS", 0)
    assert lanczos_backend.lanczos_mode(problem, "cpu") == "top k"
    chosen = choose_backend("auto", problem, torch.device("cpu"))
    assert chosen.name == "lanczos" and not chosen.whole_spectrum


def test_budget_separates_celeba_from_stable_diffusion_sizes():
    """With the real constants: the CelebA encoder (r = 256) gets its whole spectrum; the same
    FLOPs per forward at the SD VAE's rank (r = 8,192) exceed the budget, so only the top k."""
    celeba = CelebAEncoder().eval()
    problem = build_problem(celeba, torch.rand(1, 3, 64, 64))[0]
    flops = lanczos_backend._forward_flops(problem, torch.device("cpu"))
    whole = lanczos_backend.TAPE_PRODUCT_F * (problem.rank + 1) * flops
    assert whole < lanczos_backend.WHOLE_SPECTRUM_MAX_FLOPS
    # SD: dz = 4,096 latents of a 3 x 256 x 256 image, and a forward ~ 100x CelebA's at least.
    sd_like = replace(problem, latent_dim=4096, rank=8192, input_shape=(3, 256, 256))
    sd_whole = lanczos_backend.TAPE_PRODUCT_F * (sd_like.rank + 1) * flops
    assert sd_whole > lanczos_backend.WHOLE_SPECTRUM_MAX_FLOPS / 100


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, RTOL), (torch.float32, 1e-4)])
def test_auto_top_k_matches_the_reference(monkeypatch, dtype, rtol):
    """auto's top-k path on a conv + attention encoder (the op tape through the attention's math
    kernel): the top k of the float64 reference, residuals within the
    backend's tolerance, and no truncated entropy (NaN, ``complete`` false)."""
    monkeypatch.setattr(lanczos_backend, "MATERIALISE_LIMIT_BYTES", 0)
    monkeypatch.setattr(lanczos_backend, "WHOLE_SPECTRUM_MAX_FLOPS", 0)
    encoder, x = encoder_and_inputs()
    result = pullgeom.spectrum(encoder.to(dtype), x.to(dtype), k=4)
    assert result.backend == "lanczos"
    values, vectors = dense_spectrum(encoder.double(), x)
    scale = values[:, :1]
    error = ((result.eigenvalues.double() - values[:, :4]).abs() / scale).max().item()
    assert error <= rtol, f"top-4 eigenvalues off by {error:.2e} relative to lambda_1"
    assert (result.residuals.double() <= 2e-5 * scale).all()
    # eigenvectors: |cos| with the reference's, the top 4 being simple here
    cosines = torch.einsum("bkn,bnk->bk", result.eigenvectors.flatten(2).double(), vectors[:, :, :4]).abs()
    assert (cosines >= 1 - math.sqrt(rtol)).all(), cosines
    if not result.complete.all():
        assert result.entropy[~result.complete].isnan().all()


def test_tiny_stable_diffusion_vae_top_k_through_auto(monkeypatch):
    """The SD architecture's own modules (diffusers AutoencoderKL: ResNet blocks, GroupNorm,
    mid-block attention, the diagonal Gaussian) on auto's top-k path, float64."""
    diffusers = pytest.importorskip("diffusers")
    monkeypatch.setattr(lanczos_backend, "MATERIALISE_LIMIT_BYTES", 0)
    monkeypatch.setattr(lanczos_backend, "WHOLE_SPECTRUM_MAX_FLOPS", 0)
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=2, norm_num_groups=4, sample_size=6).double().eval()
    x = torch.rand(1, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def twin(inputs):  # the hand-written flat (mu, sigma) pair
        posterior = vae.encode(inputs).latent_dist
        return posterior.mean.flatten(1), posterior.std.flatten(1)

    result = pullgeom.spectrum(vae, x, k=3)
    values = dense_spectrum(twin, x, sigma="std")[0]
    assert result.backend == "lanczos"
    error = ((result.eigenvalues - values[:, :3]).abs() / values[:, :1]).max().item()
    assert error <= RTOL, f"top-3 eigenvalues off by {error:.2e} relative to lambda_1"
