"""pullgeom's CUDA kernels, run without a GPU.

The very sources of csrc/cuda/ (launchers and kernels, the plan_gram chain included) are compiled
by g++ against a host-side emulation of CUDA's execution model (tests/cuda_emulation/: the
threads of a block are fibers that run between barriers in a schedule's order; warp shuffles are
warp barriers; shared memory is poisoned before every block; launch limits are checked) and run
under three schedules: forward, reverse, and a seeded random order of the threads between
barriers (and of the blocks). The cases and checks are the CPU ops' own (imported from
test_ops_eigh.py, test_ops_lanczos.py and test_ops_plan_gram.py, with their float64 references:
torch.linalg.eigh and pullgeom.kernels.chain_rows / the dense metric, and their tolerances), plus
shapes that reach code paths the CPU cases do not (a QR over more rows than the block has
threads, float32 plan_gram for every activation, eigensolver batches split into workspace chunks).
plan_gram's GEMMs, which the CUDA build hands to cuBLAS, run as host loops here: what is under
test is the chain around them (its kernels, buffers, strides and order).

Every case must also come out bit for bit the same under the three schedules: a race-free kernel's
arithmetic does not depend on the order in which threads run between barriers, so any difference
is a race, even one too small for the tolerances. The mutation tests at the end remove barriers
from copies of the sources and check that some schedule then gives a wrong answer.
"""

from __future__ import annotations

import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from cuda_emulation import emulation
from cuda_emulation.emulation import Mutation
from pullgeom.encoder_output import SIGMA_CONVENTIONS
from pullgeom.kernels.chain_rows import chain_rows
from pullgeom.tracing.mlp_plan import trace_plan
from test_ops_eigh import check_decomposition, random_symmetric
from test_ops_lanczos import check_topk, low_rank_psd, with_spectrum
from test_ops_plan_gram import (ACTIVATIONS, SHAPES, assert_left_factor_matches, plan_and_inputs,
                                random_latent_sqrt)

pytestmark = pytest.mark.skipif(not emulation.SUPPORTED, reason="the CUDA emulation needs Linux and g++")


def _cache_dir(config) -> Path:
    """Binaries are cached across runs: in pytest's cache (.pytest_cache), or a temp folder."""
    if os.environ.get("PULLGEOM_EMULATION_CACHE") or getattr(config, "cache", None) is None:
        return emulation.default_cache_dir()
    return Path(config.cache.mkdir("cuda_emulation"))


def _build_all(config, mutations=()) -> dict[str, Path]:
    # g++ takes ~3 s a driver: build the three side by side.
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        cache = _cache_dir(config)
        futures = {op: pool.submit(emulation.build, op, cache, mutations) for op in emulation.OPS}
        return {op: future.result() for op, future in futures.items()}


@pytest.fixture(scope="session")
def binaries(pytestconfig) -> dict[str, Path]:
    return _build_all(pytestconfig)


def emulate(binary: Path, cases: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """Each case's outputs, after checking that every schedule ran it and gave the same bits."""
    results = []
    for runs in emulation.run(binary, cases):
        for run in runs:
            assert run.outputs is not None, f"under the {run.schedule} schedule: {run.error}"
        first = runs[0]
        for run in runs[1:]:
            for index, (got, want) in enumerate(zip(run.outputs, first.outputs, strict=True)):
                if not _bitwise_equal(got, want):
                    difference = (got.double() - want.double()).abs().nan_to_num(float("inf")).amax()
                    raise AssertionError(f"output {index} under the {run.schedule} schedule differs from "
                                         f"{first.schedule}'s: a race (max difference {difference})")
        results.append(first.outputs)
    return results


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():  # NaN == NaN, and -0.0 != 0.0
        integer = torch.int32 if a.dtype == torch.float32 else torch.int64
        return torch.equal(a.view(integer), b.view(integer))
    return torch.equal(a, b)


# ---------------------------------------------------------------- sym_eigh (test_ops_eigh.py)

def sym_eigh(binaries, *matrices):
    """(values, vectors) of each batch of matrices, with the shipped workspace budget."""
    return [out[:2] for out in emulate(binaries["sym_eigh"], [emulation.sym_eigh_case(a) for a in matrices])]


# (1, 256) of the CPU list is left out: 512 threads through ~8,000 barriers take ~10 s here, and
# n = 129 already runs the same path (512 threads, matrices in the global workspace in both dtypes).
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch,n", [(3, 2), (2, 3), (4, 5), (3, 17), (2, 32), (2, 64), (1, 100), (1, 129)])
def test_sym_eigh_random_symmetric(batch, n, dtype, binaries):
    # n = 100: shared memory raised past 48 KiB in float32, the global workspace in float64.
    a = random_symmetric(batch, n, dtype, seed=n)
    [(values, vectors)] = sym_eigh(binaries, a)
    check_decomposition(a, values, vectors)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sym_eigh_eigenvectors_match_reference_where_gaps_allow(dtype, binaries):
    a = random_symmetric(4, 24, dtype, seed=3, spectrum=torch.linspace(10.0, 0.5, 24))
    [(_, vectors)] = sym_eigh(binaries, a)
    _, reference = torch.linalg.eigh(a.double())
    cosines = (vectors.double() * reference.flip(-1)).sum(dim=1).abs()
    assert cosines.amin() >= 0.999


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("spectrum", [
    [3.0, 3.0, 3.0, 1.0, 0.0, 0.0, 0.0],
    [0.0] * 6,
    [5.0, 5.0, 5.0, 5.0, 5.0],
    [2.0, 1e-9, 0.0, -1e-9, -2.0],
])
def test_sym_eigh_repeated_and_zero_eigenvalues(spectrum, dtype, binaries):
    a = random_symmetric(3, len(spectrum), dtype, seed=5, spectrum=spectrum)
    [(values, vectors)] = sym_eigh(binaries, a)
    assert torch.isfinite(values).all() and torch.isfinite(vectors).all()
    check_decomposition(a, values, vectors)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", [5, 100])  # 100: the global-memory path in float64
def test_sym_eigh_non_finite_input_gives_nan(n, dtype, binaries):
    # NaN and inf in one run (n = 100 costs ~0.3 s a matrix and schedule here).
    a = random_symmetric(3, n, dtype, seed=n)
    broken = []
    for bad in (float("nan"), float("inf")):
        broken.append(a.clone())
        broken[-1][1, 0, n - 1] = bad
    clean, *results = sym_eigh(binaries, a, *broken)
    for values, vectors in results:
        assert values[1].isnan().all() and vectors[1].isnan().all()
        for got, want in zip((values, vectors), clean, strict=True):  # the other samples are untouched
            assert _bitwise_equal(got[[0, 2]], want[[0, 2]])


def test_sym_eigh_diagonal_and_one_by_one(binaries):
    diagonal = torch.diag_embed(torch.tensor([[1.0, 4.0, -2.0, 0.0]], dtype=torch.float64))
    (values, vectors), (one_value, one_vector) = sym_eigh(binaries, diagonal, torch.tensor([[[-3.0]]]))
    assert values.tolist() == [[4.0, 1.0, 0.0, -2.0]]
    assert vectors.abs().sum(dim=1).tolist() == [[1.0] * 4]
    assert one_value.tolist() == [[-3.0]] and one_vector.tolist() == [[[1.0]]]


def test_sym_eigh_uses_symmetric_part(binaries):
    a = random_symmetric(2, 6, torch.float64, seed=9)
    skew = torch.randn(2, 6, 6, dtype=torch.float64)
    [(values, _)] = sym_eigh(binaries, a + (skew - skew.mT))
    torch.testing.assert_close(values, torch.linalg.eigvalsh(a).flip(-1))


def test_sym_eigh_zero_size_batch(binaries):
    [(values, vectors)] = sym_eigh(binaries, torch.zeros(0, 7, 7))
    assert values.shape == (0, 7) and vectors.shape == (0, 7, 7)


# ---------------------------------------------------------------- lanczos_topk (test_ops_lanczos.py)

def lanczos(binaries, *cases):
    """cases: (a, k) or (a, k, max_steps); tol and max_steps default as in the native wrapper.
    -> (values, vectors, residuals, steps) each, with the shipped workspace budget."""
    return [out[:4] for out in emulate(binaries["lanczos"], [emulation.lanczos_case(*case) for case in cases])]


@pytest.mark.parametrize("dtype,value_tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("batch,n,rank,k", [(4, 40, 6, 3), (3, 17, 17, 5), (2, 64, 32, 5), (1, 2, 2, 2)])
def test_lanczos_low_rank_psd(batch, n, rank, k, dtype, value_tol, binaries):
    a = low_rank_psd(batch, n, rank, dtype, seed=n)
    [(values, vectors, residuals, steps)] = lanczos(binaries, (a, k))
    check_topk(a, k, values, vectors, residuals, value_tol)
    assert torch.all(steps <= n)


def test_lanczos_indefinite_gets_algebraically_largest(binaries):
    a = with_spectrum(3, [4.0, 3.0, 1.0, 0.5, -2.0, -6.0, -7.0], seed=1)
    [(values, vectors, residuals, _)] = lanczos(binaries, (a, 3))
    check_topk(a, 3, values, vectors, residuals, 1e-10)


def test_lanczos_k_above_rank_deflates_to_zero_eigenvalues(binaries):
    a = low_rank_psd(3, 30, 2, seed=4)
    [(values, vectors, residuals, steps)] = lanczos(binaries, (a, 5))
    check_topk(a, 5, values, vectors, residuals, 1e-10)
    torch.testing.assert_close(values[:, 2:], torch.zeros(3, 3, dtype=torch.float64), rtol=0, atol=1e-10)
    assert torch.all(steps <= 4)


def test_lanczos_repeated_top_eigenvalue_found_through_restarts(binaries):
    a = with_spectrum(2, [3.0, 3.0, 3.0, 1.0, 0.0, 0.0, 0.0, 0.0], seed=2)
    [(values, vectors, residuals, _)] = lanczos(binaries, (a, 4))
    check_topk(a, 4, values, vectors, residuals, 1e-10)


@pytest.mark.parametrize("dtype,value_tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("spectrum", [
    [5.0, 5.0, 5.0, 2.0, 1.0] + [0.0] * 15,
    [4.0, 4.0 + 1e-7, 4.0 - 1e-7, 4.0 + 2e-7, 1.0, 0.5] + [0.1] * 10,
    [3.0, 3.0, 2.999, 2.0, 2.0] + [-1.0] * 11,
])
def test_lanczos_repeated_and_clustered_top_eigenvalues(spectrum, dtype, value_tol, binaries):
    a = with_spectrum(3, spectrum, dtype, seed=len(spectrum))
    [(values, vectors, residuals, _)] = lanczos(binaries, (a, 5))
    check_topk(a, 5, values, vectors, residuals, value_tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lanczos_zero_and_identity_matrices(dtype, binaries):
    zero = torch.zeros(2, 6, 6, dtype=dtype)
    identity = (2.5 * torch.eye(6, dtype=dtype).expand(2, 6, 6)).contiguous()
    outputs = lanczos(binaries, (zero, 3), (identity, 3))
    for (values, vectors, residuals, steps), value in zip(outputs, (0.0, 2.5), strict=True):
        assert torch.all(values == value) and torch.all(residuals.abs() < 1e-6) and torch.all(steps == 1)
        torch.testing.assert_close(vectors.mT @ vectors, torch.eye(3, dtype=dtype).expand(2, 3, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lanczos_non_finite_input_gives_nan(dtype, binaries):
    a = low_rank_psd(3, 8, 3, dtype, seed=6)
    broken = []
    for bad in (float("nan"), float("inf")):
        broken.append(a.clone())
        broken[-1][1, 2, 5] = bad
    clean, *results = lanczos(binaries, (a, 2), *[(b, 2) for b in broken])
    for values, vectors, residuals, steps in results:
        assert values[1].isnan().all() and vectors[1].isnan().all() and residuals[1].isnan().all()
        assert steps[1] == 0
        for got, want in zip((values, vectors, residuals, steps), clean, strict=True):
            assert _bitwise_equal(got[[0, 2]], want[[0, 2]])


def test_lanczos_step_limit_reports_residuals(binaries):
    a = with_spectrum(1, torch.linspace(1.0, 0.9, 50).tolist(), seed=3)
    [(values, vectors, residuals, steps)] = lanczos(binaries, (a, 2, 4))
    assert steps.item() == 4 and torch.isfinite(values).all()
    explicit = (a @ vectors - vectors * values.unsqueeze(1)).norm(dim=1)
    torch.testing.assert_close(residuals, explicit)
    assert residuals.amax() > 1e-6


def test_lanczos_zero_size_batch(binaries):
    [(values, vectors, residuals, steps)] = lanczos(binaries, (torch.zeros(0, 5, 5), 2))
    assert values.shape == (0, 2) and vectors.shape == (0, 5, 2) and residuals.shape == (0, 2)
    assert steps.shape == (0,) and steps.dtype == torch.int64


# ---------------------------------------------------------------- workspace chunks (kernels.h)
# The eigensolvers run a batch in chunks that take turns on one workspace (workspace_chunk: as many
# samples as the budget holds; 2 GiB shipped, so B = 100,000 never allocates tens of GB). A small
# budget here splits test batches into several chunks. The driver sizes the workspace for one chunk
# between guard zones (a sample written outside its chunk's slot breaks them) and reports the chunk.

def _chunked(binary, cases):
    """Each case's outputs and the driver's chunk (its last output)."""
    return [(out[:-1], out[-1].item()) for out in emulate(binary, cases)]


def test_sym_eigh_workspace_chunks(binaries):
    # n = 80 in float64: past shared memory, so in the global workspace of 2 n^2 doubles a matrix.
    n, per_matrix = 80, 2 * 80 * 80 * 8
    a = random_symmetric(3, n, torch.float64, seed=11)
    a[2, 4, 7] = float("nan")  # the last chunk's one matrix
    (whole, whole_chunk), (split, split_chunk) = _chunked(
        binaries["sym_eigh"], [emulation.sym_eigh_case(a), emulation.sym_eigh_case(a, int(2.5 * per_matrix))])
    assert whole_chunk == 3 and split_chunk == 2  # chunks of 2 and 1
    for got, want in zip(split, whole, strict=True):
        assert _bitwise_equal(got, want)
    values, vectors = split
    check_decomposition(a[:2], values[:2], vectors[:2])
    assert values[2].isnan().all() and vectors[2].isnan().all()


def test_lanczos_workspace_chunks(binaries):
    # k above the rank: every sample restarts, with seeds from its index in the whole batch, so a
    # chunk-relative index would change the bits. Per sample: 1440 doubles (n = 24, 24 steps, k = 3).
    a = low_rank_psd(5, 24, 2, seed=12)
    a[3, 0, 0] = float("inf")
    per_sample = 1440 * 8
    cases = [emulation.lanczos_case(a, 3, workspace_budget=budget) for budget in (None, int(2.5 * per_sample), 1)]
    (whole, whole_chunk), *split = _chunked(binaries["lanczos"], cases)
    assert whole_chunk == 5 and [chunk for _, chunk in split] == [2, 1]  # chunks 2, 2, 1; then 5 of 1
    for outputs, _ in split:
        for got, want in zip(outputs, whole, strict=True):
            assert _bitwise_equal(got, want)
    values, vectors, residuals, steps = whole
    keep = [0, 1, 2, 4]
    check_topk(a[keep], 3, values[keep], vectors[keep], residuals[keep], 1e-10)
    assert values[3].isnan().all() and steps[3] == 0


# ---------------------------------------------------------------- plan_gram (test_ops_plan_gram.py)

def plan_gram(binaries, *calls):
    """calls: (plan, x2d, keyword arguments of pullgeom.kernels.native.plan_gram); -> (left, gram) each."""
    cases = [emulation.plan_gram_case(plan, x, **kw) for plan, x, kw in calls]
    outputs = emulate(binaries["plan_gram"], cases)
    return [(left, gram) for gram, left in outputs]


def check_against_chain(plan, x, first_gram, left, gram, stochastic, atol=1e-12, sigma="logvar",
                        latent_sqrt=None):
    """test_ops_plan_gram.py's check: left^T left against the torch chain's rows (float64), the
    Gram against left (W_1 W_1^T) left^T, and exact symmetry."""
    rows = chain_rows(plan, x, sigma, stochastic, latent_sqrt)
    assert left.shape == rows.shape
    expected = rows.mT @ rows
    scale = expected.abs().amax().clamp_min(1e-300)
    torch.testing.assert_close(left.double().mT @ left.double() / scale, expected / scale, rtol=0, atol=atol)
    torch.testing.assert_close(gram.double(), (left @ first_gram @ left.mT).double(), rtol=atol,
                               atol=atol * scale.item())
    torch.testing.assert_close(gram, gram.mT, rtol=0, atol=0)


@pytest.mark.parametrize("widths,latent", SHAPES)
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_plan_gram_matches_torch_chain_in_float64(widths, latent, activation, binaries):
    _, plan, x, first_gram = plan_and_inputs(widths, latent, activation, batchnorm=True)
    results = plan_gram(binaries, *[(plan, x, {"stochastic": stochastic}) for stochastic in (True, False)])
    for stochastic, (left, gram) in zip((True, False), results, strict=True):
        check_against_chain(plan, x, first_gram, left, gram, stochastic)


@pytest.mark.parametrize("sigma", SIGMA_CONVENTIONS)
@pytest.mark.parametrize("with_latent", [False, True])
def test_plan_gram_matches_dense_metric(sigma, with_latent, binaries):
    encoder, plan, x, _ = plan_and_inputs((8, 6, 3, 5), 3, "elu", batchnorm=True, batch=4)
    if sigma == "std":
        with torch.no_grad():
            encoder.out2.bias += 5.0
            plan = trace_plan(encoder)
    latent_sqrt = random_latent_sqrt(4, 3) if with_latent else None
    [(left, _)] = plan_gram(binaries, (plan, x, {"sigma": sigma, "latent_sqrt": latent_sqrt}))
    assert_left_factor_matches(left, plan, encoder, x, sigma, latent_sqrt)


def test_plan_gram_float32_tracks_float64(binaries):
    _, plan, x, _ = plan_and_inputs((20, 16, 12, 8), 4, "tanh", batchnorm=True, batch=6)
    plan32 = plan.to(dtype=torch.float32)
    (_, gram64), (_, gram32) = plan_gram(binaries, (plan, x, {}), (plan32, x.float(), {}))
    top64 = torch.linalg.eigvalsh(gram64)
    top32 = torch.linalg.eigvalsh(gram32.double())
    torch.testing.assert_close(top32 / top64[:, -1:], top64 / top64[:, -1:], rtol=0, atol=1e-5)


# Beyond the CPU cases: (widths, latent, batch, with latent_sqrt). Widths and B * r rows above the
# kernels' block sizes in places, a latent of 20 through the batched K^{1/2} products, and 140 head
# rows compressed by a 128-thread QR block (its strided loop).
WIDE_SHAPES = [((40, 33, 18, 21), 5, 9, False), ((12, 24, 17), 20, 3, True), ((10, 8, 6), 70, 3, False)]


@pytest.mark.parametrize("widths,latent,batch,with_latent", WIDE_SHAPES)
def test_plan_gram_wide_shapes(widths, latent, batch, with_latent, binaries):
    _, plan, x, first_gram = plan_and_inputs(widths, latent, "softplus", batchnorm=True, batch=batch)
    latent_sqrt = random_latent_sqrt(batch, latent) if with_latent else None
    calls = [(plan, x, {"stochastic": s, "latent_sqrt": latent_sqrt}) for s in (True, False)]
    results = plan_gram(binaries, *calls)
    for stochastic, (left, gram) in zip((True, False), results, strict=True):
        check_against_chain(plan, x, first_gram, left, gram, stochastic, latent_sqrt=latent_sqrt)


# float32: left^T left against the float64 chain, relative to its largest entry. float32 rounds at
# 6e-8; through the chain's GEMMs and QR that grew to at most 6e-7 over these 160 cases (and the
# Gram's agreement with left (W_1 W_1^T) left^T to 4e-8): 1e-5 leaves >15x margin, while a wrong
# formula, derivative or row is off by O(1e-1) or more.
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_plan_gram_float32_every_activation_and_sigma(activation, binaries):
    _, plan64, x64, _ = plan_and_inputs((9, 7, 5, 3), 2, activation, batchnorm=True)
    plan32, x32 = plan64.to(dtype=torch.float32), x64.float()
    latent64 = random_latent_sqrt(x64.shape[0], 2)
    calls, keys = [], []
    for sigma in SIGMA_CONVENTIONS:
        for latent in (None, latent64):
            for stochastic in (True, False):
                keys.append((sigma, latent, stochastic))
                calls.append((plan32, x32, {"sigma": sigma, "stochastic": stochastic,
                                            "latent_sqrt": None if latent is None else latent.float()}))
    for (sigma, latent, stochastic), (left, gram) in zip(keys, plan_gram(binaries, *calls), strict=True):
        assert left.dtype == gram.dtype == torch.float32
        check_against_chain(plan64, x64, plan32.first_layer_gram, left, gram, stochastic, atol=1e-5,
                            sigma=sigma, latent_sqrt=latent)


# ---------------------------------------------------------------- the emulator itself

@pytest.mark.parametrize("switch", ["default", "ucontext"])
def test_emulator_semantics(switch, pytestconfig):
    """tests/cuda_emulation/selftest.cu: shuffles and votes, barriers and what breaks them (divergent
    __syncthreads, a shuffle missing a lane), schedule orders, shared memory poisoning, launch
    limits; with the x86-64 context switch (where available) and the portable ucontext one."""
    flags = ("-DCUDA_EMU_UCONTEXT",) if switch == "ucontext" else ()
    binary = emulation.build(emulation.HERE / "selftest.cu", _cache_dir(pytestconfig), extra_flags=flags)
    result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rewrite_sees_every_launch_and_shared_declaration():
    """The rewrite is all the emulation changes in the sources: it must find every launch and
    every __shared__ declaration (a launch it missed would not compile; a declaration it missed
    would be plain static storage, never poisoned)."""
    counts = {}
    for path in sorted((emulation.CSRC / "cuda").glob("*.cu*")):
        text = path.read_text()
        rewritten, found = emulation.emulation_text(text)
        assert found["launches"] == text.count("<<<")
        assert found["static_shared"] + found["extern_shared"] == text.count("__shared__")
        assert "__shared__" not in rewritten and "<<<" not in rewritten
        counts[path.name] = found
    assert counts["sym_eigh_cuda.cu"] == {"launches": 1, "extern_shared": 1, "static_shared": 0}
    # plan_gram: activation, head rows, QR, row scaling, symmetrize (its GEMMs are cuBLAS's).
    assert counts["plan_gram_cuda.cu"]["launches"] == 5 and counts["lanczos_cuda.cu"]["launches"] == 1


# ---------------------------------------------------------------- mutants: a removed barrier shows

MUTATIONS = [
    # block_sum's last barrier: the next call's first write to scratch can overwrite scratch[0]
    # before a slower thread has read the total.
    Mutation.without("block_sum_reuse", "cuda/block_reduce.cuh",
                     "  __syncthreads();  // scratch is reused by the next call"),
    # Jacobi: the rotation angles are read by the row updates before every pair's angle is written.
    Mutation.without("jacobi_angles", "cuda/sym_eigh_cuda.cu",
                     "        sines[i] = s;\n      }\n      __syncthreads();"),
    # Lanczos: thread 0's convergence verdict is read from shared memory before it is written.
    Mutation.without("lanczos_flag", "cuda/lanczos_cuda.cu",
                     "        flag = converged;\n      }\n      __syncthreads();"),
    # Householder QR: the column norm's tree reduction starts before every partial sum is stored.
    Mutation.without("compress_partials", "cuda/plan_gram_cuda.cu",
                     "    scratch[tid] = partial;\n    __syncthreads();"),
]


@pytest.fixture(scope="session")
def mutant_binaries(pytestconfig) -> dict[str, Path]:
    return _build_all(pytestconfig, MUTATIONS)


def _eigh_cases():
    matrices = [random_symmetric(2, n, dtype, seed=n) for n in (17, 32)
                for dtype in (torch.float64, torch.float32)]

    def check(outputs):
        for a, out in zip(matrices, outputs, strict=True):
            check_decomposition(a, *out[:2])
    return [emulation.sym_eigh_case(a) for a in matrices], check


def _lanczos_cases():
    cases = [(low_rank_psd(2, 40, 6, torch.float64, seed=40), 3, 1e-10),
             (low_rank_psd(2, 64, 32, torch.float32, seed=64), 5, 1e-5)]
    def check(outputs):
        for (a, k, tol), out in zip(cases, outputs, strict=True):
            check_topk(a, k, *out[:3], tol)
    return [emulation.lanczos_case(a, k) for a, k, _ in cases], check


def _plan_gram_cases():
    calls = []
    for widths, latent, batch, _ in WIDE_SHAPES[:1] + [((9, 7, 5, 3), 2, 5, False)]:
        _, plan, x, first_gram = plan_and_inputs(widths, latent, "tanh", batchnorm=True, batch=batch)
        calls.append((plan, x, first_gram))

    def check(outputs):
        for (plan, x, first_gram), (gram, left) in zip(calls, outputs, strict=True):
            check_against_chain(plan, x, first_gram, left, gram, True)
    return [emulation.plan_gram_case(plan, x) for plan, x, _ in calls], check


MUTANTS = {"block_sum_reuse": ("sym_eigh", _eigh_cases), "jacobi_angles": ("sym_eigh", _eigh_cases),
           "lanczos_flag": ("lanczos", _lanczos_cases),
           "compress_partials": ("plan_gram", _plan_gram_cases)}


def _verdicts(binary, cases, check, mutant):
    """Per schedule: "right", "failed: <the emulator's report>" (e.g. a divergent __syncthreads), or
    "wrong: <the reference check's complaint>"."""
    verdicts = {}
    for schedule in emulation.SCHEDULES:
        runs = [case_runs[0] for case_runs in emulation.run(binary, cases, [schedule], mutant=mutant)]
        if any(run.outputs is None for run in runs):
            verdicts[schedule] = "failed: " + next(run.error for run in runs if run.outputs is None)
            continue
        try:
            check([run.outputs for run in runs])
            verdicts[schedule] = "right"
        except AssertionError as error:
            verdicts[schedule] = "wrong: " + (str(error).splitlines() or ["a reference check failed"])[0]
    return verdicts


@pytest.fixture(scope="session")
def intact_verdicts(mutant_binaries):
    """The mutant binaries with no mutant on, once per op: they must pass the mutants' cases."""
    verdicts = {}

    def of(op, make_cases):
        if op not in verdicts:
            verdicts[op] = _verdicts(mutant_binaries[op], *make_cases(), None)
        return verdicts[op]
    return of


# The schedules that caught each mutant when this was written (the test asks for one at least):
#   block_sum_reuse: forward, random (reverse lets the total be read before it is overwritten);
#   jacobi_angles: all three; lanczos_flag: reverse and random, where thread 0 decides last and
#   the others leave or stay on a stale flag: the emulator reports the divergent __syncthreads;
#   compress_partials: forward, random (reading the poison).
@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_a_removed_barrier_gives_a_wrong_answer(mutant, mutant_binaries, intact_verdicts):
    op, make_cases = MUTANTS[mutant]
    # The binary with its mutants off (the intact kernels) passes the cases under every schedule ...
    assert set(intact_verdicts(op, make_cases).values()) == {"right"}
    # ... and with the barrier gone some schedule gets a wrong answer, or breaks the synchronisation
    # rules in a way the emulator reports.
    verdicts = _verdicts(mutant_binaries[op], *make_cases(), mutant)
    assert any(verdict != "right" for verdict in verdicts.values()), verdicts
    wrong = any(verdict.startswith("wrong") for verdict in verdicts.values())
    assert wrong or mutant == "lanczos_flag", verdicts
