"""The public API: shapes, the factored metric, scores, and a clear error for every bad input."""

from __future__ import annotations

import importlib
import math
import warnings
import weakref

import pytest
import torch
import torch.nn as nn

import pullgeom
from pullgeom.reference import dense_metric, dense_spectrum
from pullgeom.spectral_scores import von_neumann_entropy
from zoo import ConvEncoder, MLPDecoder, TwoHeadEncoder, seeded


@pytest.fixture
def encoder():
    return seeded(TwoHeadEncoder(10, (8, 6), 3), 0).double()


@pytest.fixture
def x():
    return torch.randn(5, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def test_spectrum_fields_and_shapes(encoder, x):
    result = pullgeom.spectrum(encoder, x, k=3)
    assert result.eigenvalues.shape == (5, 3)
    assert result.eigenvectors.shape == (5, 3, 10)
    assert result.all_eigenvalues.shape == (5, 6)
    assert result.spectral_radius.shape == (5,) and result.entropy.shape == (5,)
    assert result.backend in {"torch", "cpp"}  # auto times the MLP backends and keeps the faster
    assert (result.eigenvalues[:, :-1] >= result.eigenvalues[:, 1:]).all()
    torch.testing.assert_close(result.spectral_radius, result.eigenvalues[:, 0])
    torch.testing.assert_close(result.eigenvectors.norm(dim=-1), torch.ones(5, 3, dtype=torch.float64))


def test_eigenvector_signs_are_canonical_and_deterministic(encoder, x):
    first = pullgeom.spectrum(encoder, x, k=3)
    second = pullgeom.spectrum(encoder, x.clone(), k=3)
    assert torch.equal(first.eigenvectors, second.eigenvectors)
    flat = first.eigenvectors.reshape(-1, 10)
    pivots = flat.gather(1, flat.abs().argmax(dim=1, keepdim=True))
    assert (pivots > 0).all()


def test_metric_factor_gram_matvec_dense(encoder, x):
    reference = dense_metric(encoder, x)
    for backend in ("torch", "autograd"):
        metric = pullgeom.metric(encoder, x, backend=backend)
        torch.testing.assert_close(metric.dense(), reference, rtol=1e-10, atol=1e-12)
        v = torch.randn(5, 10, dtype=torch.float64)
        torch.testing.assert_close(metric.matvec(v), (reference @ v.unsqueeze(-1)).squeeze(-1),
                                   rtol=1e-10, atol=1e-12)
        gram_values = torch.linalg.eigvalsh(metric.gram()).flip(-1)
        dense_values = torch.linalg.eigvalsh(reference).flip(-1)[:, : gram_values.shape[1]]
        torch.testing.assert_close(gram_values, dense_values, rtol=1e-9, atol=1e-12)


def test_metric_with_decoder_matches_dense(encoder, x):
    decoder = seeded(MLPDecoder(3, 5, 10), 1).double()
    reference = dense_metric(encoder, x, decoder=decoder)
    metric = pullgeom.metric(encoder, x, decoder=decoder, chunk_size=2)
    torch.testing.assert_close(metric.dense(), reference, rtol=1e-9, atol=1e-12)


def test_entropy_conventions_by_hand():
    isotropic = torch.tensor([[2.0, 2.0, 2.0, 2.0]], dtype=torch.float64)
    assert von_neumann_entropy(isotropic, "max").item() == 0.0
    assert math.isclose(von_neumann_entropy(isotropic, "trace").item(), math.log(4), rel_tol=1e-12)
    spectrum = torch.tensor([[4.0, 1.0, 0.0, -1e-18]], dtype=torch.float64)
    expected_max = -(0.25 * math.log(0.25))  # p = (1, 0.25, 0, 0)
    expected_trace = -(0.8 * math.log(0.8) + 0.2 * math.log(0.2))
    assert math.isclose(von_neumann_entropy(spectrum, "max").item(), expected_max, rel_tol=1e-12)
    assert math.isclose(von_neumann_entropy(spectrum, "trace").item(), expected_trace, rel_tol=1e-12)
    assert von_neumann_entropy(torch.zeros(1, 3), "max").item() == 0.0


def test_scores_from_every_source(encoder, x):
    result = pullgeom.spectrum(encoder, x, k=2, entropy_norm="trace")
    from_spectrum = pullgeom.scores(result, entropy_norm="trace")
    from_encoder = pullgeom.scores(encoder, x, entropy_norm="trace")
    from_values = pullgeom.scores(result.all_eigenvalues, entropy_norm="trace")
    for s in (from_spectrum, from_encoder, from_values):
        torch.testing.assert_close(s.entropy, result.entropy)
        torch.testing.assert_close(s.spectral_radius, result.spectral_radius)
    lam = result.all_eigenvalues
    torch.testing.assert_close(from_spectrum.trace, lam.sum(-1))
    torch.testing.assert_close(from_spectrum.log_det, lam.log().sum(-1))
    assert (from_spectrum.rank == 6).all()


def require_backend(backend: str, monkeypatch) -> None:
    """Skip unless ``backend`` runs here; triton runs on CPU under its interpreter (as in CI)."""
    reason = {info.name: info.reason for info in pullgeom.list_backends()}[backend]
    if backend == "triton":
        pytest.importorskip("triton", reason="the triton backend needs triton (installed in CI)")
        from triton_env import INTERPRET, load_triton_ops

        load_triton_ops()
        if INTERPRET:
            monkeypatch.setenv("TRITON_INTERPRET", "1")
            reason = ""
    if reason:
        pytest.skip(f"backend {backend!r} is not available here: {reason}")


EVERY_BACKEND = ["auto", "torch", "cpp", "autograd", "lanczos", "triton"]


@pytest.mark.parametrize("backend", EVERY_BACKEND)
def test_empty_batch_gives_empty_spectrum_and_metric(encoder, backend, monkeypatch):
    if backend != "auto":
        require_backend(backend, monkeypatch)
    decoder = seeded(MLPDecoder(3, 5, 10), 1).double()
    empty = torch.zeros(0, 10, dtype=torch.float64)
    for kwargs in ({}, {"decoder": decoder}, {"stochastic": False, "chunk_size": 3}):
        r = 3 if kwargs.get("stochastic") is False else 6
        result = pullgeom.spectrum(encoder, empty, k=2, backend=backend, **kwargs)
        assert result.eigenvalues.shape == (0, 2) and result.eigenvectors.shape == (0, 2, 10)
        assert result.all_eigenvalues.shape == (0, r) and result.entropy.shape == (0,)
        assert result.spectral_radius.shape == (0,) and result.complete.shape == (0,)
        assert pullgeom.scores(result).trace.shape == (0,)
        metric = pullgeom.metric(encoder, empty, backend=backend, **kwargs)
        assert metric.gram().shape == (0, r, r) and metric.dense().shape == (0, 10, 10)
        assert metric.matvec(empty).shape == (0, 10)
        assert metric.backend == result.backend


@pytest.mark.parametrize("backend", ["auto", "autograd", "lanczos"])
def test_empty_batch_of_images_on_a_conv_encoder(backend):
    encoder = seeded(ConvEncoder(side=5), 6).double()
    empty = torch.zeros(0, 1, 5, 5, dtype=torch.float64)
    result = pullgeom.spectrum(encoder, empty, k=2, backend=backend)
    assert result.eigenvectors.shape == (0, 2, 1, 5, 5) and result.all_eigenvalues.shape == (0, 6)
    metric = pullgeom.metric(encoder, empty, backend=backend)
    assert metric.gram().shape == (0, 6, 6) and metric.matvec(empty).shape == (0, 1, 5, 5)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(half):
    """Against the float64 dense reference of the same (rounded) inputs: a float32 computation
    keeps the top-k within the float32 parity tolerance (1e-4 of lambda_1), which a float16 one
    (unit round-off 5e-4, squared into G) would not."""
    from checks import assert_matches_reference, reference_top

    encoder = seeded(TwoHeadEncoder(10, (8,), 2), 2)
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(5)).to(half)
    result = pullgeom.spectrum(encoder, x, k=2)
    assert result.eigenvalues.dtype == torch.float32 and result.eigenvectors.dtype == torch.float32
    encoder64 = seeded(TwoHeadEncoder(10, (8,), 2), 2).double()
    values, vectors = reference_top(encoder64, x.double(), 2)
    assert_matches_reference(result, values, vectors, rtol=1e-4, cos_min=0.999)


def test_backends_listing_says_why_not():
    infos = {info.name: info for info in pullgeom.list_backends()}
    assert infos["torch"].available and infos["autograd"].available
    for info in infos.values():
        assert info.available == (info.reason == "")


BAD_INPUTS = [
    ("nan", dict(x=lambda x: x.index_fill(0, torch.tensor([2]), float("nan"))), "NaN or inf.*index 2"),
    ("inf", dict(x=lambda x: x.index_fill(0, torch.tensor([0]), float("inf"))), "NaN or inf"),
    ("shape", dict(x=lambda x: x[:, :7]), "encoder rejected x of shape"),
    ("no batch dim", dict(x=lambda x: x[0]), "pass a batch"),
    ("integer", dict(x=lambda x: x.long()), "floating-point"),
    ("meta x", dict(x=lambda x: x.to("meta")), "x is on the meta device"),
    ("k zero", dict(k=0), "at least one"),
    ("k too big", dict(k=7), "k=7 exceeds r=6"),
    ("sigma", dict(sigma="variance"), "sigma='variance'"),
    ("entropy", dict(entropy_norm="shannon"), "entropy_norm='shannon'"),
    ("backend", dict(backend="fortran"), "backend='fortran' is unknown"),
    ("chunk", dict(chunk_size=0), "chunk_size"),
    ("decoder size", dict(decoder=lambda: seeded(MLPDecoder(4, 5, 10), 3).double()), "latents of size dz=3"),
]


@pytest.mark.parametrize("name, change, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_a_clear_error(encoder, x, name, change, message):
    kwargs = {"k": 2}
    for key, value in change.items():
        kwargs[key] = value(x) if key == "x" else (value() if callable(value) else value)
    inputs = kwargs.pop("x", x)
    with pytest.raises(ValueError, match=message):
        pullgeom.spectrum(encoder, inputs, **kwargs)


@pytest.mark.parametrize("moved", ["encoder", "decoder"])
@pytest.mark.parametrize("call", ["spectrum", "metric"])
def test_model_on_another_device_than_x_is_refused(encoder, x, moved, call):
    """'meta' is a real second device on a CPU-only machine: parameters there hold no data."""
    models = {"encoder": encoder, "decoder": seeded(MLPDecoder(3, 5, 10), 1).double()}
    models[moved] = models[moved].to("meta")
    message = rf"the {moved}'s \S+ is on meta but x is on cpu; .*{moved}.to\('cpu'\) or x.to\('meta'\)"
    with pytest.raises(ValueError, match=message):
        getattr(pullgeom, call)(models["encoder"], x, decoder=models["decoder"])


def assert_same_spectrum(got, expected):
    """Equal up to float64 round-off: a transposed x takes another BLAS path (measured: the
    eigenvalues differ in the last bit or two), so bit equality is not promised."""
    scale = expected.eigenvalues[:, :1].abs().max().item()
    assert torch.equal(got.complete, expected.complete)
    for field in ("eigenvalues", "all_eigenvalues", "entropy"):  # entropy: NaN where not complete
        torch.testing.assert_close(getattr(got, field), getattr(expected, field), rtol=1e-12,
                                   atol=1e-13 * scale, equal_nan=True, msg=lambda m, f=field: f"{f}: {m}")
    torch.testing.assert_close(got.eigenvectors, expected.eigenvectors, rtol=0, atol=1e-10)


NON_CONTIGUOUS = {
    "transposed": lambda x: x.T.contiguous().T,  # strides (1, B)
    "strided": lambda x: x.repeat_interleave(3, dim=1)[:, ::3],  # every third column of a wider tensor
    "expanded": lambda x: x[:1].expand(x.shape),  # stride 0 over the batch: one sample B times
}


@pytest.mark.parametrize("backend", ["torch", "cpp", "autograd", "lanczos", "triton"])
def test_non_contiguous_x_gives_the_results_of_its_contiguous_copy(encoder, x, backend, monkeypatch):
    require_backend(backend, monkeypatch)
    for layout, make in NON_CONTIGUOUS.items():
        strided = make(x[:2])  # two samples: Triton's interpreter costs ~0.2 s a sample
        assert not strided.is_contiguous()
        try:
            assert_same_spectrum(pullgeom.spectrum(encoder, strided, k=3, backend=backend),
                                 pullgeom.spectrum(encoder, strided.contiguous(), k=3, backend=backend))
        except AssertionError as error:
            raise AssertionError(f"{backend}, {layout} x: {error}") from None


@pytest.mark.parametrize("backend", ["autograd", "lanczos"])
def test_non_contiguous_images_give_the_results_of_their_contiguous_copy(backend):
    """The conv encoder's path (no layer plan): images stored column-major, and crops."""
    encoder = seeded(ConvEncoder(side=5), 6).double()
    images = torch.randn(3, 1, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    column_major = images[:, :, :5, :5].transpose(2, 3).contiguous().transpose(2, 3)
    for strided in (column_major, images[:, :, 1:6, 2:7]):
        assert not strided.is_contiguous()
        assert_same_spectrum(pullgeom.spectrum(encoder, strided, k=2, backend=backend),
                             pullgeom.spectrum(encoder, strided.contiguous(), k=2, backend=backend))


def test_training_mode_encoder_is_refused(x):
    encoder = TwoHeadEncoder(10, (8,), 3).double().train()
    with pytest.raises(ValueError, match=r"training mode.*call encoder.eval\(\)"):
        pullgeom.spectrum(encoder, x, k=2)


@pytest.mark.parametrize("role", ["encoder", "decoder"])
def test_batchnorm_without_running_statistics_is_refused_in_eval_mode(x, role):
    """track_running_stats=False: eval-mode BatchNorm still normalises with the batch's statistics."""
    encoder = seeded(TwoHeadEncoder(10, (8,), 3), 0).double()
    decoder = seeded(MLPDecoder(3, 5, 10), 1).double()
    model = encoder if role == "encoder" else decoder
    model.extra = torch.nn.BatchNorm1d(4, track_running_stats=False).double()  # found by named_modules
    encoder.eval(), decoder.eval()
    with torch.no_grad():  # the hazard is real: a sample's normalised value depends on the others
        batch = torch.randn(3, 4, dtype=torch.float64)
        assert not torch.allclose(model.extra(batch)[:1], model.extra(batch[:2])[:1])
    message = rf"the {role}'s BatchNorm1d 'extra' has no running statistics \(track_running_stats=False\)"
    for call in (pullgeom.spectrum, pullgeom.metric):
        with pytest.raises(ValueError, match=message):
            call(encoder, x, decoder=decoder)


def test_per_sample_normalisation_in_eval_mode_is_accepted(x):
    """InstanceNorm without running statistics and LayerNorm are per sample: not refused."""
    class Normalised(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = seeded(TwoHeadEncoder(10, (8,), 3), 0)
            self.norm = torch.nn.LayerNorm(10)
            self.instance = torch.nn.InstanceNorm1d(1)  # track_running_stats=False by default

        def forward(self, x):
            return self.inner(self.instance(self.norm(x).unsqueeze(1)).squeeze(1))

    encoder = Normalised().double().eval()
    result = pullgeom.spectrum(encoder, x, k=2)
    values, _ = torch.linalg.eigh(dense_metric(encoder, x))
    torch.testing.assert_close(result.eigenvalues, values.flip(-1)[:, :2], rtol=1e-9, atol=1e-12)


def test_dtype_mismatch_is_refused(x):
    with pytest.raises(ValueError, match=r"the encoder's \S+ is torch.float32 but the computation is torch.float64"):
        pullgeom.spectrum(seeded(TwoHeadEncoder(10, (8,), 3), 4), x, k=2)
    mixed = seeded(TwoHeadEncoder(10, (8,), 3), 4).double()
    head = list(mixed.named_parameters())[-1][0].split(".")[0]
    getattr(mixed, head).float()  # only the last layer left in float32
    with pytest.raises(ValueError, match=rf"the encoder's {head}\.weight is torch.float32"):
        pullgeom.spectrum(mixed.eval(), x, k=2)


def test_forced_backend_that_cannot_serve_names_the_reason():
    encoder = seeded(ConvEncoder(side=4), 5)
    with pytest.raises(ValueError, match="backend 'torch' cannot serve.*Conv2d"):
        pullgeom.spectrum(encoder, torch.randn(2, 1, 4, 4), k=1, backend="torch")


class RunsOutOfMemoryAbove(torch.nn.Module):
    """Raises the real torch.OutOfMemoryError for batches above ``limit``, as a GPU would.

    A stand-in for CUDA: this CPU machine cannot run out of GPU memory, so the encoder raises the
    exception itself, after allocating a scratch tensor whose lifetime ``scratch`` records
    (weak references: the traceback of the failure holds the tensor while the exception lives).
    """

    def __init__(self, inner, limit):
        super().__init__()
        self.inner, self.limit, self.batches, self.scratch = inner, limit, [], []

    def forward(self, x):
        self.batches.append(x.shape[0])
        if x.shape[0] > self.limit:
            scratch = torch.empty(x.shape[0], 1000)
            self.scratch.append(weakref.ref(scratch))
            raise torch.OutOfMemoryError("simulated allocation failure")
        return self.inner(x)


def computed_batches(wrapped) -> list[int]:
    return [b for b in wrapped.batches if isinstance(b, int)]  # torch.fx's trace records a Proxy


@pytest.mark.parametrize("chunk_size, failed, retried", [(None, 7, [3, 3, 1]), (20, 7, [3, 3, 1]),
                                                         (5, 5, [2, 2, 2, 1])])
def test_out_of_memory_retries_once_with_half_the_failing_chunk(encoder, caplog, monkeypatch, chunk_size,
                                                                 failed, retried):
    """The retry halves the chunk that failed, not chunk_size: with chunk_size None (one chunk of
    B = 7 here) or 20, halving chunk_size would retry the same 7 samples. The real
    torch.cuda.empty_cache cannot run on CPU, so a spy stands in for the release and checks that
    the failed chunk's tensors are already freed when it is called."""
    x = torch.randn(7, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    wrapped = RunsOutOfMemoryAbove(encoder, limit=4)  # the 4-sample input probe fits
    alive_at_release = []
    monkeypatch.setattr(pullgeom.api, "_release_cached_memory", lambda device: alive_at_release.append(
        [ref() is not None for ref in wrapped.scratch]))
    with caplog.at_level("WARNING", logger="pullgeom"):
        result = pullgeom.spectrum(wrapped, x, k=2, chunk_size=chunk_size, backend="autograd")
    assert (f"out of memory on a chunk of {failed} samples; retrying once with chunks of {failed // 2}"
            in caplog.text)
    assert computed_batches(wrapped) == [4, failed, *retried]  # the probe, the failed chunk, the retry
    assert alive_at_release == [[False]]
    expected = pullgeom.spectrum(encoder, x, k=2, backend="autograd")
    torch.testing.assert_close(result.all_eigenvalues, expected.all_eigenvalues, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(result.eigenvectors, expected.eigenvectors, rtol=1e-10, atol=1e-12)


def test_metric_retries_out_of_memory_the_same_way(encoder, caplog):
    x = torch.randn(7, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    wrapped = RunsOutOfMemoryAbove(encoder, limit=4)
    with caplog.at_level("WARNING", logger="pullgeom"):
        metric = pullgeom.metric(wrapped, x, backend="autograd")
    assert "out of memory on a chunk of 7 samples; retrying once with chunks of 3" in caplog.text
    assert computed_batches(wrapped) == [4, 7, 3, 3, 1]
    torch.testing.assert_close(metric.dense(), dense_metric(encoder, x), rtol=1e-10, atol=1e-12)


def test_a_second_out_of_memory_is_raised(encoder, caplog):
    """20 samples fail whole and again at 10: the second failure is the caller's to fix."""
    x = torch.randn(20, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    wrapped = RunsOutOfMemoryAbove(encoder, limit=4)
    with caplog.at_level("WARNING", logger="pullgeom"), pytest.raises(torch.OutOfMemoryError):
        pullgeom.spectrum(wrapped, x, k=2, backend="autograd")
    assert computed_batches(wrapped) == [4, 20, 10]
    assert caplog.text.count("retrying once") == 1


def test_jacrev_recipe_baseline_matches(encoder, x):
    from pullgeom.reference import jacrev_spectrum

    values, vectors = jacrev_spectrum(encoder, x, k=2)
    result = pullgeom.spectrum(encoder, x, k=2)
    torch.testing.assert_close(values, result.all_eigenvalues, rtol=1e-9, atol=1e-12)
    cos = (vectors * result.eigenvectors).sum(-1).abs()
    torch.testing.assert_close(cos, torch.ones_like(cos))


def test_auto_checks_a_native_gpu_backend_before_its_first_use(monkeypatch):
    """The safety net (pullgeom.backends.first_use_check): a backend flagged
    ``checked_on_first_use`` that disagrees with the torch chain is disabled with a warning
    naming it, and auto serves the call (and the next ones) with the next backend."""
    backends = importlib.import_module("pullgeom.backends")

    class WrongKernels(backends.torch_backend.TorchBackend):
        name = "wrong"
        checked_on_first_use = True

        def factor_and_gram(self, problem, x):
            factor, gram = super().factor_and_gram(problem, x)
            return factor, gram * 1.01  # every eigenvalue 1% off: a bug, far above round-off

    wrong = WrongKernels()
    monkeypatch.setattr(backends, "BACKENDS", (wrong, *backends.BACKENDS))
    monkeypatch.setattr(backends, "REGISTRY", {**backends.REGISTRY, "wrong": wrong})
    monkeypatch.setenv("PULLGEOM_AUTOTUNE", "0")  # auto's first fit is the wrong backend
    encoder = seeded(TwoHeadEncoder(12, (9, 7), 3), 0).double().eval()
    x = torch.rand(5, 12, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="the 'wrong' backend disagrees with the plain-torch chain"):
        result = pullgeom.spectrum(encoder, x, k=2)
    assert result.backend != "wrong"
    expected = pullgeom.spectrum(encoder, x, k=2, backend="torch")
    torch.testing.assert_close(result.all_eigenvalues, expected.all_eigenvalues, rtol=1e-10, atol=1e-14)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: the verdict is remembered
        assert pullgeom.spectrum(encoder, x, k=2).backend == result.backend


def test_auto_keeps_a_native_gpu_backend_that_agrees(monkeypatch):
    backends = importlib.import_module("pullgeom.backends")

    class CheckedTorch(backends.torch_backend.TorchBackend):
        name = "checked"
        checked_on_first_use = True

    checked = CheckedTorch()
    monkeypatch.setattr(backends, "BACKENDS", (checked, *backends.BACKENDS))
    monkeypatch.setattr(backends, "REGISTRY", {**backends.REGISTRY, "checked": checked})
    monkeypatch.setenv("PULLGEOM_AUTOTUNE", "0")
    encoder = seeded(TwoHeadEncoder(12, (9, 7), 3), 1).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pullgeom.spectrum(encoder, torch.rand(5, 12), k=2).backend == "checked"


def test_authors_convention_is_the_singular_values_of_j_mu():
    """convention='authors' reproduces what the authors' code computes: the SVD of J_mu alone,
    radius = s_max and entropy over s / s_max (checked against a float64 SVD of the Jacobian)."""
    encoder = seeded(TwoHeadEncoder(10, (8, 7), 4), 5).double().eval()
    x = torch.rand(3, 10, dtype=torch.float64)
    jacobian = torch.stack([torch.autograd.functional.jacobian(lambda v: encoder(v.unsqueeze(0))[0][0], xi)
                            for xi in x])  # (B, dz, N)
    singular = torch.linalg.svdvals(jacobian)  # (B, dz) descending
    p = singular / singular[:, :1]
    expected_entropy = -(p * torch.log(p)).sum(dim=1)
    for result in (pullgeom.scores(encoder, x, convention="authors"),
                   pullgeom.spectrum(encoder, x, k=2, stochastic=False).scores(convention="authors")):
        torch.testing.assert_close(result.spectral_radius, singular[:, 0], rtol=1e-10, atol=0)
        torch.testing.assert_close(result.entropy, expected_entropy, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="stochastic=False"):
        pullgeom.spectrum(encoder, x, k=2).scores(convention="authors")
    with pytest.raises(ValueError, match="entropy_norm='max'"):
        pullgeom.scores(encoder, x, convention="authors", entropy_norm="trace")
    with pytest.raises(ValueError, match="convention='nature'"):
        pullgeom.scores(encoder, x, convention="nature")


@pytest.mark.parametrize("backend", ["cpp", "torch", "autograd"])
def test_top_k_only_matches_the_dense_reference(backend):
    """A wide latent (2dz = 144 >= TOP_K_MIN_SIZE): with top_k_only the cpp backend takes its
    batched top-k Lanczos; its top k must match the float64 dense reference, the other slots
    stay empty and the entropy NaN. Backends without a top-k solver report the whole spectrum."""
    from pullgeom.backends.base import TOP_K_MIN_SIZE

    encoder = seeded(TwoHeadEncoder(170, (160,), 72), 7).double().eval()
    x = torch.rand(4, 170, dtype=torch.float64)
    assert 144 >= TOP_K_MIN_SIZE
    values, vectors = dense_spectrum(encoder, x)
    result = pullgeom.spectrum(encoder, x, k=5, backend=backend, top_k_only=True)
    torch.testing.assert_close(result.eigenvalues, values[:, :5], rtol=1e-9, atol=1e-12 * values[:, :1].max())
    overlap = (result.eigenvectors * vectors[:, :, :5].transpose(1, 2)).sum(-1).abs()
    torch.testing.assert_close(overlap, torch.ones_like(overlap), rtol=0, atol=1e-7)
    if backend == "cpp":
        assert not result.complete.any() and result.entropy.isnan().all()
        assert (result.all_eigenvalues[:, 5:] == 0).all()
    else:
        assert result.complete.all()
        torch.testing.assert_close(result.all_eigenvalues, values[:, :144], rtol=1e-9,
                                   atol=1e-12 * values[:, :1].max())
    # k past a sixteenth of the Gram: the dense solve is the cheaper one, and the spectrum complete.
    assert pullgeom.spectrum(encoder, x, k=30, backend=backend, top_k_only=True).complete.all()


def test_top_k_only_finds_every_copy_of_a_repeated_top_eigenvalue():
    """G's spectrum {5, 5, 5, 2, 1, 0.5, ...} through the top-k path: a linear encoder whose mu
    head scales orthonormal directions (the sigma head is zero, so it adds nothing)."""

    class Linear(nn.Module):
        def __init__(self, n: int, dz: int):
            super().__init__()
            self.hidden = nn.Linear(n, n)
            self.mu, self.logvar = nn.Linear(n, dz), nn.Linear(n, dz)

        def forward(self, x):
            h = self.hidden(x)
            return self.mu(h), self.logvar(h)

    n, dz = 160, 80  # r = 2dz = 160: the top-k solver serves
    generator = torch.Generator().manual_seed(3)
    spectrum_wanted = torch.cat([torch.tensor([5.0, 5.0, 5.0, 2.0, 1.0]), torch.linspace(0.5, 0.01, dz - 5)])
    encoder = Linear(n, dz).double().eval()
    with torch.no_grad():
        rotation = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))[0]
        encoder.hidden.weight.copy_(rotation)
        basis = torch.linalg.qr(torch.randn(n, dz, generator=generator, dtype=torch.float64))[0]
        encoder.mu.weight.copy_(spectrum_wanted.double().sqrt()[:, None] * basis.T)
        encoder.logvar.weight.zero_()
    x = torch.rand(3, n, dtype=torch.float64, generator=generator)
    for dtype, rtol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        result = pullgeom.spectrum(encoder.to(dtype), x.to(dtype), k=5, backend="cpp", top_k_only=True)
        assert not result.complete.any()  # the top-k solver served
        expected = spectrum_wanted[:5].to(dtype).expand(3, 5)
        torch.testing.assert_close(result.eigenvalues, expected, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("top", [[5.0, 5.0, 5.0, 5.0, 1.0], [5.0, 5.0, 3.0, 3.0, 3.0]], ids=["top", "middle"])
def test_top_k_path_settles_copies_the_native_solver_misses(top):
    """Grams with a repeated eigenvalue over a fast-decaying rest, where the native single-vector
    lanczos_topk can converge its top k before a copy appears (it returned one 5 of four): the
    backend's top-k path must still give every copy (``settle_missed_copies``), float32 and 64."""
    from pullgeom.backends import REGISTRY
    from pullgeom.backends.base import settle_missed_copies
    from pullgeom.kernels import native

    cpp, expected_top, naive_misses = REGISTRY["cpp"], torch.tensor(top, dtype=torch.float64), 0
    for size in (128, 256):
        generator = torch.Generator().manual_seed(size)
        wanted = torch.cat([expected_top, 0.5 * torch.exp(-torch.arange(size - 5.0, dtype=torch.float64) / 3)])
        rotation = torch.linalg.qr(torch.randn(3, size, size, dtype=torch.float64, generator=generator))[0]
        gram = rotation @ torch.diag_embed(wanted.expand(3, size)) @ rotation.transpose(1, 2)
        for dtype, rtol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
            m = gram.to(dtype).contiguous()
            naive_misses += int(((native.lanczos_topk(m, 5)[0].double() - expected_top).abs() > 0.5).any())
            values, vectors = settle_missed_copies(cpp, m, 5, *cpp.top_eigenpairs(m, 5))
            torch.testing.assert_close(values, expected_top.to(dtype).expand(3, 5), rtol=rtol, atol=5 * rtol)
            residual = m @ vectors - vectors * values.unsqueeze(1)
            assert residual.norm(dim=1).max() <= 500 * rtol
    assert naive_misses >= 2  # the native solver alone does miss copies here: the check is exercised
