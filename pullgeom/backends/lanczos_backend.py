"""Backend ``lanczos``: the top-k eigenpairs of G(x) from matrix-free products (MATH.md 6).

    G v = J_mu^T G_z J_mu v + J_sigma^T G_z J_sigma v = A^T A v,   A = [L J_mu; L J_sigma]

(L = G_z^{1/2}; J_mu alone without the sigma head). One product is a Jacobian-vector product
J v and a vector-Jacobian product J^T u, taken one of two ways (``jacobian_products``):

- an encoder that ``pullgeom.tracing.fx_trace.trace_chains`` reads as a chain of Conv2d / Linear /
  eval-mode BatchNorm / activations / flatten (the paper's CelebA encoder, every MLP) gets the
  hand-written products of ``pullgeom.tracing.layer_chain``: one convolution or transposed convolution
  per layer and the activation derivatives kept from one forward, nothing else stored. The
  chain's own forward must reproduce the encoder's heads on the chunk's first samples, else
  the second way serves.
- any other differentiable encoder: ``RecordedJacobian``, the forward recorded once per chunk
  as a tape of its aten ops (``pullgeom.tracing.op_tape``) walked forwards for J v and
  backwards for J^T u by every step, so the forward never reruns (an encoder that writes in
  place gets ``torch.func`` graphs instead: the pullback and its double-VJP JVP).

Why the layer chain first: on the CelebA encoder its product (J v + J^T u) costs about two
forwards and keeps one activation-sized tensor per layer, and it multiplies only the samples
still running; the tape keeps every op's inputs and replays the whole chunk. ``torch.func.jvp``
would rerun the forward for every J v. The timings: BENCHMARKS.md, "Per-product costs".
As in the ``autograd`` backend, an eval-mode encoder treats the samples of a batch
independently, so one batched product gives every sample its own. Nothing of size B x 2dz x N
is ever formed.

Where the Lanczos process runs: without a decoder (G_z = I) the backend runs it
on the m x m Gram M = A A^T (m = 2dz rows of A, or dz), whose nonzero eigenvalues are G's:
M u = A (A^T u) costs the same pullback and JVP as G v, but the Krylov basis holds B x m x steps
floats instead of B x N x steps (CelebA: m = 256 against N = 12,288, so the basis shrinks from
~43 MiB to ~1 MiB at B = 16, 57 steps, and full reorthogonalisation becomes negligible), and the
Krylov space is invariant after at most m + 1 steps. A Ritz pair (theta, y) of M gives G's
v = A^T y / ||A^T y||; the reported residuals ||G v - theta v|| are explicit products with G.
With a decoder (G_z applied through its Jacobian) or m > N, the process runs on G itself.

G_z is applied matrix-free, straight from the decoder (``problem.latent``): u -> J_g^T (J_g u)
with J_g the Jacobian of the decoder's (mean, sigma) outputs at z = mu(x) (``PullbackOperator``,
also used by ``pullgeom.entropy_estimate``).

What ``all_eigenvalues`` holds for this backend (the API's (B, r) slots): every Ritz value of
the final Krylov space, descending, then zeros. By Cauchy interlacing the i-th Ritz value is a
lower bound on lambda_i (and so is 0), so each slot is a certified lower bound and never NaN;
the first k are converged to the residuals reported. A sample whose Krylov space became
invariant (``exhausted``) has every slot exact and is ``complete``; ``whole_spectrum=True``
(what ``backend="auto"`` runs) runs every sample that far. For the others the API reports
entropy NaN rather than that of a truncated spectrum (``pullgeom.entropy_estimate``
estimates it matrix-free).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor
from torch.func import vjp
from torch.utils.flop_counter import FlopCounterMode

from pullgeom.backends.base import Backend, ChunkSpectrum, Problem
from pullgeom.encoder_output import frozen_call, heads_function, split_decoder_output
from pullgeom.factor import LowRankFactor
from pullgeom.linalg.eigh import canonical_signs
from pullgeom.linalg.lanczos import LanczosResult, lanczos_topk
from pullgeom.tracing.layer_chain import LayerChainJacobian
from pullgeom.tracing.op_tape import OpTape, UnsupportedTape


class RecordedJacobian:
    """v -> J v and u -> J^T u of ``fn`` at ``inputs: (B, *S)``, the forward run once.

    An ``OpTape`` (``pullgeom.tracing.op_tape``: the aten ops of one forward, walked forwards
    for J v and backwards for J^T u, about one forward each) unless ``fn`` writes in place into
    a tensor reached from its input; then graphs recorded by ``torch.func.vjp``: its pullback
    gives u -> J^T u and, being linear in u, its own VJP at 0 gives v -> J v (the double-VJP
    JVP: about 2.3 forwards on convolutions, whose double backward always computes the weight
    gradient too).

    ``out``: fn(inputs), (B, m). ``push(V, index)``: (c, B', N) -> (c, B', m); ``pull(U, index)``:
    (c, B', m) -> (c, B', N), for the samples ``index`` of the B recorded: both ways always
    replay the whole chunk, so a subset costs as much as everyone (the others get zeros).
    """

    def __init__(self, fn, inputs: Tensor):
        self._inputs_shape = inputs.shape
        try:
            tape = OpTape(fn, inputs)
        except UnsupportedTape:
            self.out, pullback = vjp(fn, inputs)
            _, pushforward = vjp(lambda u: pullback(u)[0], torch.zeros_like(self.out))
            self._push_one = lambda v: pushforward(v)[0]
            self._pull_one = lambda u: pullback(u)[0]
        else:
            self.out, self._push_one, self._pull_one = tape.out, tape.jvp, tape.vjp

    def _replay(self, linear_map, vectors: Tensor, index: Tensor, shape) -> Tensor:
        full = vectors.new_zeros(vectors.shape[0], self._inputs_shape[0], *vectors.shape[2:])
        full[:, index] = vectors
        # One replay per vector: vmap over the recorded graphs hits slow batching rules for conv's
        # double backward (about 10x slower than replaying one by one; BENCHMARKS.md,
        # "measurements behind design choices"), and the tape is walked op by op.
        return torch.stack([linear_map(vector.reshape(shape)) for vector in full]).flatten(2)[:, index]

    def push(self, vectors: Tensor, index: Tensor) -> Tensor:
        return self._replay(self._push_one, vectors, index, self._inputs_shape)

    def pull(self, vectors: Tensor, index: Tensor) -> Tensor:
        return self._replay(self._pull_one, vectors, index, self.out.shape)


def jacobian_products(problem: Problem, x: Tensor, products: str = "auto"):
    """The heads' Jacobian at ``x`` as products: a ``LayerChainJacobian`` when ``products`` is
    "auto" and the trace found layer chains that reproduce the encoder, else a
    ``RecordedJacobian`` of ``torch.func.vjp`` (any differentiable encoder)."""
    if products not in ("auto", "autograd"):
        raise ValueError(f"products={products!r}: use 'auto' (hand-written layer chain when the "
                         "encoder is one) or 'autograd' (torch.func graphs)")
    chains = problem.trace.chains if products == "auto" else None
    if chains is not None:
        return LayerChainJacobian(chains, x, problem.sigma, problem.stochastic)
    return RecordedJacobian(heads_function(problem.encoder, problem.sigma, problem.stochastic), x)


class PullbackOperator:
    """G(x) for a chunk ``x: (B, *S)`` as a batched product ``matvec(V, index)``.

    G_z comes from ``problem.latent`` (applied through the decoder's Jacobian at mu(x)), or is I.
    products: as ``jacobian_products``. matvec takes V: (B', N, c) and index: (B',) (long, into
    the chunk) and returns G V: (B', N, c). Without a decoder the factor A = [J_mu; J_sigma]
    (m = ``gram_dim`` rows) is known as products too: ``gram_matvec`` (M = A A^T on R^m) and
    ``lift`` (A^T). Deterministic.
    """

    def __init__(self, problem: Problem, x: Tensor, products: str = "auto"):
        self.problem = problem
        self.x = x.detach()
        self.batch = x.shape[0]
        self.dz = problem.latent_dim
        self.jacobian = jacobian_products(problem, self.x, products)
        out = self.jacobian.out
        self.mu = out[:, : self.dz].detach()
        # m, the rows of A; None when G_z has no known square root (the decoder's case).
        self.gram_dim = out.shape[1] if problem.latent is None else None
        self._decoder = None
        if problem.latent is not None:
            decode = frozen_call(problem.latent.decoder)

            def decoder_outputs(z: Tensor) -> Tensor:
                mean, std = split_decoder_output(decode(z), problem.latent.sigma)
                parts = [mean.reshape(z.shape[0], -1)]
                if std is not None:
                    parts.append(std.reshape(z.shape[0], -1))
                return torch.cat(parts, dim=1)

            self._decoder = RecordedJacobian(decoder_outputs, self.mu)

    def apply_latent_metric(self, u: Tensor, index: Tensor) -> Tensor:
        """G_z u for u: (c, B', dz) -> (c, B', dz), G_z at mu(x) of the samples ``index``."""
        if self._decoder is None:
            return u
        return self._decoder.pull(self._decoder.push(u, index), index)

    def matvec(self, vectors: Tensor, index: Tensor) -> Tensor:
        """G V for V: (B', N, c) of the samples ``index`` -> (B', N, c)."""
        b, n, c = vectors.shape
        image = self.jacobian.push(vectors.permute(2, 0, 1), index)  # (c, B', m)
        heads = image.reshape(c, b, -1, self.dz)  # (c, B', 1 or 2, dz): the mu and sigma blocks
        weighted = self.apply_latent_metric(heads.transpose(1, 2).reshape(-1, b, self.dz), index)
        weighted = weighted.reshape(c, heads.shape[2], b, self.dz).transpose(1, 2).reshape(c, b, -1)
        back = self.jacobian.pull(weighted, index)  # (c, B', N)
        return back.permute(1, 2, 0)

    def lift(self, vectors: Tensor, index: Tensor) -> Tensor:
        """A^T U for U: (B', m, c) of the samples ``index`` -> (B', N, c) (no decoder only)."""
        return self.jacobian.pull(vectors.permute(2, 0, 1), index).permute(1, 2, 0)

    def gram_matvec(self, vectors: Tensor, index: Tensor) -> Tensor:
        """M U = A (A^T U) for U: (B', m, c) of the samples ``index`` -> (B', m, c) (no decoder only)."""
        back = self.lift(vectors, index).permute(2, 0, 1)  # (c, B', N)
        return self.jacobian.push(back, index).permute(1, 2, 0)


def _forward_flops(problem: Problem, device: torch.device) -> int:
    """FLOPs (2 per multiply-add; convs and matmuls) of one encoder forward on one sample."""
    x = torch.zeros(1, *problem.input_shape, dtype=problem.dtype, device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        problem.encoder(x)
    return max(int(counter.get_total_flops()), 1)


# Cost of one product (a J v and a J^T u) in forwards F, and of one autograd VJP row: ratios of
# per-product timings on the CelebA encoder (hand-written layer chain J v + J^T u; op tape
# J v + J^T u; torch.func's J^T u, the VJP row; each over one forward).
# The timings and how they were taken: BENCHMARKS.md, "Per-product costs".
CHAIN_PRODUCT_F, TAPE_PRODUCT_F, VJP_F = 2.05, 2.1, 1.2
# One sample's A (m x N) above this size is never materialised by ``auto``: the chunked API
# aims its working set at 256 MiB (api.DEFAULT_CHUNK_BYTES) and could not hold even one sample.
MATERIALISE_LIMIT_BYTES = 256 * 2**20


# ``auto`` runs Lanczos to G's whole spectrum only while that costs at most this many FLOPs per
# sample (its r + 1 products at p forwards each): a few minutes of one sample on the 2-core CPU
# of BENCHMARKS.md, where the SD VAE encoder's forward (2.7e11 FLOPs) takes about 2 s. The
# CelebA encoder's whole spectrum (r = 256) costs 0.3% of it; the SD VAE encoder's (r = 8,192
# products) ~230x it, hours, where its top 5 took 133 products (BENCHMARKS.md).
WHOLE_SPECTRUM_MAX_FLOPS = 2e13


def lanczos_mode(problem: Problem, device: torch.device | str) -> str | None:
    """What ``auto`` runs for an encoder without a layer plan: None (``autograd``, A materialised),
    "whole spectrum" (``lanczos`` until its Krylov space is invariant) or "top k" (``lanczos``
    stopped at the top k: ``complete`` false, entropy NaN; ``pullgeom.entropy_estimate`` gives it).

    Cost model per sample, F = FLOPs of one forward (FlopCounterMode on one zero sample),
    m = 2dz (dz without sigma) rows of A, N = input size, s = r + 1 products for the whole
    spectrum, p = ``CHAIN_PRODUCT_F`` or ``TAPE_PRODUCT_F`` forwards per product:

        autograd: 1.2 m F (m batched VJPs) + 2 m^2 N (Gram) + 10 m^3 (eigh)
        lanczos:  p s F + 2 s^2 m (full reorthogonalisation on the Gram M) + s^4 / 4 (eigh of T)

    With s ~ m and p > 1.2 lanczos rarely wins on FLOPs; it wins on memory (s m floats of basis
    and the recorded forward, against m N floats of A per sample), so it is chosen when one
    sample's A exceeds ``MATERIALISE_LIMIT_BYTES``, or when the model says it is cheaper (kept
    so the choice stays right if the constants change). Lanczos then runs to the whole
    spectrum (every auto path reports every eigenvalue) unless that costs more than
    ``WHOLE_SPECTRUM_MAX_FLOPS``: then it stops at the top k, which takes tens of products
    however large r is (the Stable Diffusion VAE encoder: r = 8,192, top 5 in 133 with the
    repeated-eigenvalue probe).
    """
    device = torch.device(device)
    m = (2 if problem.stochastic else 1) * problem.latent_dim
    n = problem.input_numel
    s = problem.rank + 1
    flops = _forward_flops(problem, device)
    # Layer chains that reproduce the encoder get hand-written products.
    product = CHAIN_PRODUCT_F if problem.trace.chains is not None else TAPE_PRODUCT_F
    lanczos = product * s * flops + 2 * s * s * m + s ** 4 / 4
    too_large = m * n * torch.finfo(problem.dtype).bits // 8 > MATERIALISE_LIMIT_BYTES
    if not too_large and lanczos >= VJP_F * m * flops + 2 * m * m * n + 10 * m ** 3:
        return None
    return "whole spectrum" if lanczos <= WHOLE_SPECTRUM_MAX_FLOPS else "top k"


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
    # Residuals in units of lambda_1: the norm of a raw G v squares entries of size ~lambda_1,
    # which overflows for a metric of 1e20 in float32 (y's lift A^T y is only ~sqrt(lambda)).
    unit = result.eigenvalues[:, :1].clamp_min(tiny).view(-1, 1, 1)
    for i in range(vectors.shape[2]):
        v = operator.lift(result.eigenvectors[:, :, i:i + 1], everyone)  # (B, N, 1)
        norm = v.norm(dim=1, keepdim=True)
        v = torch.where(norm > 0, v / norm.clamp_min(tiny), torch.zeros_like(v))
        theta = result.eigenvalues[:, i].view(-1, 1, 1)
        residuals[:, i] = ((operator.matvec(v, everyone) - v * theta) / unit).norm(dim=(1, 2)) * unit.view(-1)
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
    whole_spectrum: run every sample until its Krylov space is invariant (at most r + 1
    products), so ``all_eigenvalues`` is G's whole nonzero spectrum, exact to round-off; what
    ``backend="auto"`` runs while that is affordable (``lanczos_mode``). Otherwise a sample
    stops at its top k and is ``complete`` only if its Krylov space became invariant first.
    """

    name = "lanczos"
    # auto reaches it for encoders without a layer plan, through ``lanczos_mode``.
    auto_candidate = False

    def __init__(self, tol: float = 1e-5, block_size: int = 1, seed: int = 0, whole_spectrum: bool = False):
        self.tol = tol
        self.block_size = block_size
        self.seed = seed
        self.whole_spectrum = whole_spectrum

    def with_tol(self, tol: float) -> "LanczosBackend":
        """This backend with another stopping tolerance (``spectrum(..., tol=)``)."""
        return LanczosBackend(tol=tol, block_size=self.block_size, seed=self.seed, whole_spectrum=self.whole_spectrum)

    def factor(self, problem: Problem, x: Tensor) -> LowRankFactor:
        raise ValueError("backend 'lanczos' is matrix-free and never forms a factor of G; "
                         "use backend='autograd' (or 'auto') for metric()")

    def run(self, problem: Problem, x: Tensor, k: int, top_k_only: bool = False) -> LanczosResult:
        """The Lanczos result for one chunk ``x: (B, *S)`` (see ``LanczosResult``).

        Runs on the Gram M = A A^T when A is known (no decoder) and m <= N, else on G (module doc).
        ``top_k_only`` stops every sample at its top k, ``whole_spectrum`` or not.
        """
        until_exhausted = self.whole_spectrum and not top_k_only
        operator = PullbackOperator(problem, x)
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
                                generator=generator, until_exhausted=until_exhausted)
        result = lanczos_topk(operator.gram_matvec, start, k, tol=self.tol, max_steps=max_steps,
                              generator=generator, explicit_residuals=False, lifted=True,
                              until_exhausted=until_exhausted)
        return _lift(operator, result)

    def solve(self, problem: Problem, x: Tensor, k: int, top_k_only: bool = False) -> ChunkSpectrum:
        result = self.run(problem, x, k, top_k_only)
        r = problem.rank
        values = x.new_zeros(x.shape[0], r)
        ritz = result.ritz_values[:, :r]
        values[:, : ritz.shape[1]] = ritz
        values[:, :k] = result.eigenvalues
        return ChunkSpectrum(values, canonical_signs(result.eigenvectors, dim=1), result.residuals,
                             complete=result.exhausted)
