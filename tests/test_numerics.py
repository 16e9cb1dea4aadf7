"""Numerical edge cases: dead units, rank below k, repeated and wide-ranging eigenvalues,
extreme input scales, and chunk_size bounding peak memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import pullgeom
from checks import assert_matches_reference, reference_top
from zoo import TwoHeadEncoder, seeded

BACKENDS = ["torch", "autograd"]


class LinearEncoder(nn.Module):
    """mu = W x, logvar = S x: no hidden layer, G = W^T W + S^T diag(sigma/2)^2 S exactly."""

    def __init__(self, mu_weight, s_weight):
        super().__init__()
        self.mu = nn.Linear(mu_weight.shape[1], mu_weight.shape[0], bias=False, dtype=mu_weight.dtype)
        self.s = nn.Linear(s_weight.shape[1], s_weight.shape[0], bias=False, dtype=s_weight.dtype)
        with torch.no_grad():
            self.mu.weight.copy_(mu_weight)
            self.s.weight.copy_(s_weight)

    def forward(self, x):
        return self.mu(x), self.s(x)


def orthonormal_rows(rows, cols, seed):
    q, _ = torch.linalg.qr(torch.randn(cols, rows, dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(seed)))
    return q.T


@pytest.mark.parametrize("backend", BACKENDS)
def test_saturated_tanh_gives_zero_spectrum_without_nan(backend):
    encoder = seeded(TwoHeadEncoder(6, (5,), 2, batchnorm=False), 0).double()
    with torch.no_grad():
        encoder.body[1].bias.fill_(1e3)  # every tanh unit saturated: act' == 0 exactly
    x = torch.randn(3, 6, dtype=torch.float64)
    result = pullgeom.spectrum(encoder, x, k=2, backend=backend)
    assert torch.equal(result.all_eigenvalues, torch.zeros_like(result.all_eigenvalues))
    assert torch.equal(result.eigenvectors, torch.zeros_like(result.eigenvectors))
    assert torch.equal(result.entropy, torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_far_below_k(backend):
    # ReLU with all but one unit dead: rank 1 (mu and sigma heads through one unit), k = 5.
    encoder = seeded(TwoHeadEncoder(8, (6,), 4, activation="relu", batchnorm=False), 1).double()
    with torch.no_grad():
        encoder.body[1].weight[1:].zero_()
        encoder.body[1].bias.copy_(torch.tensor([5.0, -1, -1, -1, -1, -1]))
    x = torch.randn(3, 8, dtype=torch.float64)
    result = pullgeom.spectrum(encoder, x, k=5, backend=backend)
    values, vectors = reference_top(encoder, x, 5)
    assert_matches_reference(result, values, vectors, rtol=1e-10, cos_min=1 - 1e-8)
    assert (result.eigenvalues[:, 1:].abs() <= 1e-12 * result.eigenvalues[:, :1]).all()
    assert not result.eigenvectors.isnan().any()
    torch.testing.assert_close(result.eigenvectors[:, 0].norm(dim=-1), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_eigenvalues_span_the_right_subspace(backend):
    # mu = W x with orthonormal rows, constant logvar: G = W^T W has eigenvalue 1, dz times.
    dz, n = 4, 9
    w = orthonormal_rows(dz, n, seed=2)
    encoder = LinearEncoder(w, torch.zeros(dz, n, dtype=torch.float64)).eval()
    x = torch.randn(2, n, dtype=torch.float64)
    result = pullgeom.spectrum(encoder, x, k=dz, backend=backend)
    torch.testing.assert_close(result.eigenvalues, torch.ones(2, dz, dtype=torch.float64))
    vectors = result.eigenvectors
    projector = vectors.transpose(1, 2) @ vectors
    torch.testing.assert_close(projector, (w.T @ w).expand(2, n, n), atol=1e-12, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eigenvalues_spanning_twelve_orders_of_magnitude(backend):
    dz, n = 7, 10
    scales = torch.logspace(0, -6, dz, dtype=torch.float64)  # eigenvalues 1 .. 1e-12
    w = scales[:, None] * orthonormal_rows(dz, n, seed=3)
    encoder = LinearEncoder(w, torch.zeros(dz, n, dtype=torch.float64)).eval()
    x = torch.randn(2, n, dtype=torch.float64)
    result = pullgeom.spectrum(encoder, x, k=dz, stochastic=False, backend=backend)
    expected = (scales**2).expand(2, dz)
    rel = ((result.eigenvalues - expected).abs() / expected).max().item()
    assert rel <= 1e-6, f"smallest eigenvalues lost: {rel:.2e} relative"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1e-6, 1e6])
def test_extreme_input_scales(backend, scale):
    encoder = seeded(TwoHeadEncoder(7, (6, 5), 2, activation="elu"), 4).double()
    x = torch.randn(3, 7, dtype=torch.float64) * scale
    # softplus keeps sigma finite at huge inputs, where exp(out2 / 2) would overflow.
    result = pullgeom.spectrum(encoder, x, k=2, backend=backend, sigma="softplus")
    values, vectors = reference_top(encoder, x, 2, sigma="softplus")
    assert torch.isfinite(result.all_eigenvalues).all()
    assert_matches_reference(result, values, vectors, rtol=1e-10, cos_min=1 - 1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_overflowing_sigma_is_a_clear_error(backend):
    encoder = seeded(TwoHeadEncoder(7, (6,), 2, activation="elu"), 4).double()
    x = torch.randn(3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 1e6
    with torch.no_grad():
        assert torch.isinf(torch.exp(0.5 * encoder(x)[1])).any(), "the test needs an overflowing sigma"
    with pytest.raises(ValueError, match="not finite.*overflow"):
        pullgeom.spectrum(encoder, x, k=2, backend=backend)


PEAK_SCRIPT = textwrap.dedent("""
    import json, os, sys, threading, time, torch, pullgeom
    from torch import nn
    torch.manual_seed(0)
    chunk = int(sys.argv[1])
    page = os.sysconf("SC_PAGE_SIZE")

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(784, 64), nn.Tanh())
            self.heads = nn.Linear(64, 64)
        def forward(self, x):
            return self.heads(self.body(x)).chunk(2, dim=1)

    encoder = Encoder().eval()
    x = torch.rand(2000, 784)
    pullgeom.spectrum(encoder, x[:2], k=1, backend="autograd")  # imports and first-call costs
    before, peak, done = rss(), [0], threading.Event()

    def watch():  # A lives for the whole chunk (hundreds of ms): 1 ms sampling sees it
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    pullgeom.spectrum(encoder, x, k=1, chunk_size=chunk, backend="autograd")
    done.set()
    watcher.join()
    print(json.dumps({"growth_mb": (peak[0] - before) / 2**20}))
""")


def peak_growth_mb(chunk: int) -> float:
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(chunk)], capture_output=True, text=True,
                         check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])["growth_mb"]


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="resident memory is read from /proc")
def test_chunk_size_bounds_peak_memory():
    # The autograd backend materialises A per chunk: 2000 x 64 x 784 float32 = 400 MB at once,
    # 40 MB in chunks of 200. Resident memory is sampled during the call, relative to just before.
    small = peak_growth_mb(200)
    whole = peak_growth_mb(2000)
    assert whole > 350, f"the unchunked call peaked only {whole:.0f} MB above its start: not measuring A"
    assert small < 150, f"chunk_size=200 still grew resident memory by {small:.0f} MB"


WHOLE_TEST_SET_SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch, pullgeom
    from pullgeom.models import PaperEncoder
    torch.manual_seed(0)
    encoder = PaperEncoder().eval()
    x = torch.rand(10_000, 1, 28, 28)
    result = pullgeom.spectrum(encoder, x, k=5, backend=sys.argv[1])
    finite = bool(torch.isfinite(result.all_eigenvalues).all() and torch.isfinite(result.eigenvectors).all())
    # ru_maxrss is in KiB on Linux: the whole process's peak, torch and the outputs included.
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mb": peak_mb, "finite": finite, "backend": result.backend}))
""")


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_whole_mnist_test_set_fits_in_two_gigabytes(backend):
    """B = 10,000 paper-encoder spectra (k = 5 plus the full spectrum) with the default chunk
    size: the issue's CPU memory target is a process peak under 2 GB."""
    out = subprocess.run([sys.executable, "-c", WHOLE_TEST_SET_SCRIPT, backend], capture_output=True,
                         text=True, check=True, timeout=600)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["backend"] == backend and report["finite"]
    assert report["peak_mb"] < 2048, f"{backend}: peak resident memory {report['peak_mb']:.0f} MB"
