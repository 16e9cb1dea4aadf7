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


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny (a few thousand multiply-adds per op): threads only add
    synchronisation, which on a loaded machine costs far more than the arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


# ----------------------------------------------------------------------------------------
# Output conventions. Each encoder is checked against the reference of a "twin": the same
# function written as a flat (mu, out2) pair, so a wrong reading of a convention (or a
# flattening of mu and sigma that disagree with the decoder's latent shape) cannot hide behind
# the conversion the API and the reference share.

class MLPHeads(nn.Module):
    """x (B, 6) -> two heads (B, 2, 3) each: a latent with shape."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 9), nn.Tanh())
        self.mu = nn.Linear(9, 6)
        self.s = nn.Linear(9, 6)

    def heads(self, x):
        h = self.body(x)
        return self.mu(h).reshape(-1, 2, 3), self.s(h).reshape(-1, 2, 3)


class IndependentNormalEncoder(MLPHeads):
    def __init__(self, event_dims: int):
        super().__init__()
        self.event_dims = event_dims

    def forward(self, x):
        mu, s = self.heads(x)
        return torch.distributions.Independent(torch.distributions.Normal(mu, F.softplus(s)), self.event_dims)


class PythaeStyleEncoder(MLPHeads):
    def forward(self, x):
        mu, s = self.heads(x)
        return {"embedding": mu, "log_covariance": s}


class ShapedLatentDecoder(nn.Module):
    """z (B, 2, 3) -> (mean, logstd) (B, 5): mixes the latent's two axes differently, so feeding
    it z flattened in another order than mu's changes G_z."""

    def __init__(self):
        super().__init__()
        self.rows = nn.Linear(3, 4)
        self.out = nn.Linear(8, 10)

    def forward(self, z):
        h = torch.tanh(self.rows(z)).flatten(1)
        return self.out(h).chunk(2, dim=1)


def seeded_double(module: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.7)
    return module.double().eval()


# name: (encoder factory, its sigma as a function of the second head)
MLP_CONVENTIONS = {
    "independent-1": (lambda: IndependentNormalEncoder(1), F.softplus),
    "independent-2": (lambda: IndependentNormalEncoder(2), F.softplus),
    "independent-3": (lambda: IndependentNormalEncoder(3), F.softplus),  # the batch dim absorbed too
    "pythae-dict": (PythaeStyleEncoder, lambda s: torch.exp(0.5 * s)),
}


@pytest.mark.parametrize("name", MLP_CONVENTIONS)
def test_conventions_with_shaped_latents_match_their_flat_twin(name):
    """mu, sigma (B, 2, 3) flattened alike; a decoder gets z as (B, 2, 3), its out2 read with
    sigma="logstd" (sigma= applies to the decoder, the encoder carries its own sigma)."""
    make, sigma_of = MLP_CONVENTIONS[name]
    encoder = seeded_double(make(), 2)
    decoder = seeded_double(ShapedLatentDecoder(), 3)
    x = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    def twin(x):  # flat (mu, sigma), read with sigma="std"
        mu, s = encoder.heads(x)
        return mu.flatten(1), sigma_of(s).flatten(1)

    def twin_decoder(z):  # reshapes z itself, C order, as mu (B, 2, 3) flattens
        mean, logstd = decoder(z.reshape(-1, 2, 3))
        return mean, torch.exp(logstd)

    reference = dense_spectrum(twin, x, sigma="std")[0]
    assert_matches_reference(pullgeom.spectrum(encoder, x, k=3, backend="autograd"), reference, 3)
    reference = dense_spectrum(twin, x, decoder=twin_decoder, sigma="std")[0]
    for backend in ("autograd", "lanczos"):
        result = pullgeom.spectrum(encoder, x, k=3, decoder=decoder, sigma="logstd", backend=backend)
        assert_matches_reference(result, reference, 3)


# ----------------------------------------------------------------------------------------
# Whole VAE objects: diffusers and pythae, small random configurations (nothing downloaded).

def tiny_autoencoder_kl(seed: int = 0):
    """A random diffusers AutoencoderKL, 1 x 4 x 4 images -> latents (2, 2, 2): two blocks of
    GroupNorm + conv, the mid block's self-attention (F.scaled_dot_product_attention), the
    quant convs and the DiagonalGaussianDistribution. N = 16, dz = 8."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(
        in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=2, norm_num_groups=4, sample_size=4,
    )
    return vae.double().eval()


def images(batch: int, seed: int) -> torch.Tensor:
    return torch.rand(batch, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_diffusers_autoencoder_kl_encoder_and_decoder():
    vae = tiny_autoencoder_kl()
    x = images(2, 5)

    def twin(x):  # what the user would write by hand: a flat (mu, sigma) pair
        posterior = vae.encode(x).latent_dist
        return posterior.mean.flatten(1), posterior.std.flatten(1)

    def twin_decoder(z):
        return vae.decode(z.reshape(-1, 2, 2, 2)).sample

    reference = dense_spectrum(twin, x, sigma="std")[0]
    for backend in ("autograd", "lanczos"):  # lanczos: the op tape through the attention block
        assert_matches_reference(pullgeom.spectrum(vae, x, k=3, backend=backend), reference, 3)
    # vae.encode itself (returns AutoencoderKLOutput) is the same encoder
    assert_matches_reference(pullgeom.spectrum(vae.encode, x, k=3, backend="autograd"), reference, 3)
    twin_metric = dense_metric(twin, x, decoder=twin_decoder, sigma="std")
    with_decoder = torch.linalg.eigvalsh(twin_metric).flip(-1)
    for decoder in (vae, vae.decode):  # vae.decode returns a DecoderOutput
        result = pullgeom.spectrum(vae, x, k=3, decoder=decoder, backend="autograd")
        assert_matches_reference(result, with_decoder, 3)
    metric = pullgeom.metric(vae, x, decoder=vae).dense()
    torch.testing.assert_close(metric, twin_metric, rtol=1e-10, atol=1e-12 * with_decoder[:, 0].max().item())
    scores = pullgeom.scores(vae, x, backend="autograd")
    torch.testing.assert_close(scores.spectral_radius, reference[:, 0], rtol=1e-10, atol=0)
    # Without a decoder G's nonzero spectrum is the Gram's (m = 2dz = 16 = N): SLQ is then exact.
    estimate = pullgeom.entropy_estimate(vae, x, entropy_norm="max")
    exact = pullgeom.spectrum(vae, x, k=1, backend="autograd").entropy
    torch.testing.assert_close(estimate.estimate, exact, rtol=1e-8, atol=1e-8)


def test_diffusers_clamped_logvar_gives_no_sigma_derivative():
    """diffusers clamps logvar to [-30, 20] before sigma = exp(logvar / 2): where the clamp holds,
    the sigma the model samples with does not depend on x, so G is J_mu^T J_mu alone."""
    vae = tiny_autoencoder_kl(seed=1)
    with torch.no_grad():
        vae.quant_conv.bias[2:] = 100.0  # the logvar channels: clamped at 20 for every input
    x = images(2, 6)
    stochastic = pullgeom.spectrum(vae, x, k=3, backend="autograd")
    reference = dense_spectrum(vae, x, stochastic=False)[0]
    assert_matches_reference(stochastic, reference, 3)


def test_pythae_vae_encoder_and_decoder():
    models = pytest.importorskip("pythae.models")
    torch.manual_seed(0)
    model = models.VAE(models.VAEConfig(input_dim=(1, 3, 3), latent_dim=3)).double().eval()
    x = torch.rand(2, 1, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(7))

    def twin(x):  # pythae samples z = embedding + exp(log_covariance / 2) * eps
        out = model.encoder(x)
        return out["embedding"], out["log_covariance"]

    def twin_decoder(z):
        return model.decoder(z)["reconstruction"]

    reference = dense_spectrum(twin, x, decoder=twin_decoder, sigma="logvar")[0]
    for backend in ("autograd", "lanczos"):
        result = pullgeom.spectrum(model, x, k=3, decoder=model, backend=backend)
        assert_matches_reference(result, reference, 3)
    result = pullgeom.spectrum(model.encoder, x, k=3, decoder=model.decoder, backend="autograd")
    assert_matches_reference(result, reference, 3)
    # A deterministic pythae AE has no sigma: a clear refusal that names what it returned.
    ae = models.AE(models.AEConfig(input_dim=(1, 3, 3), latent_dim=3)).double().eval()
    with pytest.raises(ValueError, match=r"ModelOutput with keys \['embedding'\], which fits none"):
        pullgeom.spectrum(ae, x, k=2)


# ----------------------------------------------------------------------------------------
# Refusals.

class TupleOfThree(nn.Module):
    """A whole VAE's forward: (reconstruction, mu, logvar)."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(6, 4)

    def forward(self, x):
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return x, mu, logvar


def test_output_that_fits_no_convention_lists_the_accepted_ones():
    x = torch.randn(2, 6, dtype=torch.float64)
    with pytest.raises(ValueError) as error:
        pullgeom.spectrum(lambda x: x, x, k=1)
    for accepted in ("(mu, out2)", "Normal(mu, std)", "Independent(Normal(mu, std), n)", "latent_dist",
                     "'embedding' and 'log_covariance'"):
        assert accepted in str(error.value)
    assert "returned Tensor" in str(error.value)
    whole_vae = r"returned tuple.*fits none.*pass its encoder \(encoder=vae.encoder\)"
    with pytest.raises(ValueError, match=whole_vae):
        pullgeom.spectrum(TupleOfThree().double(), x, k=1)
    with pytest.raises(ValueError, match=r"decoder returned list, which fits none.*'reconstruction'"):
        pullgeom.spectrum(seeded_double(IndependentNormalEncoder(1), 0), x, k=1, decoder=lambda z: [z, z, z])


def test_mu_without_a_batch_dimension_is_refused():
    encoder = seeded_double(PythaeStyleEncoder(), 0)

    def unbatched(x):
        out = encoder(x)
        return {key: value.sum(0) for key, value in out.items()}

    with pytest.raises(ValueError, match=r"mu of shape \(2, 3\) for a batch of 3; its first dimension must"):
        pullgeom.spectrum(unbatched, torch.randn(3, 6, dtype=torch.float64), k=1)


def test_sigma_that_would_be_ignored_is_refused():
    """sigma= says what out2 of a (mu, out2) pair is: passing it with an encoder that carries its
    own sigma (and no decoder out2 to apply it to) is an error, not silently ignored."""
    encoder = seeded_double(IndependentNormalEncoder(1), 0)
    x = torch.randn(2, 6, dtype=torch.float64)
    for call in (lambda: pullgeom.spectrum(encoder, x, k=1, sigma="logvar"),
                 lambda: pullgeom.metric(encoder, x, sigma="std"),
                 lambda: pullgeom.entropy_estimate(encoder, x, sigma="softplus"),
                 lambda: pullgeom.spectrum(encoder, x, k=1, sigma="logvar", decoder=lambda z: z.sum(1))):
        with pytest.raises(ValueError, match="returns Independent, which gives sigma itself.*leave sigma"):
            call()
    pullgeom.spectrum(encoder, x, k=1)  # unset: fine
