"""Backends ``cpp`` and ``cuda`` (pullgeom.backends.cpp_cuda_backends), auto-by-measurement, and a
torch.compile(fullgraph=True) trace through the native ops."""

from __future__ import annotations

import pytest
import torch

import pullgeom
from checks import assert_matches_reference, reference_top
from pullgeom.kernels import native as ops
from pullgeom.backends import BACKENDS, REGISTRY, autotune
from zoo import ChunkHeadEncoder, ConvEncoder, MLPDecoder, TwoHeadEncoder, seeded

needs_extension = pytest.mark.skipif(ops.EXTENSION_ERROR is not None, reason=str(ops.EXTENSION_ERROR))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and ops.extension_with_cuda() else [])
BACKEND_OF = {"cpu": "cpp", "cuda": "cuda"}
# What auto chooses among, in its preference order (BACKENDS is ordered; lanczos is no candidate).
AUTO_ORDER = [backend.name for backend in BACKENDS if backend.auto_candidate]


def inputs(batch, *shape, seed=0, dtype=torch.float64):
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


ARCHITECTURES = [
    # (name, n_in, widths, dz, activation, batchnorm)
    ("tanh-bn", 11, (9, 7), 3, "tanh", True),
    ("relu", 10, (8, 8), 2, "relu", False),
    ("leaky", 9, (7,), 3, "leaky_relu", True),
    ("elu-deep", 8, (6, 5, 6), 2, "elu", True),
    ("gelu", 7, (9,), 3, "gelu", False),
    ("gelu-tanh", 7, (5, 6), 2, "gelu_tanh", True),
    ("silu", 10, (6,), 4, "silu", True),
    ("sigmoid", 9, (8, 4), 3, "sigmoid", False),
    ("softplus", 8, (7,), 3, "softplus", True),
    ("narrow-middle", 13, (10, 2, 10), 4, "tanh", True),
    ("wide-heads", 6, (9,), 5, "tanh", False),
    ("paper-shape-small", 20, (12, 12, 16, 4), 4, "tanh", True),
]


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stochastic", [True, False])
@pytest.mark.parametrize("arch", ARCHITECTURES, ids=[a[0] for a in ARCHITECTURES])
def test_matches_dense_reference(arch, stochastic, device):
    _, n_in, widths, dz, activation, batchnorm = arch
    encoder = seeded(TwoHeadEncoder(n_in, widths, dz, activation, batchnorm), 1).double()
    x = inputs(4, n_in)
    rank = min((2 if stochastic else 1) * dz, n_in, *widths)
    k = min(3, rank)
    values, vectors = reference_top(encoder, x, k, stochastic=stochastic)
    for dtype, rtol, cos_min in ((torch.float64, 1e-10, 1 - 1e-8), (torch.float32, 1e-4, 0.999)):
        result = pullgeom.spectrum(encoder.to(device, dtype), x.to(device, dtype), k=k,
                                   stochastic=stochastic, backend=BACKEND_OF[device])
        assert result.backend == BACKEND_OF[device] and result.all_eigenvalues.shape[1] == rank
        assert_matches_reference(result.__class__(**{
            name: value.cpu() if isinstance(value, torch.Tensor) else value
            for name, value in vars(result).items()}), values, vectors, rtol=rtol, cos_min=cos_min)


@needs_extension
@pytest.mark.parametrize("gaussian_decoder", [False, True])
def test_decoder_metric(gaussian_decoder):
    encoder = seeded(TwoHeadEncoder(9, (8, 6), 3), 3).double()
    decoder = seeded(MLPDecoder(3, 7, 5, gaussian=gaussian_decoder), 4).double().eval()
    x = inputs(3, 9, seed=2)
    result = pullgeom.spectrum(encoder, x, k=3, decoder=decoder, backend="cpp")
    values, vectors = reference_top(encoder, x, 3, decoder=decoder)
    assert_matches_reference(result, values, vectors, rtol=1e-10, cos_min=1 - 1e-8)


@needs_extension
@pytest.mark.parametrize("split", [False, True])
def test_chunked_head_and_image_inputs(split):
    encoder = seeded(ChunkHeadEncoder(12, 7, 3, split=split), 5).double()
    x = inputs(3, 1, 3, 4, seed=3)
    result = pullgeom.spectrum(encoder, x, k=2, backend="cpp", chunk_size=2)
    values, vectors = reference_top(encoder, x, 2)
    assert_matches_reference(result, values, vectors, rtol=1e-10, cos_min=1 - 1e-8)
    assert result.eigenvectors.shape == (3, 2, 1, 3, 4)


@needs_extension
def test_metric_factor_matches_torch_backend():
    encoder = seeded(TwoHeadEncoder(10, (7, 5), 3), 6).double()
    x = inputs(4, 10, seed=4)
    native = pullgeom.metric(encoder, x, backend="cpp")
    plain = pullgeom.metric(encoder, x, backend="torch")
    torch.testing.assert_close(native.dense(), plain.dense(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.linalg.eigvalsh(native.gram()), torch.linalg.eigvalsh(plain.gram()))


@needs_extension
def test_zero_size_batch():
    encoder = seeded(TwoHeadEncoder(6, (5,), 2), 7).double()
    result = pullgeom.spectrum(encoder, inputs(0, 6), k=2, backend="cpp")
    assert result.eigenvalues.shape == (0, 2) and result.eigenvectors.shape == (0, 2, 6)


def test_unsupported_and_unavailable_reasons():
    encoder = seeded(ConvEncoder(), 8).double()
    with pytest.raises(ValueError, match="backend 'cpp' cannot serve this call: .*not a recognised MLP"):
        pullgeom.spectrum(encoder, inputs(2, 1, 6, 6), k=2, backend="cpp")
    reason = REGISTRY["cuda"].unavailable_reason(torch.device("cpu"))
    assert reason is not None and "cuda" in reason


@needs_extension
def test_extension_built_for_another_torch_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "1.0.0")
    reason = ops._torch_mismatch(ops._extension)
    assert reason is not None and "built against torch" in reason and "pip install" in reason


@needs_extension
def test_auto_measures_and_caches_the_winner(monkeypatch):
    monkeypatch.setenv("PULLGEOM_AUTOTUNE", "1")
    encoder = seeded(TwoHeadEncoder(15, (11, 9), 3), 9).double()
    x = inputs(5, 15, seed=5)
    result = pullgeom.spectrum(encoder, x, k=2)
    winners = [name for key, name in autotune.measured_winners().items() if key[3] == (15,)]
    assert winners == [result.backend]
    available = [name for name in AUTO_ORDER if REGISTRY[name].unavailable_reason(x.device) is None]
    assert result.backend in available
    reference = pullgeom.spectrum(encoder, x, k=2, backend="torch")
    torch.testing.assert_close(result.all_eigenvalues, reference.all_eigenvalues)


@needs_extension
def test_auto_without_measurement_takes_the_preference_order(monkeypatch):
    monkeypatch.setenv("PULLGEOM_AUTOTUNE", "0")
    encoder = seeded(TwoHeadEncoder(14, (6,), 2), 10).double()
    assert AUTO_ORDER.index("cpp") < AUTO_ORDER.index("torch") < AUTO_ORDER.index("autograd")
    # On CPU tensors cpp heads the order (Triton there is only its interpreter, which auto skips).
    assert pullgeom.spectrum(encoder, inputs(2, 14), k=1).backend == "cpp"


@needs_extension
def test_torch_compile_fullgraph_through_the_ops():
    """The ops alone trace with fullgraph=True (fake kernels give the shapes); test_compile.py
    compiles them inside pullgeom.spectrum."""
    encoder = seeded(TwoHeadEncoder(10, (8, 6), 3), 11).double()
    with torch.no_grad():
        plan = pullgeom.tracing.mlp_plan.trace_plan(encoder)
    first = plan.layers[0].weight

    def top_eigenvalues(x):
        left, gram = ops.plan_gram(plan, x)
        values, vectors = ops.sym_eigh(gram)
        top, _, residuals, _ = ops.lanczos_topk(gram, 2)
        return values, top, residuals, left @ first

    x = inputs(4, 10, seed=6)
    compiled = torch.compile(top_eigenvalues, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    expected = top_eigenvalues(x)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(got[1], got[0][:, :2])
