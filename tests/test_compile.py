"""torch.compile(fullgraph=True) through ``pullgeom.spectrum`` (see pullgeom/compiled.py).

A compiled call recalls the preparation of an eager call with the same arguments and folds the
layer plan from the weights as they are when the graph runs.
"""

from __future__ import annotations

import copy

import pytest
import torch

import pullgeom
from zoo import TwoHeadEncoder, seeded

FIELDS = ("eigenvalues", "eigenvectors", "all_eigenvalues", "spectral_radius", "entropy")


def spectrum_fields(encoder, backend):
    def run(x):
        result = pullgeom.spectrum(encoder, x, k=3, backend=backend, chunk_size=5)
        return tuple(getattr(result, field) for field in FIELDS)
    return run


def make_encoder(seed=0):
    return seeded(TwoHeadEncoder(12, (10, 8), 3, batchnorm=True), seed).double().eval()


def x_of(batch=7, seed=1):
    return torch.rand(batch, 12, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_same(got, expected):
    for field, a, b in zip(FIELDS, got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, f=field: f"{f}: {m}")


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_compiled_spectrum_equals_eager_and_follows_weight_updates(backend):
    torch.compiler.reset()
    encoder, x = make_encoder(), x_of()
    run = spectrum_fields(encoder, backend)
    first = run(x)  # the eager call the compiled one recalls
    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    assert_same(compiled(x), first)
    # A training step and new BatchNorm statistics: the compiled graph must read them, not
    # keep the plan of its first call.
    with torch.no_grad():
        for param in encoder.parameters():
            param.mul_(1.3)
        encoder.body[2].running_var.mul_(4.0)
    updated = run(x)
    assert (updated[0] - first[0]).abs().max() > 1e-3  # the update moved the spectrum
    assert_same(compiled(x), updated)


def test_inductor_compiles_the_native_ops():
    torch.compiler.reset()
    encoder, x = make_encoder(2), x_of(6, seed=3)
    run = spectrum_fields(encoder, "cpp")
    expected = run(x)
    assert_same(torch.compile(run, fullgraph=True)(x), expected)


def test_compiling_without_an_eager_call_says_what_to_do():
    torch.compiler.reset()
    encoder = make_encoder(4)
    with pytest.raises(Exception, match="needs one eager call"):
        torch.compile(spectrum_fields(encoder, "torch"), fullgraph=True, backend="aot_eager")(x_of())


def test_a_compiled_call_refuses_nan_inputs_when_it_runs():
    torch.compiler.reset()
    encoder, x = make_encoder(5), x_of()
    run = spectrum_fields(encoder, "torch")
    run(x)
    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    compiled(x)
    x[3, 2] = float("nan")
    with pytest.raises(RuntimeError, match="NaN or inf"):
        compiled(x)


@pytest.mark.parametrize("backend", ["autograd", "lanczos"])
def test_iterative_or_materialising_backends_say_they_cannot_be_compiled(backend):
    torch.compiler.reset()
    encoder, x = make_encoder(6), x_of()
    run = spectrum_fields(encoder, backend)
    run(x)
    with pytest.raises(Exception, match="cannot be compiled"):
        torch.compile(run, fullgraph=True, backend="aot_eager")(x)


def test_a_copied_encoder_compiles_with_its_own_weights():
    """The remembered preparation is copied with the module and points at the copy's layers."""
    torch.compiler.reset()
    encoder, x = make_encoder(7), x_of()
    spectrum_fields(encoder, "torch")(x)
    twin = copy.deepcopy(encoder)
    with torch.no_grad():
        twin.mu.weight.mul_(2.0)
    compiled = torch.compile(spectrum_fields(twin, "torch"), fullgraph=True, backend="aot_eager")
    assert_same(compiled(x), spectrum_fields(twin, "torch")(x))
    assert "_pullgeom_prepared" not in "".join(twin.state_dict())


def test_metric_and_scores_compile_too():
    torch.compiler.reset()
    encoder, x = make_encoder(8), x_of()

    def gram_and_radius(x):
        gram = pullgeom.metric(encoder, x, backend="cpp").gram()
        return gram, pullgeom.scores(encoder, x, backend="cpp").spectral_radius

    expected = gram_and_radius(x)
    got = torch.compile(gram_and_radius, fullgraph=True, backend="aot_eager")(x)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
