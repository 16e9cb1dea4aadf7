"""Backend ``lanczos``: the top-k eigenpairs of G(x) from matrix-free products (MATH.md 6).

    G v = J_mu^T G_z J_mu v + J_sigma^T G_z J_sigma v = A^T A v,   A = [L J_mu; L J_sigma]

(L = G_z^{1/2}; J_mu alone without the sigma head). One product is a Jacobian-vector product
J v and a vector-Jacobian product J^T u. Both come from graphs recorded once per chunk and
replayed by every step, so the forward never reruns: ``torch.func.vjp`` of the heads gives the
pullback u -> J^T u, and since the pullback is linear in u, the VJP of the pullback itself is
v -> J v (the "double-VJP" JVP). Measured on the CelebA encoder, B = 16, one CPU thread, quiet
machine: a forward 20 ms, J^T u 21 ms, J v 40 ms (PyTorch's double backward of a convolution
always computes the weight gradient too, so this JVP runs two convolutions per layer) against
68 ms for ``torch.func.jvp`` (which reruns the forward). ``torch.func.linearize`` runs J v in
17 ms, and a whole CelebA run 20-30% faster (3.4 s against 4.1-4.9 s, +10% peak memory), but
its make_fx tracing costs 0.7-0.9 s per chunk there and 0.17 s on a tiny conv encoder (plus ~2 s
on first use in a process), which would dominate small problems, and make_fx cannot trace every
encoder; so the double-VJP stays. As in the ``autograd`` backend, an eval-mode encoder treats
the samples of a batch independently, so one batched product gives every sample its own.
Nothing of size B x 2dz x N is ever formed.

Where the Lanczos process runs: when L is known (``latent_sqrt``, or G_z = I) the backend runs it
on the m x m Gram M = A A^T (m = 2dz rows of A, or dz), whose nonzero eigenvalues are G's:
M u = A (A^T u) costs the same pullback and JVP as G v, but the Krylov basis holds B x m x steps
floats instead of B x N x steps (CelebA: m = 256 against N = 12,288, so the basis shrinks from
~43 MiB to ~1 MiB at B = 16, 57 steps, and full reorthogonalisation becomes negligible), and the
Krylov space is invariant after at most m + 1 steps. A Ritz pair (theta, y) of M gives G's
v = A^T y / ||A^T y||; the reported residuals ||G v - theta v|| are explicit products with G.
With a decoder (G_z applied through its Jacobian, no L) or m > N, the process runs on G itself.

G_z is applied matrix-free: from ``latent_sqrt`` = G_z^{1/2} (B, dz, dz), which the API
computes, or straight from a decoder, u -> J_g^T (J_g u) with J_g the Jacobian of the decoder's
(mean, sigma) outputs at z = mu(x) (``PullbackOperator(decoder=...)``, used by
``pullgeom.linalg.slq.entropy_estimate``).

What ``all_eigenvalues`` holds for this backend (the API's (B, r) slots): every Ritz value of
the final Krylov space, descending, then zeros. By Cauchy interlacing the i-th Ritz value is a
lower bound on lambda_i (and so is 0), so each slot is a certified lower bound and never NaN;
the first k are converged to the residuals reported, the others converge from the top and are
rough. When the Krylov space became invariant and a restart block was mapped to zero
(``exhausted``, typical when r is small) every slot is exact. Entropies computed from these
slots are therefore those of a truncated spectrum: use ``pullgeom.linalg.slq.entropy_estimate``
for the entropy of G itself.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor
from torch.func import vjp
from torch.utils.flop_counter import FlopCounterMode

from pullgeom.backends.autograd import frozen_call
from pullgeom.backends.base import Backend, ChunkSpectrum, Problem
from pullgeom.encoder import mean_and_std, split_decoder_output
from pullgeom.factor import LowRankFactor
from pullgeom.linalg.eigh import canonical_signs
from pullgeom.linalg.lanczos import LanczosResult, lanczos_topk


def _linear_maps(inputs: Tensor, out: Tensor, pullback) -> tuple:
    """(push, pull): v -> J v and u -> J^T u as replayable graphs, inputs flattened per sample.

    inputs: (B, *S) the recorded point; out: (B, m) the function's value there; pullback from
    ``torch.func.vjp``. The pullback is linear in u, so its own VJP at any point (0 here) is
    v -> J v. push: (B, N) -> (B, m); pull: (B, m) -> (B, N).
    """
    _, pushforward = vjp(lambda u: pullback(u)[0], torch.zeros_like(out))

    def push(v: Tensor) -> Tensor:
        (image,) = pushforward(v.reshape(inputs.shape))
        return image

    def pull(u: Tensor) -> Tensor:
        (back,) = pullback(u)
        return back.reshape(u.shape[0], -1)

    return push, pull


def _replay(linear_map, vectors: Tensor, index: Tensor, rows: int) -> Tensor:
    """``linear_map`` (recorded on all ``rows`` samples) applied to c vectors of the samples ``index``.

    vectors: (c, B', d_in) -> (c, B', d_out). Samples not in ``index`` get zeros: the recorded
    graph always runs on the whole chunk, so a subset costs as much as everyone.
    """
    full = vectors.new_zeros(vectors.shape[0], rows, *vectors.shape[2:])
    full[:, index] = vectors
    # One replay per vector: vmap over the recorded graph hits slow batching rules for conv's
    # double backward (measured: 0.53 s for 4 vectors vs 4 x 12 ms replayed one by one).
    return torch.stack([linear_map(vector) for vector in full])[:, index]


class PullbackOperator:
    """G(x) for a chunk ``x: (B, *S)`` as a batched product ``matvec(V, index)``.

    latent_sqrt: (B, dz, dz) = G_z^{1/2}, or decoder: the decoder (G_z applied through its
    Jacobian at mu(x)), or neither (G_z = I). matvec takes V: (B', N, c) and index: (B',)
    (long, into the chunk) and returns G V: (B', N, c). Without a decoder the factor
    A = [L J_mu; L J_sigma] (m = ``gram_dim`` rows) is known as products too: ``gram_matvec``
    (M = A A^T on R^m) and ``lift`` (A^T). Deterministic.
    """

    def __init__(self, problem: Problem, x: Tensor, *, latent_sqrt: Tensor | None = None, decoder=None):
        if latent_sqrt is not None and decoder is not None:
            raise ValueError("pass latent_sqrt or decoder, not both")
        self.problem = problem
        self.x = x.detach()
        self.batch = x.shape[0]
        self.dz = problem.latent_dim
        call = frozen_call(problem.encoder)

        def heads(batch: Tensor) -> Tensor:
            mu, std = mean_and_std(call, batch, problem.sigma)
            return torch.cat([mu, std], dim=1) if problem.stochastic else mu

        out, pullback = vjp(heads, self.x)
        self._encoder = _linear_maps(self.x, out, pullback)
        self.mu = out[:, : self.dz].detach()
        # m, the rows of A; None when G_z has no known square root (the decoder's case).
        self.gram_dim = out.shape[1] if decoder is None else None
        self.latent_sqrt = latent_sqrt
        self._decoder = None
        if decoder is not None:
            decode = frozen_call(decoder)

            def decoder_outputs(z: Tensor) -> Tensor:
                mean, std = split_decoder_output(decode(z), problem.sigma)
                parts = [mean.reshape(z.shape[0], -1)]
                if std is not None:
                    parts.append(std.reshape(z.shape[0], -1))
                return torch.cat(parts, dim=1)

            self._decoder = _linear_maps(self.mu, *vjp(decoder_outputs, self.mu))

    def apply_latent_metric(self, u: Tensor, index: Tensor) -> Tensor:
        """G_z u for u: (c, B', dz) -> (c, B', dz), G_z at mu(x) of the samples ``index``."""
        if self.latent_sqrt is not None:
            root = self.latent_sqrt[index]  # symmetric, so u^T L L = (L L u)^T
            return (u.unsqueeze(-2) @ root @ root).squeeze(-2)
        if self._decoder is None:
            return u
        push, pull = self._decoder
        return _replay(pull, _replay(push, u, index, self.batch), index, self.batch)

    def _apply_root(self, u: Tensor, index: Tensor) -> Tensor:
        """blockdiag(L, L) u for u: (c, B', m) -> (c, B', m): L on the mu and the sigma block."""
        if self.latent_sqrt is None:
            return u
        c, b, m = u.shape
        root = self.latent_sqrt[index].unsqueeze(1)  # (B', 1, dz, dz), symmetric
        blocks = u.reshape(c, b, m // self.dz, 1, self.dz) @ root
        return blocks.reshape(c, b, m)

    def matvec(self, vectors: Tensor, index: Tensor) -> Tensor:
        """G V for V: (B', N, c) of the samples ``index`` -> (B', N, c)."""
        b, n, c = vectors.shape
        push, pull = self._encoder
        image = _replay(push, vectors.permute(2, 0, 1), index, self.batch)  # (c, B', m)
        heads = image.reshape(c, b, -1, self.dz)  # (c, B', 1 or 2, dz): the mu and sigma blocks
        weighted = self.apply_latent_metric(heads.transpose(1, 2).reshape(-1, b, self.dz), index)
        weighted = weighted.reshape(c, heads.shape[2], b, self.dz).transpose(1, 2).reshape(c, b, -1)
        back = _replay(pull, weighted, index, self.batch)  # (c, B', N)
        return back.permute(1, 2, 0)

    def lift(self, vectors: Tensor, index: Tensor) -> Tensor:
        """A^T U for U: (B', m, c) of the samples ``index`` -> (B', N, c) (no decoder only)."""
        _, pull = self._encoder
        weighted = self._apply_root(vectors.permute(2, 0, 1), index)
        return _replay(pull, weighted, index, self.batch).permute(1, 2, 0)

    def gram_matvec(self, vectors: Tensor, index: Tensor) -> Tensor:
        """M U = A (A^T U) for U: (B', m, c) of the samples ``index`` -> (B', m, c) (no decoder only)."""
        push, _ = self._encoder
        back = self.lift(vectors, index).permute(2, 0, 1)  # (c, B', N)
        image = self._apply_root(_replay(push, back, index, self.batch), index)
        return image.permute(1, 2, 0)


def _forward_flops(problem: Problem, dtype: torch.dtype, device: torch.device) -> int:
    """FLOPs (2 per multiply-add; convs and matmuls) of one encoder forward on one sample, cached."""
    if "forward_flops" not in problem.cache:
        x = torch.zeros(1, *problem.input_shape, dtype=dtype, device=device)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            problem.encoder(x)
        problem.cache["forward_flops"] = max(int(counter.get_total_flops()), 1)
    return problem.cache["forward_flops"]


def expected_steps(problem: Problem, k: int) -> int:
    """Lanczos products a sample typically needs for its top-k, capped by the Krylov limit r + 1.

    10k + 10: measured 40-60 products for k = 5 at tol 1e-5 on the CelebA encoder with random
    weights, whose top of the spectrum is flat (lambda_5 / lambda_1 ~ 0.91): a hard case.
    """
    return min(problem.rank + 1, 10 * k + 10)


def prefer_lanczos(problem: Problem, device: torch.device | str, k: int = 5) -> bool:
    """Whether ``lanczos`` should beat ``autograd`` (materialising A) on ``problem``.

    Cost model per sample, F = FLOPs of one forward (FlopCounterMode on one zero sample),
    m = 2dz (dz without sigma) rows of A, N = input size, s = ``expected_steps``:

        autograd: 1.05 m F (m batched VJPs) + 2 m^2 N (Gram) + 10 m^3 (eigh)
        lanczos:  3.05 s F (a product = a replayed VJP, 1.05 F, plus a double-VJP JVP, 2 F)
                  + 4.1 k F (lifting the k Ritz vectors, one VJP each, and one product each for
                  the explicit residuals) + 2 s^2 m (full reorthogonalisation on the Gram M,
                  summed over the steps) + s^4 / 4 (an eigh of T per step)

    The constants are measured on the CelebA encoder (B = 16, one CPU thread, quiet machine:
    forward 20 ms, VJP 21 ms, double-VJP 40 ms). In memory, autograd holds m N floats of A per
    sample, lanczos s m floats of basis plus the recorded graphs. Lanczos is preferred when its
    modelled FLOPs are below autograd's (on CUDA it must be 2x below, an unmeasured guess: a
    Lanczos step is a short serial chain of kernels, while the m VJPs run as one wide batch), or
    when one sample's A alone exceeds 256 MiB, where materialising stops fitting the chunked
    API's working set. (With a decoder the process runs on G: add the decoder's products and
    2 s^2 N; ``auto`` only weighs the encoder.)
    """
    device = torch.device(device)
    m = (2 if problem.stochastic else 1) * problem.latent_dim
    n = problem.input_numel
    s = expected_steps(problem, k)
    dtype = problem.dtype
    flops = _forward_flops(problem, dtype, device)
    autograd = 1.05 * m * flops + 2 * m * m * n + 10 * m ** 3
    lanczos = 3.05 * s * flops + 4.1 * k * flops + 2 * s * s * m + s ** 4 / 4
    if m * n * torch.finfo(dtype).bits // 8 > 256 * 2 ** 20:
        return True
    margin = 2.0 if device.type == "cuda" else 1.0
    return lanczos * margin < autograd


def _lift(operator: PullbackOperator, result: LanczosResult) -> LanczosResult:
    """``result`` of the Gram M = A A^T turned into G's: eigenvectors v = A^T y / ||A^T y||.

    ||A^T y||^2 = y^T M y = theta for a unit Ritz vector y; normalising by the computed norm
    keeps v a unit vector whatever the round-off. Ritz vectors that lanczos_topk zeroed (value
    at the round-off floor: no direction) stay zero. Residuals: explicit ||G v - theta v||, one
    more product per vector. One vector at a time: the replays run per vector anyway, and the
    temporaries of all k at once (several (k, B, N) stacks) set the call's peak memory in a
    phase-by-phase measurement on CelebA (B = 16, k = 5: 54 MiB against 42 MiB for the steps).
    """
    everyone = torch.arange(operator.batch, device=operator.x.device)
    vectors = torch.zeros(operator.batch, operator.problem.input_numel, result.eigenvectors.shape[2],
                          dtype=result.eigenvectors.dtype, device=result.eigenvectors.device)
    residuals = torch.zeros_like(result.eigenvalues)
    tiny = torch.finfo(vectors.dtype).tiny
    for i in range(vectors.shape[2]):
        v = operator.lift(result.eigenvectors[:, :, i:i + 1], everyone)  # (B, N, 1)
        norm = v.norm(dim=1, keepdim=True)
        v = torch.where(norm > 0, v / norm.clamp_min(tiny), torch.zeros_like(v))
        theta = result.eigenvalues[:, i].view(-1, 1, 1)
        residuals[:, i] = (operator.matvec(v, everyone) - v * theta).norm(dim=(1, 2))
        vectors[:, :, i:i + 1] = v
    return replace(result, eigenvectors=vectors, residuals=residuals)


class LanczosBackend(Backend):
    """Matrix-free top-k eigenpairs by batched block Lanczos (``pullgeom.linalg.lanczos``).

    tol: a sample stops when its top-k residuals are <= tol * lambda_1. The eigenvalue error is
    ~ residual^2 / gap and the eigenvector's angle ~ residual / gap, and the top of the CelebA
    spectrum is flat (lambda_5 - lambda_6 ~ 0.007 lambda_1): Lanczos in float64 on that
    encoder's Gram gave eigenvalues to 4e-10 relative and eigenvectors to sin 5e-5 at 1e-5
    (3e-7 in float32, the products' round-off); 1e-4 saved 3 of ~55 products but left the
    eigenvectors at sin 5e-4.
    block_size: vectors per Krylov block (1: on the CelebA encoder b = 2, 4, 8 needed 1.3x,
    1.7x, 2.4x the products of b = 1 for the same tolerance); seed: start vectors (deterministic).
    """

    name = "lanczos"
    applies_latent_metric = True

    def __init__(self, tol: float = 1e-5, block_size: int = 1, seed: int = 0):
        self.tol = tol
        self.block_size = block_size
        self.seed = seed

    def factor(self, problem: Problem, x: Tensor, latent_sqrt: Tensor | None) -> LowRankFactor:
        raise ValueError("backend 'lanczos' is matrix-free and never forms a factor of G; "
                         "use backend='autograd' (or 'auto') for metric()")

    def run(self, problem: Problem, x: Tensor, k: int, *, latent_sqrt: Tensor | None = None,
            decoder=None) -> LanczosResult:
        """The Lanczos result for one chunk ``x: (B, *S)`` (see ``LanczosResult``).

        Runs on the Gram M = A A^T when A is known (no decoder) and m <= N, else on G (module doc).
        """
        operator = PullbackOperator(problem, x, latent_sqrt=latent_sqrt, decoder=decoder)
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        gram = operator.gram_dim is not None and operator.gram_dim <= problem.input_numel
        dim = operator.gram_dim if gram else problem.input_numel
        start = torch.randn(x.shape[0], dim, self.block_size, dtype=x.dtype, device=x.device,
                            generator=generator)
        # The Krylov space of a rank-r operator is invariant after r + 1 vectors; restarts for
        # repeated eigenvalues add at most as many again.
        max_steps = math.ceil(2 * (problem.rank + 1) / self.block_size) + 2
        if not gram:
            return lanczos_topk(operator.matvec, start, k, tol=self.tol, max_steps=max_steps,
                                generator=generator)
        result = lanczos_topk(operator.gram_matvec, start, k, tol=self.tol, max_steps=max_steps,
                              generator=generator, explicit_residuals=False, lifted=True)
        return _lift(operator, result)

    def solve(self, problem: Problem, x: Tensor, latent_sqrt: Tensor | None, k: int) -> ChunkSpectrum:
        # The API leaves G_z to us (applies_latent_metric): J_g^T J_g u through the decoder.
        decoder = problem.decoder if latent_sqrt is None else None
        result = self.run(problem, x, k, latent_sqrt=latent_sqrt, decoder=decoder)
        r = problem.rank
        values = x.new_zeros(x.shape[0], r)
        ritz = result.ritz_values[:, :r]
        values[:, : ritz.shape[1]] = ritz
        values[:, :k] = result.eigenvalues
        return ChunkSpectrum(values, canonical_signs(result.eigenvectors, dim=1), result.residuals)
