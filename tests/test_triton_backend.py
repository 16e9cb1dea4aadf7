"""pullgeom.spectrum(..., backend="triton") against the float64 dense reference.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1 while this module
defines them and during its tests only, so other modules' ``auto`` choices are unchanged).
"""

from __future__ import annotations


import pytest
import torch
import torch.nn as nn

pytest.importorskip("triton", reason="the triton backend needs triton (installed in CI)")

from triton_env import DEVICE, INTERPRET, load_triton_ops  # noqa: E402

load_triton_ops()

import pullgeom  # noqa: E402
from pullgeom.backends import BACKENDS, REGISTRY  # noqa: E402
from pullgeom.reference import dense_metric, dense_spectrum  # noqa: E402


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    if INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


class Encoder(nn.Module):
    def __init__(self, n: int, hidden: list[int], dz: int, act: type[nn.Module], batchnorm: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip([n] + hidden[:-1], hidden, strict=True):
            norm = [nn.BatchNorm1d(fan_out)] if batchnorm else []
            layers += [nn.Linear(fan_in, fan_out), *norm, act()]
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.Linear(hidden[-1], 2 * dz)

    def forward(self, x):
        mu, logvar = self.heads(self.trunk(x.flatten(1))).chunk(2, dim=-1)
        return mu, logvar


def make_encoder(seed: int, n: int, hidden: list[int], dz: int, act=nn.Tanh, batchnorm=False) -> nn.Module:
    torch.manual_seed(seed)
    encoder = Encoder(n, hidden, dz, act, batchnorm)
    for module in encoder.modules():
        if isinstance(module, nn.BatchNorm1d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    return encoder.eval()


def check_against_dense(result, values64, vectors64, k: int, rtol: float) -> None:
    """Top-k eigenvalues to ``rtol`` relative, the whole nonzero spectrum to ``rtol`` of
    lambda_1, eigenvectors |cos| >= 0.999 where the relative gap to the neighbours is >= 1e-2."""
    r = result.all_eigenvalues.shape[1]
    lam = values64[:, :r]
    top = (result.eigenvalues.double().cpu() - lam[:, :k]).abs() / lam[:, :k]
    assert top.max() <= rtol, f"top-{k} eigenvalues off by {top.max():.3e} relative"
    spread = (result.all_eigenvalues.double().cpu() - lam).abs() / lam[:, :1]
    assert spread.max() <= 10 * rtol, f"nonzero spectrum off by {spread.max():.3e} of lambda_1"
    padded = torch.cat([lam[:, :1] * 1e30, values64[:, : k + 1]], dim=1)
    gap = torch.minimum(padded[:, :-2] - padded[:, 1:-1], padded[:, 1:-1] - padded[:, 2:]) / lam[:, :1]
    vectors = result.eigenvectors.reshape(result.eigenvectors.shape[0], k, -1).double().cpu()
    cosines = (vectors * vectors64[:, :, :k].transpose(1, 2)).sum(-1).abs()
    separated = gap >= 1e-2
    assert separated.any(), "the test spectrum has no separated eigenvalue to check vectors on"
    assert (cosines[separated] >= 0.999).all(), f"min |cos| {cosines[separated].min():.6f}"


CASES = [  # seed, input shape, hidden widths, dz, activation, batchnorm
    (0, (3, 5), [9, 7], 3, nn.Tanh, True),        # 2dz = 6 < widths, image-shaped input
    (1, (11,), [8, 6, 5], 4, nn.SiLU, False),     # 2dz = 8 > w_L = 5: rows compressed
    (2, (13,), [6], 4, nn.ELU, False),            # one hidden layer, 2dz = 8 > w_1 = 6
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"seed{c[0]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spectrum_matches_dense_reference(case, dtype):
    seed, shape, hidden, dz, act, bn = case
    encoder = make_encoder(seed, int(torch.tensor(shape).prod()), hidden, dz, act, bn).to(dtype)
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(seed + 10), dtype=dtype)
    k = 3
    result = pullgeom.spectrum(encoder.to(DEVICE), x.to(DEVICE), k=k, backend="triton")
    assert result.backend == "triton"
    assert result.eigenvectors.shape == (4, k, *shape)
    values64, vectors64 = dense_spectrum(encoder.cpu(), x)
    check_against_dense(result, values64, vectors64, k, 1e-4 if dtype == torch.float32 else 1e-9)


def test_spectrum_with_decoder_matches_dense_reference():
    encoder = make_encoder(3, 10, [8, 7], 3)
    torch.manual_seed(4)
    decoder = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 10)).eval()
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(5))
    result = pullgeom.spectrum(encoder.to(DEVICE), x.to(DEVICE), k=2, decoder=decoder.to(DEVICE),
                               backend="triton")
    values64, vectors64 = dense_spectrum(encoder.cpu(), x, decoder=decoder.cpu())
    check_against_dense(result, values64, vectors64, 2, 1e-4)


def test_spectrum_deterministic_mean_only():
    encoder = make_encoder(6, 9, [7, 5], 3, nn.GELU)
    x = torch.randn(3, 9, generator=torch.Generator().manual_seed(6))
    first = pullgeom.spectrum(encoder.to(DEVICE), x.to(DEVICE), k=2, stochastic=False, backend="triton")
    again = pullgeom.spectrum(encoder.to(DEVICE), x.to(DEVICE), k=2, stochastic=False, backend="triton")
    assert torch.equal(first.eigenvalues, again.eigenvalues)
    assert torch.equal(first.eigenvectors, again.eigenvectors)
    values64, vectors64 = dense_spectrum(encoder.cpu(), x, stochastic=False)
    check_against_dense(first, values64, vectors64, 2, 1e-4)


def test_spectrum_zero_size_batch():
    encoder = make_encoder(9, 7, [6, 5], 2).to(DEVICE)
    result = pullgeom.spectrum(encoder, torch.zeros(0, 7, device=DEVICE), k=2, backend="triton")
    assert result.eigenvalues.shape == (0, 2) and result.eigenvectors.shape == (0, 2, 7)
    assert result.all_eigenvalues.shape == (0, 4)


def test_metric_factor_reproduces_dense_metric():
    encoder = make_encoder(7, 8, [6, 6], 2, nn.Softplus)
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    metric = pullgeom.metric(encoder.double().to(DEVICE), x.to(DEVICE), backend="triton")
    expected = dense_metric(encoder.cpu(), x)
    torch.testing.assert_close(metric.dense().cpu(), expected, rtol=1e-10, atol=1e-12)


def test_eigh_above_kernel_cap_falls_back_to_torch():
    gen = torch.Generator().manual_seed(12)
    a = torch.randn(1, 257, 257, generator=gen, dtype=torch.float64)
    gram = (a @ a.transpose(1, 2)).to(DEVICE)
    values, vectors = REGISTRY["triton"].eigh(gram)
    expected = torch.linalg.eigvalsh(gram.cpu()).flip(-1)
    torch.testing.assert_close(values.cpu(), expected, rtol=1e-10, atol=1e-8)
    residual = gram @ vectors - vectors * values.unsqueeze(1)
    assert residual.norm(dim=1).max() <= 1e-8 * expected[0, 0]


def test_unavailable_without_interpreter_or_cuda(monkeypatch):
    backend = REGISTRY["triton"]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET" in backend.unavailable_reason(torch.device("cpu"))
    assert "CUDA" in backend.unavailable_reason(torch.device("meta"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.unavailable_reason(torch.device("cpu")) is None
    encoder = make_encoder(8, 6, [5], 2)
    monkeypatch.delenv("TRITON_INTERPRET")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            pullgeom.spectrum(encoder, torch.randn(2, 6), k=1, backend="triton")


def test_unsupported_encoders_are_refused_with_a_reason():
    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(1, 2, 3)

        def forward(self, x):
            h = self.conv(x.unsqueeze(1)).flatten(1)
            return h[:, :2], h[:, 2:4]

    with pytest.raises(ValueError, match="not a recognised MLP"):
        pullgeom.spectrum(Conv().eval().to(DEVICE), torch.randn(2, 6, device=DEVICE), k=1, backend="triton")

    class Linear(nn.Module):
        def __init__(self):
            super().__init__()
            self.mu, self.logvar = nn.Linear(6, 2), nn.Linear(6, 2)

        def forward(self, x):
            return self.mu(x), self.logvar(x)

    with pytest.raises(ValueError, match="no hidden layer"):
        pullgeom.spectrum(Linear().eval().to(DEVICE), torch.randn(2, 6, device=DEVICE), k=1, backend="triton")


def test_auto_order_places_triton_between_cuda_and_cpp():
    auto_order = [backend.name for backend in BACKENDS if backend.auto_candidate]
    assert auto_order == ["cuda", "triton", "cpp", "torch", "autograd"]
