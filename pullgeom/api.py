"""The public API: ``spectrum``, ``metric``, ``scores`` and ``entropy_estimate``.

Data flows one way: validate -> trace the encoder once (``pullgeom.tracing``) -> Problem ->
backend (``pullgeom.backends``) -> factor and small Gram -> eigensolver (``pullgeom.linalg``,
``pullgeom.kernels``) -> Spectrum -> scores.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Callable, Iterator, TypeVar

import torch
import torch.nn as nn
from torch import Tensor

from pullgeom import compiled
from pullgeom.backends import Problem, choose_backend
from pullgeom.backends.base import check_finite_metric
from pullgeom.backends.lanczos_backend import LanczosBackend, PullbackOperator
from pullgeom.encoder_output import (DEFAULT_SIGMA, as_decoder, as_encoder, check_sigma_convention,
                                     flat_latents, latent_heads, on_latents, reads_sigma,
                                     split_decoder_output)
from pullgeom.factor import LowRankFactor
from pullgeom.latent_metric import LatentMetric
from pullgeom.linalg.slq import EntropyEstimate, entropy_from_operator
from pullgeom.spectral_scores import (Scores, authors_convention_scores, check_convention, check_entropy_norm,
                                      scores_from_eigenvalues, von_neumann_entropy)
from pullgeom.tracing.encoder_trace import trace_encoder
from pullgeom.tracing.mlp_plan import rank_bound

log = logging.getLogger("pullgeom")

ChunkResult = TypeVar("ChunkResult")

# Bytes of per-chunk working memory the default chunk size aims for: the autograd backend
# holds B * 2dz * N floats per chunk (the paper's encoder: 200 KB a sample).
DEFAULT_CHUNK_BYTES = 256 * 2**20


@dataclass
class Spectrum:
    """The top of G(x)'s spectrum per sample.

    eigenvalues: (B, k) descending. eigenvectors: (B, k, *S), unit l2 norm, sign fixed so the
    largest-magnitude entry is positive (a direction whose eigenvalue is exactly 0 is returned
    as zeros: G does not single one out). all_eigenvalues: (B, r), every eigenvalue of the
    rank-r part, descending (G's other N - r eigenvalues are 0). spectral_radius, entropy: (B,).
    backend: the path that actually ran. Deterministic for a given input and backend.
    complete: (B,) bool, whether all_eigenvalues is the whole nonzero spectrum of that sample.
    False where Lanczos stopped once the top k had converged: ``backend="lanczos"`` asked for by
    name, ``top_k_only=True``, or ``auto`` on an encoder whose whole spectrum would cost hours
    (``pullgeom.backends.lanczos_backend.lanczos_mode``: e.g. Stable Diffusion's VAE encoder).
    The other slots are then lower bounds (Cauchy interlacing), and entropy (and ``scores()``'s
    trace and log-determinant), which need every eigenvalue, are NaN for those samples rather
    than the value of a truncated spectrum; ``pullgeom.entropy_estimate`` gives the entropy
    matrix-free with a confidence interval. ``residuals`` (B, k) come with iterative backends.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    all_eigenvalues: Tensor
    spectral_radius: Tensor
    entropy: Tensor
    backend: str
    entropy_norm: str = "max"
    residuals: Tensor | None = None  # (B, k) ||G v - lambda v||, from iterative backends only
    complete: Tensor | None = None  # (B,) bool; spectrum() always sets it
    stochastic: bool = True  # whether G includes the sigma head (False: G = J_mu^T J_mu)

    def scores(self, convention: str = "paper") -> Scores:
        """Spectral radius, entropy, trace and log-determinant of the nonzero spectrum
        (the last three NaN for samples whose spectrum is not ``complete``); ``convention``
        as in ``pullgeom.scores``."""
        return _scores_of(self, self.entropy_norm, convention)


def _scores_of(result: Spectrum, entropy_norm: str, convention: str = "paper") -> Scores:
    check_convention(convention, entropy_norm)
    if convention == "authors":
        if result.stochastic:
            raise ValueError("convention='authors' scores the singular values of J_mu alone, but this "
                             "spectrum includes the sigma head: compute it with stochastic=False")
        scores = authors_convention_scores(result.all_eigenvalues)
    else:
        scores = scores_from_eigenvalues(result.all_eigenvalues, entropy_norm)
    if result.complete is None:
        return scores
    unknown = ~result.complete  # no data-dependent branch: torch.compile traces this
    return replace(scores, **{name: getattr(scores, name).masked_fill(unknown, math.nan)
                              for name in ("entropy", "trace", "log_det")})


class PullbackMetric:
    """G(x) = F^T F in factored form, never N x N unless ``dense()`` is asked for.

    factor(): the LowRankFactor (left (B, r, m), right (m, N) or None); gram(): (B, r, r);
    matvec(v): v (B, *S) -> G v (B, *S); dense(): (B, N, N).
    """

    def __init__(self, factor: LowRankFactor, input_shape: tuple[int, ...], backend: str):
        self._factor = factor
        self.input_shape = input_shape
        self.backend = backend

    def factor(self) -> LowRankFactor:
        return self._factor

    def gram(self) -> Tensor:
        return self._factor.gram()

    def matvec(self, v: Tensor) -> Tensor:
        batch, n = v.shape[0], math.prod(self.input_shape)  # n: reshape(0, -1) is ambiguous
        return self._factor.matvec(v.reshape(batch, n)).reshape(batch, *self.input_shape)

    def dense(self) -> Tensor:
        return self._factor.dense()


# ----------------------------------------------------------------------------------------
# Validation.

def _compute_dtype(x: Tensor) -> torch.dtype:
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a torch.Tensor of shape (B, *S), got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"x has dtype {x.dtype}; pass floating-point inputs (e.g. x.float() / 255)")
    if x.dim() < 2:
        raise ValueError(f"x has shape {tuple(x.shape)}; pass a batch (B, *S), e.g. x.unsqueeze(0)")
    # Half-precision Jacobians lose the small eigenvalues entirely: compute in float32.
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _check_finite(x: Tensor) -> None:
    if torch.compiler.is_compiling():
        compiled.assert_in_graph(torch.isfinite(x).all(),
                                 "x contains NaN or inf; clean or drop those samples first")
        return
    bad = ~torch.isfinite(x.flatten(1)).all(dim=1)
    if bad.any():
        first = bad.nonzero()[0].item()
        raise ValueError(f"x contains NaN or inf ({int(bad.sum())} samples, first at index {first}); "
                         "clean or drop those samples first")


def _check_eval_mode(model, role: str) -> None:
    """Refuse a model whose output for one sample depends on the rest of the batch (or on chance):
    G(x) is a per-sample quantity, and the backends differentiate one sample at a time."""
    if not isinstance(model, nn.Module):
        return
    batch_dependent = (nn.modules.batchnorm._BatchNorm, nn.Dropout, nn.AlphaDropout)
    for name, module in model.named_modules():
        if module.training and isinstance(module, batch_dependent):
            raise ValueError(
                f"the {role} is in training mode, so {type(module).__name__} '{name or role}' makes its "
                f"output depend on the batch (or on chance); call {role}.eval() first"
            )
        # Without running statistics BatchNorm normalises with the batch's own mean and variance
        # even in eval mode (torch's rule: batch statistics when running_mean and running_var are
        # None), so .eval() cannot help; instance/group/layer norms are per sample and pass.
        if (isinstance(module, nn.modules.batchnorm._BatchNorm)
                and module.running_mean is None and module.running_var is None):
            raise ValueError(
                f"the {role}'s {type(module).__name__} '{name or role}' has no running statistics "
                "(track_running_stats=False), so even in eval mode it normalises each sample with the "
                "statistics of the whole batch and every result would depend on the other samples; "
                "build it with track_running_stats=True and train it, or use a per-sample "
                "normalisation (LayerNorm, GroupNorm)"
            )


def _check_device(x: Tensor) -> None:
    # A meta tensor holds no values: every later check would fail with torch's own message.
    if x.device.type == "meta":
        raise ValueError("x is on the meta device, which holds shapes but no values; "
                         "pass x on the device that holds the data (cpu or cuda)")


def _check_parameters(model, device: torch.device, dtype: torch.dtype, role: str) -> None:
    """Refuse a model with a parameter or buffer off x's ``device`` (the encoder would otherwise
    fail inside its forward with a message about the first layer, not about where things live),
    or a floating parameter not of the computation's ``dtype`` (checked one by one: a model may
    mix dtypes)."""
    if not isinstance(model, nn.Module):
        return
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if tensor.device != device:
            raise ValueError(
                f"the {role}'s {name} is on {tensor.device} but x is on {device}; put both on one "
                f"device: {role}.to({str(device)!r}) or x.to({str(tensor.device)!r})"
            )
    for name, param in model.named_parameters():
        if param.is_floating_point() and param.dtype != dtype:
            raise ValueError(
                f"the {role}'s {name} is {param.dtype} but the computation is {dtype}; "
                f"call {role}.to({dtype}) or pass x of dtype {param.dtype}"
            )


def _run(model, inputs: Tensor, failed: str, advice: str):
    """``model(inputs)`` without gradients; if the model raises, a ValueError saying what
    ``failed``, the model's own error, and the ``advice``."""
    try:
        with torch.no_grad():
            return model(inputs)
    except (ValueError, torch.OutOfMemoryError):
        raise
    except Exception as error:
        raise ValueError(f"{failed} ({type(error).__name__}: {error}); {advice}") from None


def _probe_encoder(encoder, x: Tensor, sigma: str):
    """Run the encoder on a few samples ``x: (b, *S)``: (its output, mu, sigma), mu and sigma
    ``(b, *L)`` as the encoder shapes them; a clear error if it fails or returns something else."""
    output = _run(encoder, x, f"the encoder rejected x of shape {tuple(x.shape)}",
                  "check the input shape it expects")
    try:
        return (output, *latent_heads(output, x.shape[0], sigma))
    except ValueError as error:
        if isinstance(getattr(encoder, "encoder", None), nn.Module):  # a whole VAE whose forward decodes
            raise ValueError(f"{error}; for a whole VAE, pass its encoder (encoder=vae.encoder)") from None
        raise


def _probe_decoder(decoder, mu: Tensor, latent_shape: tuple[int, ...], sigma: str):
    """Run the decoder (fed flat latents, ``on_latents``) on ``mu: (b, dz)``: its output, checked
    to be in one of the decoder conventions."""
    shape = f" (shape {latent_shape})" if len(latent_shape) > 1 else ""
    output = _run(decoder, mu, f"the decoder does not accept latents of size dz={mu.shape[1]}{shape}",
                  "pass the decoder that matches this encoder")
    split_decoder_output(output, sigma)
    return output


def _resolve_sigma(sigma: str | None, encoded, decoded) -> str:
    """The convention for out2, refusing a ``sigma=`` that would be silently ignored: it applies
    only to a ``(mu, out2)`` pair, and an encoder returning a Normal, a latent_dist or pythae's
    log_covariance carries sigma itself."""
    if sigma is None:
        return DEFAULT_SIGMA
    if reads_sigma(encoded) or (decoded is not None and reads_sigma(decoded)):
        return sigma
    decoder = " and the decoder returns no (mean, out2) pair" if decoded is not None else ""
    raise ValueError(f"sigma={sigma!r} says what out2 of a (mu, out2) pair is, but the encoder returns "
                     f"{type(encoded).__name__}, which gives sigma itself{decoder}; leave sigma unset")


def build_problem(encoder, x: Tensor, *, sigma: str | None = None, stochastic: bool = True,
                  decoder=None) -> tuple[Problem, Tensor]:
    """Resolve whole VAE objects to their encoder and decoder (``as_encoder``, ``as_decoder``),
    probe the encoder on the first samples of ``x: (B, *S)`` (already validated and in the
    compute dtype) and the decoder on their mu, trace the encoder once (``trace_encoder``) and
    resolve dz and r; returns the problem and the probe's mu (b, dz)."""
    encoder, decoder = as_encoder(encoder), as_decoder(decoder)
    # An empty batch still needs dz and r: probe with one zero sample (some encoders,
    # e.g. x.view(x.size(0), -1), cannot run on zero samples).
    probe = x[: min(x.shape[0], 4)] if x.shape[0] else x.new_zeros(1, *x.shape[1:])
    encoded, mu, std = _probe_encoder(encoder, probe, sigma or DEFAULT_SIGMA)
    latent_shape = tuple(mu.shape[1:])
    mu, std = flat_latents(mu), flat_latents(std)
    decoded = None
    if decoder is not None:
        decoder = on_latents(decoder, latent_shape)
        decoded = _probe_decoder(decoder, mu, latent_shape, sigma or DEFAULT_SIGMA)
    sigma = _resolve_sigma(sigma, encoded, decoded)
    trace = trace_encoder(encoder, probe, mu, std, sigma)
    widths = trace.plan.widths if trace.plan is not None else [math.prod(x.shape[1:])]
    problem = Problem(encoder=encoder, sigma=sigma, stochastic=stochastic, input_shape=tuple(x.shape[1:]),
                      latent_dim=mu.shape[1], rank=rank_bound(mu.shape[1], stochastic, widths), dtype=x.dtype,
                      trace=trace, latent=None if decoder is None else LatentMetric(decoder, sigma))
    return problem, mu


def _release_cached_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _in_chunks(solve_chunk: Callable[[Tensor], ChunkResult], x: Tensor,
               chunk: int) -> Iterator[tuple[int, int, ChunkResult]]:
    """Yield ``(start, stop, solve_chunk(x[start:stop]))`` over x: (B, *S), ``chunk`` samples at a time.

    An out-of-memory error in a chunk is retried once with half that chunk's size (not of
    ``chunk``, which exceeds B when chunk_size is None), and the rest of x continues at that
    size: enough when the first guess was just too big, while a second failure, or one on a
    single sample, is raised, since then the caller must choose chunk_size.
    """
    start, retried = 0, False
    while start < x.shape[0]:
        failed = 0
        try:
            result = solve_chunk(x[start:start + chunk])
        except torch.OutOfMemoryError:
            failed = min(chunk, x.shape[0] - start)
            if retried or failed == 1:
                raise
        # Released only here, outside the except block: until it ends, the exception's traceback
        # holds the failed chunk's tensors in its frames, and the cache could not return them.
        if failed:
            retried, chunk = True, failed // 2
            log.warning("pullgeom: out of memory on a chunk of %d samples; retrying once with chunks of %d "
                        "(pass chunk_size= to choose it yourself)", failed, chunk)
            _release_cached_memory(x.device)
            continue
        stop = min(start + chunk, x.shape[0])
        yield start, stop, result
        start = stop


def _default_chunk(problem: Problem, itemsize: int) -> int:
    per_sample = 2 * problem.latent_dim * problem.input_numel * itemsize
    return max(1, DEFAULT_CHUNK_BYTES // max(per_sample, 1))


def _validate(encoder, x, decoder, sigma: str | None) -> Tensor:
    """The checks every public entry point runs; returns x in the computation's dtype."""
    if sigma is not None:
        check_sigma_convention(sigma)
    dtype = _compute_dtype(x)
    _check_device(x)
    x = x.to(dtype)
    _check_finite(x)
    if torch.compiler.is_compiling():
        return x
    _check_eval_mode(encoder, "encoder")
    _check_eval_mode(decoder, "decoder")
    _check_parameters(encoder, x.device, dtype, "encoder")
    _check_parameters(decoder, x.device, dtype, "decoder")
    return x


def _prepare(encoder, x, k, decoder, stochastic, sigma, backend, chunk_size):
    """Validate a call and resolve (x in the compute dtype, problem, backend, chunk size).

    Under torch.compile the eager preparation of the same call is recalled (see ``compiled``).
    """
    x = _validate(encoder, x, decoder, sigma)
    if torch.compiler.is_compiling():
        signature = compiled.call_signature(x, sigma, stochastic, backend, chunk_size)
        problem, chosen, chunk = compiled.recall(encoder, signature, decoder)
        _check_k(k, problem)
        return x, problem, chosen, chunk
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k={k!r}: ask for at least one eigenpair (an int >= 1)")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r}: pass a positive int or None")
    problem, _ = build_problem(encoder, x, sigma=sigma, stochastic=stochastic, decoder=decoder)
    _check_k(k, problem)
    chosen = choose_backend(backend, problem, x.device, x[:4] if x.shape[0] else None)
    chunk = chunk_size or _default_chunk(problem, x.element_size())
    compiled.remember(encoder, compiled.call_signature(x, sigma, stochastic, backend, chunk_size),
                      compiled.PreparedCall.of(problem, chosen, chunk))
    return x, problem, chosen, chunk


def _check_k(k, problem: Problem) -> None:
    if k > problem.rank:
        raise ValueError(f"k={k} exceeds r={problem.rank}, the rank bound of G for this encoder "
                         "(2dz, the input size and the narrowest layer); ask for k <= r")


# ----------------------------------------------------------------------------------------
# Public functions.

def spectrum(encoder, x: Tensor, k: int = 5, *, decoder=None, stochastic: bool = True,
             sigma: str | None = None, entropy_norm: str = "max", backend: str = "auto",
             chunk_size: int | None = None, top_k_only: bool = False, tol: float | None = None) -> Spectrum:
    """Top-k eigenpairs, full nonzero spectrum and scores of G(x) for each sample.

    encoder: ``x -> (mu, out2)``, a Normal, ``Independent(Normal, n)``, an object with a
    ``.latent_dist`` (diffusers) or a dict/ModelOutput with ``embedding`` and ``log_covariance``
    (pythae) (``encoder_output.ENCODER_CONVENTIONS``), latents of any shape ``(B, *L)`` flattened
    C-order to dz = prod(L); or a whole diffusers/pythae VAE (its encoder). x: (B, *S), passed
    to the encoder as given.
    decoder: optional, adds the latent metric G_z at z = mu(x); fed z as (B, *L); a whole VAE
    decodes with its decoder. stochastic=False uses J_mu only.
    sigma: what out2 of a ``(mu, out2)`` pair (the encoder's or the decoder's) is ("logvar",
    "logstd", "std", "softplus"); unset means "logvar". Passing it when no output is such a pair
    (the encoder carries sigma itself) is a ValueError, not silently ignored. backend: "auto" or a name from
    ``pullgeom.list_backends()``. chunk_size: samples per chunk (bounds peak memory); an out-of-memory
    error in a chunk is retried once with half that chunk, with a logged warning.
    float16/bfloat16 inputs are computed in float32; float64 stays float64.
    top_k_only: only the top k eigenpairs are needed. Where a batched top-k solver beats the
    dense eigensolve of the small Gram (wide latents; ``backends.base.top_k_pays``), it serves,
    and those samples are not ``complete``: entropy (and ``scores()``'s trace and log-determinant)
    NaN, ``all_eigenvalues`` the top k then zeros (``pullgeom.entropy_estimate`` gives the entropy
    matrix-free). Elsewhere the whole spectrum comes at no extra cost and is reported.
    tol: where the matrix-free ``lanczos`` backend runs to the top k (named, or auto's choice
    for encoders too large to factor), a sample stops once every top-k residual
    ||G v - lambda v|| <= tol * lambda_1 (default 1e-5; ``result.residuals`` reports them). The
    eigenvalue error is at most the residual and about residual^2 / gap; a looser tol costs
    fewer products where the top of the spectrum is flat (BENCHMARKS.md, "Stable Diffusion's VAE
    encoder"). The other backends solve exactly (to round-off) and do not use it.

    An encoder that is not a recognised MLP is logged once (per encoder object) at INFO on the
    ``pullgeom`` logger, not WARNING, by choice: the fallback is exact, not a degraded answer, and
    conv encoders always take it, so a warning would fire for every such model (every model of a
    sweep) with nothing for the user to fix; ``result.backend`` says which path ran.
    """
    check_entropy_norm(entropy_norm)
    if tol is not None and not (isinstance(tol, (int, float)) and 0 < tol < 1):
        raise ValueError(f"tol={tol!r}: pass a relative residual tolerance in (0, 1), e.g. 1e-5, or None")
    x, problem, chosen, chunk = _prepare(encoder, x, k, decoder, stochastic, sigma, backend, chunk_size)
    if tol is not None and isinstance(chosen, LanczosBackend):
        chosen = chosen.with_tol(tol)
    batch, r = x.shape[0], problem.rank
    eigenvalues = x.new_zeros(batch, k)
    eigenvectors = x.new_zeros(batch, k, problem.input_numel)
    all_eigenvalues = x.new_zeros(batch, r)
    residuals = None
    complete = torch.ones(batch, dtype=torch.bool, device=x.device)

    def solve(xc: Tensor):
        solved = chosen.solve(problem, xc, k, top_k_only)
        # Every backend, the matrix-free one included (no Gram to check), ends here: an
        # overflowing encoder is an error, never NaN or silently zeroed eigenvalues.
        check_finite_metric(solved.eigenvalues)
        return solved

    for start, stop, result in _in_chunks(solve, x, chunk):
        all_eigenvalues[start:stop] = result.eigenvalues
        eigenvalues[start:stop] = result.eigenvalues[:, :k]
        eigenvectors[start:stop] = result.eigenvectors.transpose(1, 2)
        if result.residuals is not None:
            if residuals is None:
                residuals = x.new_zeros(batch, k)
            residuals[start:stop] = result.residuals
        if result.complete is not None:
            complete[start:stop] = result.complete
    entropy = von_neumann_entropy(all_eigenvalues, entropy_norm)
    return Spectrum(
        eigenvalues=eigenvalues,
        eigenvectors=eigenvectors.reshape(batch, k, *problem.input_shape),
        all_eigenvalues=all_eigenvalues,
        spectral_radius=all_eigenvalues[:, 0] if r else x.new_zeros(batch),
        entropy=entropy.masked_fill(~complete, math.nan),  # a truncated spectrum's entropy is not G's
        backend=chosen.name,
        entropy_norm=entropy_norm,
        residuals=residuals,
        complete=complete,
        stochastic=problem.stochastic,
    )


def metric(encoder, x: Tensor, *, decoder=None, stochastic: bool = True, sigma: str | None = None,
           backend: str = "auto", chunk_size: int | None = None) -> PullbackMetric:
    """The factored pullback metric G(x) for every sample (see ``PullbackMetric``)."""
    x, problem, chosen, chunk = _prepare(encoder, x, 1, decoder, stochastic, sigma, backend, chunk_size)

    def factor_of(xc: Tensor) -> LowRankFactor:
        factor = chosen.factor(problem, xc)
        check_finite_metric(factor.left)  # an overflowing encoder: an error, not a NaN metric
        return factor

    factors = [factor for _, _, factor in _in_chunks(factor_of, x, chunk)]
    if factors:
        left = torch.cat([f.left for f in factors])
        factor = LowRankFactor(left, factors[0].right, factors[0].right_gram)
    else:
        factor = LowRankFactor(x.new_zeros(0, problem.rank, problem.input_numel))
    return PullbackMetric(factor, problem.input_shape, chosen.name)


def scores(source, x: Tensor | None = None, *, entropy_norm: str = "max", convention: str = "paper",
           **spectrum_kwargs) -> Scores:
    """Spectral radius, von Neumann entropy, trace and log-determinant per sample.

    ``source`` is a Spectrum, a tensor of eigenvalues (B, r), or an encoder (then ``x`` is
    required and ``spectrum_kwargs`` go to ``spectrum``).

    convention: "paper" (default) scores the eigenvalues of G, as the paper's equations define
    them. "authors" scores what the authors' published code computes: the singular values of
    J_mu alone (s_i = sqrt(lambda_i) of G with ``stochastic=False``; spectral_radius = s_max), the
    entropy over them normalised by the largest. With an encoder it computes that spectrum; a
    Spectrum must have been computed with ``stochastic=False``; a tensor is taken as the
    eigenvalues of J_mu^T J_mu.
    """
    check_entropy_norm(entropy_norm)
    check_convention(convention, entropy_norm)
    if isinstance(source, Spectrum):
        return _scores_of(source, entropy_norm, convention)
    if isinstance(source, Tensor):
        if convention == "authors":
            return authors_convention_scores(source)
        return scores_from_eigenvalues(source, entropy_norm)
    if x is None:
        raise ValueError("scores(encoder, x): pass the inputs x with an encoder")
    if convention == "authors":
        if spectrum_kwargs.get("stochastic", False):
            raise ValueError("convention='authors' scores J_mu alone: leave stochastic unset (or False)")
        spectrum_kwargs["stochastic"] = False
    result = spectrum(source, x, k=1, entropy_norm=entropy_norm, **spectrum_kwargs)
    return _scores_of(result, entropy_norm, convention)


def entropy_estimate(encoder, x: Tensor, *, entropy_norm: str = "trace", decoder=None,
                     stochastic: bool = True, sigma: str | None = None, probes: int = 30,
                     steps: int | None = None, deflate: int | None = None, confidence: float = 0.95,
                     tol: float = 1e-5, seed: int = 0) -> EntropyEstimate:
    """Entropy of G(x) per sample for ``x: (B, *S)`` by SLQ, matrix-free, with intervals
    (``pullgeom.linalg.slq``).

    Any differentiable eval-mode encoder, validated as ``spectrum`` validates it; ``decoder``
    adds G_z, applied matrix-free through the decoder's Jacobian. Costs (deflate Lanczos steps
    + probes * steps) JVP/VJP pairs per sample and never forms a B x 2dz x N tensor. See
    ``pullgeom.linalg.slq`` for what the interval covers and, for 'max', what ``tail_bounds`` bound.
    """
    check_entropy_norm(entropy_norm)
    x = _validate(encoder, x, decoder, sigma)
    problem, _ = build_problem(encoder, x, sigma=sigma, stochastic=stochastic, decoder=decoder)
    operator = PullbackOperator(problem, x)
    n = problem.input_numel
    # Without a decoder G = A^T A and the Gram M = A A^T (m = 2dz or dz) have the same nonzero
    # eigenvalues, so tr f(G) = tr f(M) for f(0) = 0: probes and Krylov bases then live in R^m
    # for the same products (CelebA, B = 16, 4 probes at a time, 41 steps: the probe bases hold
    # 16 x 4 x 41 floats times m = 256 instead of N = 12,288, ~3 MB instead of ~130 MB).
    if operator.gram_dim is not None and operator.gram_dim <= n:
        matvec, n = operator.gram_matvec, operator.gram_dim
    else:
        matvec = operator.matvec
    return entropy_from_operator(matvec, x.shape[0], n, problem.rank, entropy_norm=entropy_norm,
                                 dtype=x.dtype, device=x.device, probes=probes, steps=steps, deflate=deflate,
                                 confidence=confidence, tol=tol, seed=seed)
