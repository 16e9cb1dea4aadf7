"""One step of the reverse layer chain as a batched Triton matmul with the diagonal fused in.

    out[b] = (a[b] * scale[b][None, :]) @ w[b]        a: (B, M, K), scale: (B, K), w: (K, N)

The MLP chain (MATH.md 2) needs R <- (R D_l) W_l per layer, with D_l = diag(act'(pre_l)) per
sample and W_l shared: scaling the rows while they are loaded saves a full (B, r, w_l) pass
through memory per layer. The same kernel forms the Gram T L^T (no scale, ``w`` a transposed
per-sample view), since it takes arbitrary strides and a batch stride of 0 for a shared ``w``.

Op: ``torch.ops.pullgeom.triton_scaled_matmul(rows, scale, weight)``; its CPU kernel (plain
torch, registered unless ``TRITON_INTERPRET=1`` asks for the Triton kernel on CPU) is
``scaled_matmul_reference``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from pullgeom.kernels.triton import interpreting

FLOAT_DTYPES = (torch.float32, torch.float64)


@triton.jit
def scaled_bmm_kernel(
    a_ptr, scale_ptr, w_ptr, out_ptr, M, N, K,
    stride_ab, stride_am, stride_ak, stride_sb, stride_sk,
    stride_wb, stride_wk, stride_wn, stride_ob, stride_om, stride_on,
    HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid (B * tiles of M x N,): one BLOCK_M x BLOCK_N tile of out[b] per program."""
    # int64: batch * stride overflows int32 at B * r * w >= 2^31 (10,000 samples x 64 x 4096).
    pid = tl.program_id(0).to(tl.int64)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles = tl.cdiv(M, BLOCK_M) * tiles_n
    batch = pid // tiles
    tile = pid % tiles
    offs_m = (tile // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (tile % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_base = a_ptr + batch * stride_ab
    w_base = w_ptr + batch * stride_wb
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=out_ptr.dtype.element_ty)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        a = tl.load(a_base + offs_m[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=(offs_m[:, None] < M) & (ks[None, :] < K), other=0.0)
        if HAS_SCALE:
            s = tl.load(scale_ptr + batch * stride_sb + ks * stride_sk, mask=ks < K, other=0.0)
            a = a * s[None, :]
        w = tl.load(w_base + ks[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                    mask=(ks[:, None] < K) & (offs_n[None, :] < N), other=0.0)
        # "ieee": TF32 (10-bit mantissa) would cost ~1e-3 relative error in the Gram, ten
        # times the 1e-4 the eigenvalues must meet. out_dtype: triton <= 3.6 defaults it to
        # float32 and then rejects a float64 accumulator (3.9 takes the accumulator's type).
        acc = tl.dot(a, w, acc, input_precision="ieee", out_dtype=acc.dtype)
    tl.store(out_ptr + batch * stride_ob + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _block(size: int, cap: int) -> int:
    # tl.dot needs every block dimension >= 16; the caps bound registers per program. Not
    # tuned on a GPU (none was available when this was written).
    return max(16, min(cap, triton.next_power_of_2(size)))


def scaled_bmm_grid(batch: int, m: int, n: int, block_m: int, block_n: int) -> tuple[int]:
    """The launch grid of ``scaled_bmm_kernel``: every (sample, tile) pair on axis 0.

    CUDA allows 2^31 - 1 programs on axis 0 but only 65,535 on axes 1 and 2, so the batch
    (B > 65,535 is common: one sample per input) must not get an axis of its own. 2^31 - 1
    programs of at least 16 x 16 outputs each would be terabytes of output: never reached.
    """
    return (batch * triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)


def launch_scaled_bmm(a: Tensor, scale: Tensor | None, w: Tensor) -> Tensor:
    """(a * scale[:, None, :]) @ w for a: (B, M, K), scale: (B, K) or None, w: (B or 1, K, N).

    ``w`` may be any strided view (a shared weight expanded with batch stride 0, or a
    transposed per-sample matrix). Returns a new contiguous (B, M, N) tensor of a's dtype.
    """
    batch, m, k = a.shape
    n = w.shape[2]
    out = a.new_empty(batch, m, n)
    if out.numel() == 0:
        return out
    if k == 0:
        return out.zero_()
    w_batch_stride = w.stride(0) if w.shape[0] == batch else 0
    block_m, block_n, block_k = _block(m, 64), _block(n, 64), _block(k, 32)
    grid = scaled_bmm_grid(batch, m, n, block_m, block_n)
    scale_arg = scale if scale is not None else a
    scale_strides = scale.stride() if scale is not None else (0, 0)
    wrap_triton(scaled_bmm_kernel)[grid](
        a, scale_arg, w, out, m, n, k,
        a.stride(0), a.stride(1), a.stride(2), scale_strides[0], scale_strides[1],
        w_batch_stride, w.stride(1), w.stride(2), out.stride(0), out.stride(1), out.stride(2),
        HAS_SCALE=scale is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return out


def check_floating(name: str, tensor: Tensor, like: Tensor | None = None) -> None:
    """ValueError naming ``name`` unless ``tensor`` is float32/64 (and matches ``like``)."""
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {tensor.dtype}; the Triton ops take float32 or float64")
    if like is not None and (tensor.dtype != like.dtype or tensor.device != like.device):
        raise ValueError(f"{name} is {tensor.dtype} on {tensor.device} but the first input is "
                         f"{like.dtype} on {like.device}; pass them with one dtype and device")


def _check_scaled_matmul(rows: Tensor, scale: Tensor, weight: Tensor) -> None:
    check_floating("rows", rows)
    check_floating("scale", scale, rows)
    check_floating("weight", weight, rows)
    if rows.dim() != 3:
        raise ValueError(f"rows must be (B, p, q), got shape {tuple(rows.shape)}")
    batch, _, q = rows.shape
    if tuple(scale.shape) != (batch, q):
        raise ValueError(f"scale must be (B, q) = {(batch, q)} for rows {tuple(rows.shape)}, "
                         f"got {tuple(scale.shape)}")
    if weight.dim() != 2 or weight.shape[0] != q:
        raise ValueError(f"weight must be (q, n) with q = {q}, got shape {tuple(weight.shape)}")


def scaled_matmul_reference(rows: Tensor, scale: Tensor, weight: Tensor) -> Tensor:
    """Plain-torch (rows * scale[:, None, :]) @ weight: the CPU kernel and the oracle."""
    _check_scaled_matmul(rows, scale, weight)
    return (rows * scale.unsqueeze(1)) @ weight


@triton_op("pullgeom::triton_scaled_matmul", mutates_args={})
def triton_scaled_matmul(rows: Tensor, scale: Tensor, weight: Tensor) -> Tensor:
    """(rows * scale[:, None, :]) @ weight: rows (B, p, q), scale (B, q), weight (q, n) -> (B, p, n).

    Deterministic (fixed reduction order); float32 accumulates in float32.
    """
    _check_scaled_matmul(rows, scale, weight)
    return launch_scaled_bmm(rows, scale, weight.unsqueeze(0))


if not interpreting():
    triton_scaled_matmul.register_kernel("cpu")(scaled_matmul_reference)
