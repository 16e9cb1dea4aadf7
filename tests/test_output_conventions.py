"""Encoders and decoders as people write or download them: every output convention, latents of
any shape, the VAE objects of diffusers and pythae, and attention layers, each checked against
the float64 brute-force reference (``pullgeom.reference``) through the public API."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pullgeom
from pullgeom.reference import dense_metric, dense_spectrum

TOL = 1e-8  # of lambda_1, float64 throughout


def assert_matches_reference(result, reference_values, k):
    """Top k, and the whole nonzero spectrum of the samples whose spectrum is ``complete``
    (``backend="lanczos"`` by name stops at the top k), within TOL * lambda_1 of the reference's."""
    scale = reference_values[:, :1]
    top_error = (result.eigenvalues - reference_values[:, :k]).abs() / scale
    assert top_error.max() < TOL, top_error.max()
    r = result.all_eigenvalues.shape[1]
    all_error = (result.all_eigenvalues - reference_values[:, :r]).abs() / scale
    assert (all_error[result.complete] < TOL).all(), all_error


class SelfAttentionEncoder(nn.Module):
    """Tokens (B, 4, 3) -> one attention layer -> (mu, logvar), (B, 3) each; ``mha`` picks
    nn.MultiheadAttention or F.scaled_dot_product_attention (both dispatch to the fused CPU
    flash kernel, which has no double backward and no forward-mode AD)."""

    def __init__(self, mha: bool):
        super().__init__()
        self.mha = mha
        self.embed = nn.Linear(3, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.qkv = nn.Linear(8, 24)
        self.head = nn.Linear(32, 6)

    def forward(self, x):
        h = self.embed(x)
        if self.mha:
            h = self.attention(h, h, h, need_weights=False)[0]
        else:
            q, k, v = self.qkv(h).reshape(x.shape[0], 4, 3, 2, 4).permute(2, 0, 3, 1, 4)
            h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape[0], 4, 8)
        out = self.head(h.flatten(1))
        return out[:, :3], out[:, 3:]


class AttentionDecoder(nn.Module):
    """z (B, 3) -> tokens -> F.scaled_dot_product_attention -> mean (B, 8): forward-mode AD
    (``jacfwd`` of the latent metric) through attention."""

    def __init__(self):
        super().__init__()
        self.tokens = nn.Linear(3, 4 * 6)
        self.out = nn.Linear(4 * 2, 8)

    def forward(self, z):
        q, k, v = self.tokens(z).reshape(z.shape[0], 4, 3, 1, 2).permute(2, 0, 3, 1, 4)
        return self.out(F.scaled_dot_product_attention(q, k, v).flatten(1))


@pytest.mark.parametrize("mha", [False, True], ids=["sdpa", "multihead"])
@pytest.mark.parametrize("backend", ["autograd", "lanczos"])
def test_attention_encoders_through_every_jacobian_path(mha, backend):
    torch.manual_seed(0)
    encoder = SelfAttentionEncoder(mha).double().eval()
    x = torch.randn(3, 4, 3, dtype=torch.float64)
    reference = dense_spectrum(encoder, x)[0]
    assert_matches_reference(pullgeom.spectrum(encoder, x, k=3, backend=backend), reference, 3)


@pytest.mark.parametrize("backend", ["autograd", "lanczos"])
def test_attention_decoder_latent_metric(backend):
    torch.manual_seed(1)
    encoder = SelfAttentionEncoder(mha=False).double().eval()
    decoder = AttentionDecoder().double().eval()
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    reference = dense_spectrum(encoder, x, decoder=decoder)[0]
    result = pullgeom.spectrum(encoder, x, k=3, decoder=decoder, backend=backend)
    assert_matches_reference(result, reference, 3)


def test_attention_kernel_is_restored_after_the_call():
    """The math kernel is chosen only while pullgeom differentiates: afterwards the user's
    attention runs on whatever kernel torch would pick."""
    encoder = SelfAttentionEncoder(mha=False).double().eval()
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    pullgeom.spectrum(encoder, x, k=1, backend="lanczos")
    from torch.backends.cuda import flash_sdp_enabled, mem_efficient_sdp_enabled
    assert flash_sdp_enabled() and mem_efficient_sdp_enabled()
    dense_metric(encoder, x)  # the first backward of the fused kernel still runs
