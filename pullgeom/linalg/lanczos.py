"""Batched block Lanczos for symmetric PSD operators given only as products (MATH.md 6).

This is the pure-torch reference: the ``lanczos`` backend runs it on the matrix-free pullback
metric G = A^T A or on the Gram A A^T of its factor, SLQ (``pullgeom.linalg.slq``) on probes,
and native Lanczos ops on explicit matrices are tested against it.

The operator is a batched product ``matvec(V, index) -> G V`` with ``V: (B', N, c)``, the
blocks of the samples ``index: (B',)`` (long, into the batch), so samples that have converged
are no longer multiplied. Every sample runs its own Krylov space; all share one step counter
so the basis and the block tridiagonal matrix keep fixed shapes:

    basis Q: (B, N, s)        s = b * steps, orthonormal columns or zero columns (deflated),
                              stored as rows in chunks of ~16, (B, 16, N) each: a step reads
                              them contiguously, and growing never copies the basis
    T = Q^T G Q: (B, s, s)     block tridiagonal, float64

Numerics, and why:
- Full reorthogonalisation against the whole basis each step, classical Gram-Schmidt with
  the DGKS test: another pass whenever a pass shrank the vector below 0.7 of its norm (as
  the first always does in Lanczos; a third only after heavy cancellation). The pullback
  metric has rank <= 2dz, so few steps are needed; without it Ritz values repeat (ghosts).
- Deflation: a new column whose norm after orthogonalisation is below
  ``breakdown_tol * scale`` (scale: the largest ||G q|| seen for that sample) lies in the
  span of the basis; it becomes a zero column (a zero row and column of T, i.e. a spurious
  Ritz value 0, harmless for a PSD operator). No division by a tiny norm, so no NaN.
- Breakdown: when every column of a block deflates the Krylov space is invariant (it holds
  all of the spectrum the start block can see). That is not an error: the sample restarts
  with a random block orthogonal to the basis, coupled to T by a zero block (exact, because
  the basis spans an invariant subspace). A restart block that G maps to ~0 proves the basis
  already spans G's range: the sample is ``exhausted`` and every nonzero eigenvalue of G is a
  Ritz value.
- T is assembled and diagonalised in float64 (``torch.linalg.eigh``); the basis stays in the
  working dtype.

Repeated eigenvalues (``lanczos_topk``): a Krylov space from a block of b vectors holds at most
b directions of any eigenspace, so with b = 1 every copy but one of a repeated eigenvalue is
orthogonal to the whole space (exactly, in exact arithmetic), and the top-k residuals converge
without them: {5, 5, 5, 2, 1, 0.5, ...} came back as [5, 5, 2, 1, 0.5] (issue 15, float64).
So a sample whose top k have converged is not done; it is probed:
- Probe: the pending block q is dropped and a random block z, orthogonal to the basis and to q,
  starts a new segment (``BlockLanczos.probe``; T stays exact: Q^T G z = 0). q stays as a
  "ghost": later columns are orthogonalised against it and its couplings g^T G q_j join the
  residual estimates, which stay exact. The segment is Lanczos on G compressed to the
  complement of basis and ghosts, where every missed eigenvector lies, from a start uniform on
  that complement's sphere: its component along a missed eigenvector is nonzero with
  probability 1, so its top Ritz value rises to the largest missed eigenvalue.
- Decision, once the top k have converged again: the segment's top Ritz value theta' is
  settled when its residual is <= the same tolerance (``tol * theta_1``), or when
  theta' <= (1 - epsilon_j) theta_k, epsilon_j the Kuczynski-Wozniakowski margin after j segment
  steps at failure probability ``PROBE_FAILURE`` (``probe_margin``: a missed eigenvalue above
  theta_k would have lifted theta' above that with probability >= 1 - 1e-3, whatever the
  spectrum). Settled at <= theta_k + tol * theta_1: nothing missed, the sample stops. Settled
  above: the probe found a copy (there may be more), probe again.
- Round-off: in floating point a Krylov space grows missed copies out of round-off (float32
  faster), partly, and the newest vector -- the one a probe drops -- can hold much of one; then
  neither basis nor probe sees it. Before a sample stops, the basis and the ghosts together are
  checked (``with_ghosts``: one product of the ghosts): a Ritz value there above theta_k
  + tol * theta_1 revives the ghost (``revive``: it joins the basis exactly, its coupling row is
  known, and its chain continues); a top-k pair whose residual lies along a ghost is revived
  likewise. A sample whose basis runs out of room with ghosts left ends with Rayleigh-Ritz on
  basis and ghosts together, G's whole spectrum when they span R^N (small Grams); one that runs
  out of steps stops unconverged (``converged`` False), not silently wrong.
Cost: the probe's steps (until its top settles) and one product per ghost: measured +7 to +9
products where Lanczos took 13-20, +17 on the CelebA encoder's 50, +30 on a flat spectrum's 110;
BENCHMARKS.md ("Lanczos probes for repeated eigenvalues") has the counts. ``until_exhausted``
runs need no probes (breakdown restarts already reach every eigenvalue).

Results are deterministic for a given ``generator`` seed (start, restart and probe blocks are
drawn from it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

Matvec = Callable[[Tensor, Tensor], Tensor]

# The probability that a probe misses an eigenvalue above theta_k (``probe_margin``), per probe.
PROBE_FAILURE = 1e-3


def dense_matvec(matrices: Tensor) -> Matvec:
    """The ``matvec`` of explicit symmetric matrices ``(B, N, N)``: for tests and the native op's parity."""
    return lambda vectors, index: matrices[index] @ vectors


def default_breakdown_tol(dtype: torch.dtype) -> float:
    """Relative size below which a new Lanczos direction counts as already in the basis.

    1000 eps: a product in float32 through a deep network carries relative round-off of
    ~1e-6 (measured on the CelebA conv encoder: jvp/vjp against float64, 4e-7), so 1.2e-4
    leaves a margin; in float64 it is 2.2e-13.
    """
    return 1000.0 * torch.finfo(dtype).eps


@dataclass
class LanczosResult:
    """Top-k eigenpairs of every sample's operator and the Krylov data behind them.

    eigenvalues: (B, k) descending Ritz values, clamped >= 0; eigenvectors: (B, N, k) unit
    Ritz vectors (zero where the Ritz value is 0: G does not single out a null direction);
    residuals: (B, k) ||G y - theta y|| (explicit products if asked for, else the Lanczos
    estimate ||B_next S_last||, equal in exact arithmetic); ritz_values: (B, s) every Ritz
    value, descending, clamped >= 0 -- by Cauchy interlacing the i-th is a lower bound on the
    i-th eigenvalue of G, exact for all i when ``exhausted``; converged: (B,) top-k residuals
    met the tolerance and no probe found a missed copy; exhausted: (B,) the basis spans G's
    range; steps: (B,) block products spent on each sample (restarts, probes and ghost checks
    included).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    ritz_values: Tensor
    converged: Tensor
    exhausted: Tensor
    steps: Tensor


class BlockLanczos:
    """The Lanczos process state for a batch; ``step()`` adds one block to every active sample.

    start: (B, N, b) start blocks (orthonormalised here; zero columns are deflated).
    Use ``lanczos_topk`` or ``pullgeom.linalg.slq`` rather than this class directly.
    """

    def __init__(self, matvec: Matvec, start: Tensor, *, breakdown_tol: float | None = None,
                 restart: bool = True, generator: torch.Generator | None = None,
                 initial_capacity: int = 32):
        self.matvec = matvec
        self.batch, self.n, self.b = start.shape
        self.dtype, self.device = start.dtype, start.device
        self.breakdown_tol = default_breakdown_tol(self.dtype) if breakdown_tol is None else breakdown_tol
        self.restart = restart
        self.generator = generator
        self.max_columns = self.n  # an orthonormal basis of R^N has N columns
        capacity = min(max(initial_capacity, 2 * self.b), self.max_columns + self.b)
        self.chunk = self.b * math.ceil(16 / self.b)  # a block never straddles two chunks
        self.chunks: list[Tensor] = []
        self.tridiagonal = torch.zeros(self.batch, capacity, capacity, dtype=torch.float64,
                                       device=self.device)
        self.used = 0  # columns of the basis already multiplied (T is known on [:used, :used])
        self.scale = torch.zeros(self.batch, dtype=self.dtype, device=self.device)
        self.active = torch.ones(self.batch, dtype=torch.bool, device=self.device)
        self.exhausted = torch.zeros_like(self.active)
        self.broke = torch.zeros_like(self.active)  # the last step found an invariant subspace
        self.is_restart = torch.zeros_like(self.active)  # the pending block is a restart block
        self.last = torch.zeros(self.batch, dtype=torch.long, device=self.device)  # last block's column
        self.steps = torch.zeros(self.batch, dtype=torch.long, device=self.device)
        self.coupling = torch.zeros(self.batch, self.b, self.b, dtype=torch.float64, device=self.device)
        # Probes (``probe``): the dropped pending blocks ("ghosts", (B, b, N) each, zero rows for the
        # samples that did not probe then) and their couplings g^T G q to every basis column
        # ((B, b, capacity) each, float64): the ghosts stay orthogonal to all later columns, and
        # their couplings are the residual the basis no longer absorbs (``residual_estimates``).
        self.ghosts: list[Tensor] = []
        self.ghost_coupling: list[Tensor] = []
        self.ghost_count = torch.zeros(self.batch, dtype=torch.long, device=self.device)
        self.segment_start = torch.zeros(self.batch, dtype=torch.long, device=self.device)
        # A probe block that G maps to ~0 after ghosts were dropped: the complement of basis and
        # ghosts is in G's null space (the probe found nothing), but the ghosts' own directions
        # are not in T, so this is not ``exhausted``; ``lanczos_topk`` checks the ghosts.
        self.cleared = torch.zeros_like(self.active)
        self.revived = torch.zeros_like(self.active)  # the current segment starts from a ghost
        self.full = torch.zeros_like(self.active)  # stopped for want of room (the basis fills R^N)
        start = torch.where(torch.isfinite(start), start, torch.zeros_like(start))
        self.pending = self._orthonormalise(start, start.norm(dim=1).amax(dim=1), self.active)

    # -- basis bookkeeping -----------------------------------------------------------------

    def _grow(self, columns: int) -> None:
        while len(self.chunks) * self.chunk < columns:
            self.chunks.append(self._new_chunk())
        capacity = self.tridiagonal.shape[1]
        if columns > capacity:
            new_capacity = max(columns, 2 * capacity)
            tri = self.tridiagonal.new_zeros(self.batch, new_capacity, new_capacity)
            tri[:, :capacity, :capacity] = self.tridiagonal
            self.tridiagonal = tri
            self.ghost_coupling = [torch.nn.functional.pad(c, (0, new_capacity - capacity))
                                   for c in self.ghost_coupling]

    def _new_chunk(self) -> Tensor:
        return torch.zeros(self.batch, self.chunk, self.n, dtype=self.dtype, device=self.device)

    def _rows(self, columns: int) -> list[Tensor]:
        """The first ``columns`` basis vectors as row blocks [(B, <= chunk, N), ...]."""
        return [chunk[:, : min(self.chunk, columns - i * self.chunk)]
                for i, chunk in enumerate(self.chunks) if i * self.chunk < columns]

    def basis(self, columns: int | None = None) -> Tensor:
        """The first ``columns`` (default: all multiplied) basis vectors as columns: (B, N, s)."""
        rows = self._rows(self.used if columns is None else columns)
        if not rows:
            return torch.zeros(self.batch, self.n, 0, dtype=self.dtype, device=self.device)
        return torch.cat(rows, dim=1).transpose(1, 2)

    def combine(self, coefficients: Tensor) -> Tensor:
        """Q @ coefficients for coefficients (B, s, k) over the first s columns: (B, N, k)."""
        out = coefficients.new_zeros(self.batch, self.n, coefficients.shape[2])
        start = 0
        for rows in self._rows(coefficients.shape[1]):
            out = out + rows.transpose(1, 2) @ coefficients[:, start:start + rows.shape[1]]
            start += rows.shape[1]
        return out

    @staticmethod
    def _project_out(w: Tensor, row_blocks: list[Tensor]) -> Tensor:
        """w (B, N, 1) minus its projection on the span of the rows of ``row_blocks``, DGKS-iterated."""
        row_blocks = [rows for rows in row_blocks if rows.shape[1]]
        if not row_blocks:
            return w
        # Row-vector products: (1, N) x (N, s) and (1, s) x (s, N) read the rows contiguously,
        # about 4x and 11x faster on CPU than the two column forms (BENCHMARKS.md, "measurements
        # behind design choices").
        w_row = w.transpose(1, 2)
        norm = w_row.norm(dim=2)
        for _ in range(3):
            for rows in row_blocks:
                w_row = w_row - (w_row @ rows.transpose(1, 2)) @ rows
            shrunk = w_row.norm(dim=2)
            if not (shrunk < 0.7 * norm).any():
                break
            norm = shrunk
        return w_row.transpose(1, 2)

    def _orthonormalise(self, w: Tensor, scale: Tensor, keep_mask: Tensor) -> Tensor:
        """Columns of w (B, N, c) orthonormal to the basis and to each other; deflated ones zero.

        scale: (B,) the norm a column is compared with; keep_mask: (B,) samples allowed
        new directions at all.
        """
        basis = self._rows(self.used) + self.ghosts
        columns: list[Tensor] = []
        threshold = (self.breakdown_tol * scale).unsqueeze(-1)
        tiny = torch.finfo(w.dtype).tiny
        for c in range(w.shape[2]):
            done = [torch.cat(columns, dim=2).transpose(1, 2)] if columns else []
            col = self._project_out(self._project_out(w[:, :, c:c + 1], basis), done)
            norm = col.norm(dim=1, keepdim=True)  # (B, 1, 1)
            keep = (norm > threshold.unsqueeze(-1)) & keep_mask.view(-1, 1, 1)
            col = torch.where(keep, col / norm.clamp_min(tiny), torch.zeros_like(col))
            if (keep & (norm < 1e-3 * w[:, :, c:c + 1].norm(dim=1, keepdim=True))).any():
                # Survived heavy cancellation: the normalised column carries the round-off of the
                # subtraction magnified by ||w|| / norm (measured: 4e-6 loss of orthogonality in
                # float64 as a Krylov space saturates); one more projection restores eps.
                col = self._project_out(self._project_out(col, basis), done)
                col = col / col.norm(dim=1, keepdim=True).clamp_min(tiny)
            columns.append(col)
        return torch.cat(columns, dim=2)

    def _random_block(self) -> Tensor:
        return torch.randn(self.batch, self.n, self.b, dtype=self.dtype, device=self.device,
                           generator=self.generator)

    # -- the step ----------------------------------------------------------------------------

    def step(self) -> None:
        """Multiply the pending block of every active sample and extend basis and T by it."""
        b, j0 = self.b, self.used
        self._grow(j0 + 2 * b)
        # A sample that stopped since its pending block was formed must not grow: its block and
        # the coupling written for it become zero (a zero block adds only spurious zero Ritz values).
        stopped = ~self.active
        block = torch.where(stopped.view(-1, 1, 1), torch.zeros_like(self.pending), self.pending)
        self.tridiagonal[stopped, j0:j0 + b, :] = 0
        self.tridiagonal[stopped, :, j0:j0 + b] = 0
        chunk, offset = divmod(j0, self.chunk)
        self.chunks[chunk][:, offset:offset + b] = block.transpose(1, 2)
        self.used = j0 + b
        multiplied = self.active.clone()
        index = multiplied.nonzero().squeeze(1)
        product = torch.zeros_like(block)
        product[index] = self.matvec(block[index], index)
        self.steps += self.active.long()
        self.last = torch.where(self.active, j0, self.last)
        self.scale = torch.maximum(self.scale, product.norm(dim=1).amax(dim=1))
        diagonal = block.transpose(1, 2) @ product
        for ghost, coupling in zip(self.ghosts, self.ghost_coupling, strict=True):
            coupling[:, :, j0:j0 + b] = (ghost @ product).double()
        self.tridiagonal[:, j0:j0 + b, j0:j0 + b] = 0.5 * (diagonal + diagonal.transpose(1, 2)).double()
        # A restart block that G maps to (nearly) zero: the basis already spans G's range.
        image_norm = product.norm(dim=1).amax(dim=1)
        null_image = self.active & self.is_restart & (image_norm <= self.breakdown_tol * self.scale)
        ghosted = self.ghost_count > 0
        self.exhausted |= null_image & ~ghosted
        self.cleared |= null_image & ghosted
        self.active &= ~(null_image & ~ghosted)
        # Basis columns are orthogonal to the ghosts, so past N - ghosts they are zero (deflated).
        if self.used + b > self.max_columns:
            # No room for another block. A basis of N nonzero orthonormal columns spans R^N, so
            # T holds the whole spectrum; one with deflated (zero) columns stops unconverged.
            nonzero = sum((rows.abs().amax(dim=2) > 0).sum(dim=1) for rows in self._rows(self.used))
            spans = nonzero >= self.n
            self.exhausted |= self.active & spans
            self.full |= self.active
            self.active &= torch.zeros_like(self.active)
        next_block = self._orthonormalise(product, self.scale, self.active)
        coupling = (next_block.transpose(1, 2) @ product).double()  # B_{j+1} = Q_{j+1}^T G Q_j
        # Samples that stopped keep the coupling of their last block (their residual estimates).
        self.coupling = torch.where(multiplied.view(-1, 1, 1), coupling, self.coupling)
        self.broke = self.active & (next_block.abs().amax(dim=(1, 2)) == 0)
        self.is_restart = self.broke & self.restart
        if self.restart and self.broke.any():
            fresh = self._orthonormalise(self._random_block(), torch.ones_like(self.scale), self.broke)
            next_block = torch.where(self.broke.view(-1, 1, 1), fresh, next_block)
            coupling = torch.where(self.broke.view(-1, 1, 1), torch.zeros_like(coupling), coupling)
            self.segment_start = torch.where(self.broke, j0 + b, self.segment_start)
            self.revived &= ~self.broke
        elif self.broke.any():
            self.active &= ~self.broke
        self.tridiagonal[:, j0 + b:j0 + 2 * b, j0:j0 + b] = coupling
        self.tridiagonal[:, j0:j0 + b, j0 + b:j0 + 2 * b] = coupling.transpose(1, 2)
        self.pending = next_block

    def probe(self, mask: Tensor, start: Tensor | None = None) -> None:
        """Replace the pending block of the samples in ``mask`` (B,) by a random block orthogonal to
        the basis and to the dropped block, which becomes a ghost.

        Exact, not an approximation: with Q the basis, q the dropped block and z the new one,
        Q^T G z = (G Q)^T z = (Q T + q B_next E^T)^T z = 0 because z is orthogonal to Q and to q,
        so the zero coupling written between Q and z is Q^T G z itself and T stays the exact
        Rayleigh quotient of the union. What the basis no longer holds is q: it stays as a ghost,
        every later column is orthogonalised against it, and its couplings g^T G q_j (B_next for
        the last block, the projection coefficients for later ones) enter the residual estimates.
        The new block starts a segment: the Krylov space of z under the operator compressed to the
        complement of basis and ghosts, where every eigenvector the basis missed lies.
        start: (B, N, b) orthonormal and orthogonal to basis and ghosts, instead of a random block
        (``revive``).
        """
        if not mask.any():
            return
        j0, b = self.used, self.b
        self._grow(j0 + 2 * b)
        capacity = self.tridiagonal.shape[1]
        keep = mask.view(-1, 1, 1)
        ghost = torch.where(keep, self.pending, torch.zeros_like(self.pending)).transpose(1, 2)
        coupling = torch.zeros(self.batch, b, capacity, dtype=torch.float64, device=self.device)
        columns = self.last.view(-1, 1, 1) + torch.arange(b, device=self.device).view(1, 1, -1)
        coupling.scatter_(2, columns.expand(-1, b, -1), torch.where(keep, self.coupling,
                                                                   torch.zeros_like(self.coupling)))
        self.ghosts.append(ghost)
        self.ghost_coupling.append(coupling)
        self.ghost_count += (ghost.abs().amax(dim=2) > 0).sum(dim=1)
        if start is None:
            start = self._orthonormalise(self._random_block(), torch.ones_like(self.scale), mask)
        self.pending = torch.where(keep, start, self.pending)
        self.coupling = torch.where(keep, torch.zeros_like(self.coupling), self.coupling)
        self.tridiagonal[mask, j0:j0 + b, :] = 0
        self.tridiagonal[mask, :, j0:j0 + b] = 0
        self.is_restart |= mask
        self.revived &= ~mask
        self.cleared &= ~mask
        self.segment_start = torch.where(mask, j0, self.segment_start)

    def revive(self, mask: Tensor, vectors: Tensor) -> None:
        """Start a segment from a ghost for the samples in ``mask`` (B,): the one most coupled to
        the Ritz vectors ``vectors`` (B, s, k); the pending block becomes a ghost in its place.

        In floating point a Krylov space picks up copies of a repeated eigenvalue from round-off,
        partly, so an eigenvector the probe segment converges to can lean on a ghost, and no
        segment orthogonal to that ghost can finish it (its residual along the ghost stays). The
        ghost is orthogonal to basis and other ghosts and its couplings to every basis column are
        known, so it joins the basis exactly: T gains that row, and the ghost's own Krylov chain
        (the dropped one) continues from it.
        """
        if not mask.any():
            return
        j0, b = self.used, self.b
        self._grow(j0 + 2 * b)
        s = vectors.shape[1]
        shares = torch.stack([(c[:, :, :s] @ vectors).norm(dim=(1, 2)) for c in self.ghost_coupling], dim=1)
        chosen = shares.argmax(dim=1)  # (B,) which probe event's ghost
        keep = mask.view(-1, 1, 1)
        revived = torch.zeros_like(self.pending)
        row = torch.zeros(self.batch, b, j0, dtype=torch.float64, device=self.device)
        for r, (ghost, coupling) in enumerate(zip(self.ghosts, self.ghost_coupling, strict=True)):
            take = mask & (chosen == r)
            if not take.any():
                continue
            t = take.view(-1, 1, 1)
            revived = torch.where(t, ghost.transpose(1, 2), revived)
            row = torch.where(t, coupling[:, :, :j0], row)
            self.ghost_count -= torch.where(take, (ghost.abs().amax(dim=2) > 0).sum(dim=1), 0)
            ghost.copy_(torch.where(t, torch.zeros_like(ghost), ghost))
            coupling.copy_(torch.where(t, torch.zeros_like(coupling), coupling))
        self.probe(mask, start=revived)
        self.tridiagonal[:, j0:j0 + b, :j0] += torch.where(keep, row, torch.zeros_like(row))
        self.tridiagonal[:, :j0, j0:j0 + b] += torch.where(keep, row, torch.zeros_like(row)).transpose(1, 2)
        self.is_restart &= ~mask  # G g ~ 0 for a ghost says nothing about G's range
        self.revived |= mask

    def with_ghosts(self, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Rayleigh-Ritz on the basis and the ghosts together, for the samples in ``mask`` (zeros
        elsewhere): values (B, s + R) descending and coefficient vectors (B, s + R, s + R) as
        columns (``combine_with_ghosts``); one product of width R (the ghost rows) per sample.

        Basis and ghosts are orthonormal, and Q^T G g is the ghosts' coupling row, so only g^T G g
        is new. In floating point a Krylov space grows a missed copy out of round-off, and its
        newest vector -- the one a probe drops -- can hold most of it: then neither the basis nor
        the probe's complement sees that copy, and only this check does.
        """
        index = mask.nonzero().squeeze(1)
        rows = torch.cat(self.ghosts, dim=1)  # (B, R, N)
        s, r = self.used, rows.shape[1]
        full = torch.zeros(self.batch, s + r, s + r, dtype=torch.float64, device=self.device)
        full[:, :s, :s] = self.tridiagonal[:, :s, :s]
        coupling = torch.cat([c[:, :, :s] for c in self.ghost_coupling], dim=1)
        full[:, s:, :s] = coupling
        full[:, :s, s:] = coupling.transpose(1, 2)
        image = self.matvec(rows[index].transpose(1, 2), index)
        inner = (rows[index] @ image).double()
        full[index, s:, s:] = 0.5 * (inner + inner.transpose(1, 2))
        self.steps[index] += 1
        values, vectors = torch.linalg.eigh(full[index])
        out_values = torch.zeros(self.batch, s + r, dtype=torch.float64, device=self.device)
        out_vectors = torch.zeros(self.batch, s + r, s + r, dtype=torch.float64, device=self.device)
        out_values[index], out_vectors[index] = values.flip(-1), vectors.flip(-1)
        return out_values, out_vectors

    def combine_with_ghosts(self, coefficients: Tensor) -> Tensor:
        """[Q, ghosts] @ coefficients for coefficients (B, s + R, k) from ``with_ghosts``: (B, N, k)."""
        s = self.used
        rows = torch.cat(self.ghosts, dim=1)
        return self.combine(coefficients[:, :s]) + rows.transpose(1, 2) @ coefficients[:, s:]

    @property
    def probing(self) -> Tensor:
        """(B,) the current segment started from a random block (a probe or a breakdown restart)
        orthogonal to everything before it (not a revived ghost, coupled to earlier columns)."""
        return (self.segment_start > 0) & ~self.revived

    def ritz(self) -> tuple[Tensor, Tensor]:
        """Ritz values (B, s) descending and vectors of T (B, s, s) as columns, float64."""
        tri = self.tridiagonal[:, : self.used, : self.used]
        values, vectors = torch.linalg.eigh(tri)
        return values.flip(-1), vectors.flip(-1)

    def segment_top(self) -> tuple[Tensor, Tensor]:
        """The largest Ritz value (B,) of the current segment (the columns since the last restart
        or probe: T is block diagonal across segments) and its residual estimate (B,)."""
        tri = self.tridiagonal[:, : self.used, : self.used]
        inside = torch.arange(self.used, device=self.device).view(1, -1) >= self.segment_start.view(-1, 1)
        mask = (inside.unsqueeze(2) & inside.unsqueeze(1)).double()
        values, vectors = torch.linalg.eigh(tri * mask)
        residual = self.residual_estimates(vectors[:, :, -1:])[:, 0]
        # A segment whose first block is still pending has no Ritz pair yet: nothing is settled.
        empty = self.segment_start >= self.used
        return values[:, -1], torch.where(empty, torch.full_like(residual, math.inf), residual)

    def residual_parts(self, vectors: Tensor) -> tuple[Tensor, Tensor]:
        """For Ritz vectors of T given as columns (B, s, k): the residual's parts (B, k) along the
        next block, ||B_next S_last||, and along the ghosts, ||C S|| (C: their couplings)."""
        rows = self.last.view(-1, 1, 1) + torch.arange(self.b, device=self.device).view(1, -1, 1)
        last = vectors.gather(1, rows.expand(-1, -1, vectors.shape[2]))
        own = (self.coupling @ last).norm(dim=1)
        if not self.ghost_coupling:
            return own, torch.zeros_like(own)
        s = vectors.shape[1]
        return own, (torch.cat([c[:, :, :s] for c in self.ghost_coupling], dim=1) @ vectors).norm(dim=1)

    def residual_estimates(self, vectors: Tensor) -> Tensor:
        """||G y - theta y|| for Ritz vectors of T given as columns (B, s, k).

        G Q = Q T + Q_next B_next E^T + sum over ghosts g (g^T G Q), and the ghosts, Q and Q_next
        are mutually orthogonal, so the two ``residual_parts`` add in squares.
        """
        own, ghost = self.residual_parts(vectors)
        return (own ** 2 + ghost ** 2).sqrt()

def _unit_scaled(matvec: Matvec, batch: int, start: Tensor) -> tuple[Matvec, Tensor]:
    """``matvec`` divided per sample by a scale set on its first call, and that scale (B,).

    The scale is the largest entry of the first product (of every sample's start block), so the
    process works on an operator of norm ~1 whatever G's size: norms square their entries, which
    overflow past ~1e19 (float32) / 1e154 (float64) and underflow below ~1e-19 / 1e-154 (a metric
    of 1e20 would otherwise come out as zeros). Exact: the eigenvectors of G / c are G's.
    """
    scale = torch.ones(batch, dtype=start.dtype, device=start.device)
    first = True

    def scaled(vectors: Tensor, index: Tensor) -> Tensor:
        nonlocal first
        image = matvec(vectors, index)
        if first:
            first = False
            largest = image.abs().amax(dim=(1, 2))
            scale[index] = torch.where(largest > 0, largest, torch.ones_like(largest))
        return image / scale[index].view(-1, 1, 1)

    return scaled, scale


def probe_margin(process: BlockLanczos, failure: float = PROBE_FAILURE) -> Tensor:
    """(B,) the epsilon with P(theta'_1 < (1 - epsilon) lambda'_1) <= ``failure`` for the current segment.

    Kuczynski & Wozniakowski (1992, Thm 4.2(a)): j steps of Lanczos from a start uniform on the
    unit sphere of R^n give a top Ritz value theta'_1 < (1 - epsilon) lambda'_1 with probability
    at most 1.648 sqrt(n) exp(-sqrt(epsilon) (2j - 1)), whatever the spectrum. A probe segment is
    such a run on G compressed to the complement of basis and ghosts (dimension n' = N minus
    both), from a Gaussian vector projected there, which is uniform on that sphere.
    """
    steps = ((process.used - process.segment_start) // process.b).clamp_min(1).double()
    dimension = (process.n - process.segment_start - process.ghost_count).clamp_min(1).double()
    root = torch.log(1.648 * dimension.sqrt() / failure) / (2 * steps - 1)
    return (root ** 2).to(process.scale.dtype).clamp_max(1)


def lanczos_topk(matvec: Matvec, start: Tensor, k: int, *, tol: float = 1e-5, max_steps: int | None = None,
                 breakdown_tol: float | None = None, generator: torch.Generator | None = None,
                 explicit_residuals: bool = True, lifted: bool = False,
                 until_exhausted: bool = False) -> LanczosResult:
    """Top-k eigenpairs of a batch of symmetric PSD operators given by ``matvec``.

    matvec: (V: (B', N, c), index: (B',)) -> G V; start: (B, N, b) start blocks (b is the
    block size). A sample stops when its top-k Ritz residual estimates are <= ``tol * theta_1``
    (relative to its largest Ritz value: an eigenvalue error of about residual^2 / gap, and at
    most the residual) and a probe has found no copy of a repeated eigenvalue missing from its
    top k (module doc, "Repeated eigenvalues"), when its basis spans G's range (``exhausted``),
    or, unconverged, after ``max_steps`` block products (default: enough for the basis to fill
    R^N) or when basis and ghosts fill R^N. ``steps`` counts every block product, probes and
    ghost checks included. ``explicit_residuals`` spends one
    more product of width k per sample on ||G y - theta y||. ``until_exhausted``: ignore ``tol``
    and run each sample until its basis spans G's range, so every Ritz value is an eigenvalue
    (the whole nonzero spectrum; at most rank + 1 products without repeated eigenvalues).

    lifted: the operator is a Gram M = A A^T whose Ritz vectors y the caller lifts to
    v = A^T y / sqrt(theta), eigenvectors of A^T A (the ``lanczos`` backend). Their residual is
    ||A^T r|| / sqrt(theta) with r = M y - theta y, and ||A^T r||^2 = r^T M r <= lambda_1 ||r||^2,
    so a pair stops at ||r|| <= tol * sqrt(theta_1 theta): then both ||r|| (what bounds the
    eigenvalue error) and the lifted residual are <= tol * theta_1 (up to theta_1 ~ lambda_1).
    The bound is loose (r is nearly orthogonal to the converged top eigenvectors), but cheap:
    on simulated Grams with eigenvalues i^-1, i^-2 and e^(-i/3) (m = 256, k = 5, tol 1e-5) it
    took at most one step more than stopping on ||r|| <= tol * theta_1.
    """
    batch, n, b = start.shape
    if k < 1 or k > n:
        raise ValueError(f"k={k} must be in [1, N={n}]")
    limit = math.ceil(n / b) + 1 if max_steps is None else max_steps
    scaled, operator_scale = _unit_scaled(matvec, batch, start)
    process = BlockLanczos(scaled, start, breakdown_tol=breakdown_tol, generator=generator)
    converged = torch.zeros(batch, dtype=torch.bool, device=start.device)
    small = torch.zeros_like(converged)
    stopped = torch.zeros_like(converged)
    for _ in range(limit):
        if not process.active.any():
            break
        process.step()
        values, vectors = process.ritz()
        top = min(k, values.shape[1])
        estimates = process.residual_estimates(vectors[:, :, :top])
        theta = values.clamp_min(0)
        bound = tol * (theta[:, :1] * theta[:, :top]).sqrt() if lifted else tol * theta[:, :1]
        small = (estimates <= bound).all(dim=1) & (values.shape[1] >= k)
        if until_exhausted:
            continue
        # A k-th Ritz value below the resolution (tol theta_1) may approximate one of G's zero
        # eigenvalues while a small nonzero one is still outside the Krylov space: it is not
        # certified as the k-th largest, so such a sample ends only by exhaustion.
        resolved = theta[:, top - 1] > tol * theta[:, 0]
        # A sample that just ran out of room gets its verdict now, probe included.
        just_full = process.full & ~stopped
        stopped |= just_full
        ready = (process.active | just_full) & small & resolved
        if process.ghosts:
            # Stalled on a ghost (``revive``): a top-k pair whose residual lies along the ghosts
            # while its own part has converged; only putting the ghost back in the basis helps.
            own, along_ghosts = process.residual_parts(vectors[:, :, :top])
            stalled = (process.active & ~small
                       & (((along_ghosts > bound) & (own <= bound)).any(dim=1) | process.cleared))
            process.revive(stalled, vectors[:, :, :top])
        if not ready.any():
            continue
        # Converged residuals cannot see a copy of a repeated eigenvalue the Krylov space missed
        # (module doc, "Repeated eigenvalues"): a sample is certified only by a probe segment whose
        # top Ritz value has settled at or below theta_k, and by the ghost check.
        segment_value, segment_residual = process.segment_top()
        segment_value = segment_value.clamp_min(0)
        segment_bound = (tol * (theta[:, 0] * segment_value).sqrt() if lifted else tol * theta[:, 0])
        # Settled: converged; or below theta_k by more than a missed eigenvalue's Ritz value could
        # be after this many steps (Kuczynski-Wozniakowski, ``probe_margin``); or the segment
        # spans the complement of basis and ghosts, where a missed eigenvector lies (no room
        # left, or G maps that complement to 0: ``cleared``), so its Ritz values there are exact.
        below = ((segment_value <= (1 - probe_margin(process)) * theta[:, top - 1])
                 & (process.segment_start < process.used))
        settled = process.probing & ((segment_residual <= segment_bound) | below | just_full
                                     | process.cleared)
        clear = settled & (segment_value <= theta[:, top - 1] + tol * theta[:, 0])
        candidates = ready & clear
        if candidates.any() and process.ghosts:
            extended = process.with_ghosts(candidates)[0].clamp_min(0)
            hidden = extended[:, top - 1] > theta[:, top - 1] + tol * theta[:, 0]
            hidden &= candidates
            process.revive(hidden & process.active, vectors[:, :, :top])
            clear &= ~hidden
            ready &= ~hidden  # continues from the revived ghost, no new probe yet
        newly = ready & clear
        converged |= newly
        process.active &= ~newly
        # Not probed yet, or the last probe found a copy above theta_k (there may be more): probe.
        process.probe(ready & process.active & ~clear & (~process.probing | settled))
    values, vectors = process.ritz()
    s = values.shape[1]
    if s < k:  # fewer Ritz values than asked (tiny N or max_steps): pad with certified-nothing zeros
        values = torch.cat([values, values.new_zeros(batch, k - s)], dim=1)
        vectors = torch.cat([vectors, vectors.new_zeros(batch, s, k - s)], dim=2)
    values = values.clamp_min(0) * operator_scale.double().unsqueeze(1)  # eigenvalues of G, unscaled
    theta = values[:, :k]
    ritz_vectors = process.combine(vectors[:, :, :k].to(start.dtype))
    # A Ritz value at the round-off floor belongs to a deflated or null direction.
    floor = (process.breakdown_tol * process.scale * operator_scale).double().unsqueeze(1)
    nonzero = theta > floor
    norms = ritz_vectors.norm(dim=1, keepdim=True)
    ritz_vectors = torch.where(nonzero.unsqueeze(1) & (norms > 0), ritz_vectors / norms.clamp_min(1e-30),
                               torch.zeros_like(ritz_vectors))
    theta = torch.where(nonzero, theta, torch.zeros_like(theta))
    # Out of room with ghosts: basis and ghosts may together span R^N, and then Rayleigh-Ritz on
    # both (one product of the ghosts) is G's whole spectrum, whatever the probes had reached.
    finish = process.full & (process.ghost_count > 0) & ~converged
    if finish.any():
        nonzero = sum((rows.abs().amax(dim=2) > 0).sum(dim=1) for rows in process._rows(process.used))
        finish &= nonzero + process.ghost_count >= n
    if finish.any():
        ext_values, ext_vectors = process.with_ghosts(finish)
        ext_values = ext_values.clamp_min(0) * operator_scale.double().unsqueeze(1)
        width = min(values.shape[1], ext_values.shape[1])
        values[finish, :width] = ext_values[finish, :width]
        theta = torch.where(finish.unsqueeze(1), ext_values[:, :k], theta)
        lifted_vectors = process.combine_with_ghosts(ext_vectors[:, :, :k].to(start.dtype))
        ritz_vectors = torch.where(finish.view(-1, 1, 1), lifted_vectors, ritz_vectors)
        process.exhausted |= finish
    if explicit_residuals or finish.any():
        index = torch.arange(batch, device=start.device)
        unit = operator_scale.view(-1, 1, 1)
        image = scaled(ritz_vectors, index)  # G / scale: its norm cannot overflow
        residual = image - ritz_vectors * (theta.to(image.dtype).unsqueeze(1) / unit)
        residuals = residual.norm(dim=1) * unit[:, 0]
    if not explicit_residuals:
        estimates = (process.residual_estimates(vectors[:, :, :k]) * operator_scale.double().unsqueeze(1)
                     ).to(start.dtype)
        residuals = torch.where(finish.unsqueeze(1), residuals, estimates) if finish.any() else estimates
    return LanczosResult(
        eigenvalues=theta.to(start.dtype),
        eigenvectors=ritz_vectors,
        residuals=residuals,
        ritz_values=values.to(start.dtype),
        converged=converged | process.exhausted | (process.cleared & small),
        exhausted=process.exhausted,
        steps=process.steps,
    )
