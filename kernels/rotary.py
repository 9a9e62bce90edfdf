"""Rotary position embedding of a (B, H, T, D) query and a (B, H_kv, T, D) key tensor,
forward and backward in one launch each (programs split between the two):

    out = x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])

with cos, sin (B, T, D) broadcast over the heads, as Llama / Qwen / Mistral code computes
it (eager PyTorch: about ten kernels per tensor forward and ten backward, with slices,
a negation and a concatenation). The inputs may be any strided views whose last
dimension is contiguous (the models hand over transposes of the projections' outputs,
or of slices of stacked q / k / v projections); the outputs may have strides of their
own. Rounding follows the eager code's: both products are rounded to cos's dtype before
their sum, and the backward rounds each of its two products likewise. That is x's dtype
for the Llama family, whose cos and sin come in it; cos and sin of float32 with 16-bit
x are LLaDA's full-precision rotation (x taken to float32, rotated, rounded back once).

Models that normalise each query and key head before rotating it (Qwen3's ``q_norm``
and ``k_norm``) get the norm in the same launch: the kernel holds whole rows (D values)
anyway, so it takes 1 / rms over the row, rotates ``weight * (x / rms)`` rounded as the
rms_norm kernel rounds it, and keeps 1 / rms per row; the backward un-rotates the
gradient and runs the norm's backward on the row it reads from the forward's input.
Three launches each way (two norms, the rotation) become one, and the normed rows never
reach memory.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from entrgi_kernels.launch import FP_FUSION
from entrgi_kernels.rms_norm import inverse_rms, normed_rows, normed_rows_grad
from entrgi_kernels.rounding import round_to

TILE_ELEMENTS = 2048  # rows per program: as many as fill this many elements (16 per thread)


@triton.jit
def _rotate_rows(
    x_ptr,  # (B, H, T, D) strided, last dimension contiguous: x, or dL/dout (BACKWARD)
    cos_ptr,  # (B or 1, T, D) strided, last dimension contiguous
    sin_ptr,
    out_ptr,  # (B, H, T, D) strided, last dimension contiguous: out, or dL/dx (BACKWARD)
    input_ptr,  # NORM and BACKWARD: (B, H, T, D) strided, the forward's x
    weight_ptr,  # NORM: (D,) the norm's weight
    inv_rms_ptr,  # NORM: (B * H * T,) fp32, written forward, read backward
    block,  # which BLOCK_R rows of x this program rotates
    rows,  # B * H * T
    heads,
    length,  # T
    x_stride_b,
    x_stride_h,
    x_stride_t,
    out_stride_b,
    out_stride_h,
    out_stride_t,
    input_stride_b,
    input_stride_h,
    input_stride_t,
    cs_stride_b,
    cs_stride_t,
    eps,
    D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BACKWARD: tl.constexpr,
    NORM: tl.constexpr,
):
    row = block.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    t = row % length
    b = row // (length * heads)
    h = (row // length) % heads
    x_rows = (b * x_stride_b + h * x_stride_h + t * x_stride_t)[:, None]
    out_rows = (b * out_stride_b + h * out_stride_h + t * out_stride_t)[:, None]
    cs_rows = (b * cs_stride_b + t * cs_stride_t)[:, None]
    col = tl.arange(0, D)[None, :]
    partner = (col + D // 2) % D  # the column rotate_half moves here
    ok = row[:, None] < rows
    dtype = out_ptr.dtype.element_ty
    products = cos_ptr.dtype.element_ty  # what the products are rounded to: x's dtype, or float32
    x = tl.load(x_ptr + x_rows + col, mask=ok, other=0.0).to(tl.float32)
    x_partner = tl.load(x_ptr + x_rows + partner, mask=ok, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + cs_rows + col, mask=ok, other=0.0).to(tl.float32)
    first_half = col < D // 2
    if NORM and not BACKWARD:  # the row rotated is rms_norm(x)
        inv_rms = inverse_rms(x, D, eps)
        tl.store(inv_rms_ptr + row, inv_rms, mask=row < rows)
        weight = tl.load(weight_ptr + col).to(tl.float32)
        weight_partner = tl.load(weight_ptr + partner).to(tl.float32)
        x = normed_rows(x, inv_rms[:, None], weight, dtype, dtype).to(tl.float32)
        x_partner = normed_rows(x_partner, inv_rms[:, None], weight_partner, dtype, dtype).to(tl.float32)
    if BACKWARD:  # dx = g cos + rotate_half^T(g sin): column j takes +-(g sin) from its partner
        sin_partner = tl.load(sin_ptr + cs_rows + partner, mask=ok, other=0.0).to(tl.float32)
        moved = round_to(x_partner * sin_partner, products).to(tl.float32)
        moved = tl.where(first_half, moved, -moved)
    else:
        sin = tl.load(sin_ptr + cs_rows + col, mask=ok, other=0.0).to(tl.float32)
        moved = round_to(tl.where(first_half, -x_partner, x_partner) * sin, products).to(tl.float32)
    own = round_to(x * cos, products).to(tl.float32)
    out = round_to(own + moved, dtype)
    if NORM and BACKWARD:  # out is dL/d(normed row), as the norm's backward reads it: on to dL/dx
        input_rows = (b * input_stride_b + h * input_stride_h + t * input_stride_t)[:, None]
        x = tl.load(input_ptr + input_rows + col, mask=ok, other=0.0).to(tl.float32)
        inv_rms = tl.load(inv_rms_ptr + row, mask=row < rows, other=0.0)[:, None]
        weight = tl.load(weight_ptr + col).to(tl.float32)
        out = round_to(normed_rows_grad(out.to(tl.float32), x, weight, inv_rms, D, dtype), dtype)
    tl.store(out_ptr + out_rows + col, out, mask=ok)


@triton.jit
def _rotary_kernel(
    q_ptr,  # (B, H, T, D) strided: the queries, or their gradient (BACKWARD)
    k_ptr,  # (B, H_kv, T, D) strided: the keys, or their gradient
    cos_ptr,
    sin_ptr,
    q_out_ptr,
    k_out_ptr,
    q_input_ptr,  # NORM and BACKWARD: the forward's queries
    k_input_ptr,
    q_weight_ptr,  # NORM: the query norm's weight (D,)
    k_weight_ptr,
    q_inv_rms_ptr,  # NORM: (B * H * T,) fp32
    k_inv_rms_ptr,  # NORM: (B * H_kv * T,) fp32
    q_programs,  # programs below this rotate q's rows, the others k's
    q_heads,
    k_heads,
    length,
    q_stride_b,
    q_stride_h,
    q_stride_t,
    k_stride_b,
    k_stride_h,
    k_stride_t,
    q_out_stride_b,
    q_out_stride_h,
    q_out_stride_t,
    k_out_stride_b,
    k_out_stride_h,
    k_out_stride_t,
    q_input_stride_b,
    q_input_stride_h,
    q_input_stride_t,
    k_input_stride_b,
    k_input_stride_h,
    k_input_stride_t,
    cs_stride_b,
    cs_stride_t,
    batch,
    eps,
    D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BACKWARD: tl.constexpr,
    NORM: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < q_programs:
        _rotate_rows(q_ptr, cos_ptr, sin_ptr, q_out_ptr, q_input_ptr, q_weight_ptr, q_inv_rms_ptr, pid,
                     batch * q_heads * length, q_heads, length, q_stride_b, q_stride_h, q_stride_t, q_out_stride_b,
                     q_out_stride_h, q_out_stride_t, q_input_stride_b, q_input_stride_h, q_input_stride_t,
                     cs_stride_b, cs_stride_t, eps, D, BLOCK_R, BACKWARD, NORM)  # fmt: skip
    else:
        _rotate_rows(k_ptr, cos_ptr, sin_ptr, k_out_ptr, k_input_ptr, k_weight_ptr, k_inv_rms_ptr, pid - q_programs,
                     batch * k_heads * length, k_heads, length, k_stride_b, k_stride_h, k_stride_t, k_out_stride_b,
                     k_out_stride_h, k_out_stride_t, k_input_stride_b, k_input_stride_h, k_input_stride_t,
                     cs_stride_b, cs_stride_t, eps, D, BLOCK_R, BACKWARD, NORM)  # fmt: skip


class HeadNorms(NamedTuple):
    """The per-head RMSNorms applied to q and k before the rotation (Qwen3's ``q_norm``
    and ``k_norm``): weights (D,) of q's dtype, their ``eps``, and 1 / rms per row of q
    (B * H * T,) and of k (B * H_kv * T,), fp32, which the forward writes and the backward
    reads. For the backward, ``q_input`` and ``k_input`` are the forward's q and k."""

    q_weight: torch.Tensor
    k_weight: torch.Tensor
    eps: float
    q_inv_rms: torch.Tensor
    k_inv_rms: torch.Tensor
    q_input: torch.Tensor | None = None
    k_input: torch.Tensor | None = None


def rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_out: torch.Tensor,
    k_out: torch.Tensor,
    backward: bool = False,
    norms: HeadNorms | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of (B, H, T, D) ``q`` and (B, H_kv, T, D) ``k`` with (B or 1, T,
    D) ``cos`` / ``sin`` (last dimensions contiguous, D even, a power of two; of q's
    dtype, or float32 for the rotation in float32, rounded once to q's dtype), in one
    launch, written into ``q_out`` and ``k_out`` (q's and k's shapes, any strides with a
    contiguous last dimension), which are returned; ``backward``: ``q`` and ``k`` are
    dL/dout and the results dL/dq and dL/dk. With ``norms``, what is rotated is each
    row's RMSNorm (``weight * (x * rsqrt(mean(x²) + eps)).to(dtype)``, rounded as the
    rms_norm kernel rounds), and the backward's results are the gradients to the rows
    before the norm (``norms.q_input`` and ``k_input`` given)."""
    batch, q_heads, length, dim = q.shape
    block_r = max(1, TILE_ELEMENTS // dim)
    q_programs = triton.cdiv(q.numel() // dim, block_r)
    programs = q_programs + triton.cdiv(k.numel() // dim, block_r)
    if norms is not None and backward and (norms.q_input is None or norms.k_input is None):
        raise ValueError("the normed rotary backward needs the forward's q and k (norms.q_input, norms.k_input)")
    if programs == 0:  # no grid to launch
        return q_out, k_out
    cs_stride_b = cos.stride(0) if cos.shape[0] == batch else 0
    q_input, k_input = (q, k) if norms is None or norms.q_input is None else (norms.q_input, norms.k_input)
    per_row = (q, k, q, k) if norms is None else (*norms[:2], *norms[3:5])  # weights, then 1 / rms
    _rotary_kernel[(programs,)](
        q, k, cos, sin, q_out, k_out, q_input, k_input, *per_row, q_programs, q_heads, k.shape[1], length,
        *q.stride()[:3], *k.stride()[:3], *q_out.stride()[:3], *k_out.stride()[:3], *q_input.stride()[:3],
        *k_input.stride()[:3], cs_stride_b, cos.stride(1), batch, 0.0 if norms is None else norms.eps,
        D=dim, BLOCK_R=block_r, BACKWARD=backward, NORM=norms is not None, num_warps=4, enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    return q_out, k_out
