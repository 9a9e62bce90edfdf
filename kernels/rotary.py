"""Rotary position embedding of a (B, H, T, D) query and a (B, H_kv, T, D) key tensor,
forward and backward in one launch each (programs split between the two):

    out = x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])

with cos, sin (B, T, D) broadcast over the heads, as Llama / Qwen / Mistral code computes
it (eager PyTorch: about ten kernels per tensor forward and ten backward, with slices,
a negation and a concatenation). The inputs may be any strided views whose last
dimension is contiguous (the models hand over transposes of the projections' outputs,
or of slices of stacked q / k / v projections); the outputs may have strides of their
own. Rounding follows the eager code's: both products are rounded to x's dtype before
their sum, and the backward rounds each of its two products likewise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from entrgi_kernels.rounding import round_to

TILE_ELEMENTS = 2048  # rows per program: as many as fill this many elements (16 per thread)


@triton.jit
def _rotate_rows(
    x_ptr,  # (B, H, T, D) strided, last dimension contiguous: x, or dL/dout (BACKWARD)
    cos_ptr,  # (B or 1, T, D) strided, last dimension contiguous
    sin_ptr,
    out_ptr,  # (B, H, T, D) strided, last dimension contiguous: out, or dL/dx (BACKWARD)
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
    cs_stride_b,
    cs_stride_t,
    D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BACKWARD: tl.constexpr,
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
    x = tl.load(x_ptr + x_rows + col, mask=ok, other=0.0).to(tl.float32)
    x_partner = tl.load(x_ptr + x_rows + partner, mask=ok, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + cs_rows + col, mask=ok, other=0.0).to(tl.float32)
    first_half = col < D // 2
    if BACKWARD:  # dx = g cos + rotate_half^T(g sin): column j takes +-(g sin) from its partner
        sin_partner = tl.load(sin_ptr + cs_rows + partner, mask=ok, other=0.0).to(tl.float32)
        moved = round_to(x_partner * sin_partner, dtype).to(tl.float32)
        moved = tl.where(first_half, moved, -moved)
    else:
        sin = tl.load(sin_ptr + cs_rows + col, mask=ok, other=0.0).to(tl.float32)
        moved = round_to(tl.where(first_half, -x_partner, x_partner) * sin, dtype).to(tl.float32)
    own = round_to(x * cos, dtype).to(tl.float32)
    tl.store(out_ptr + out_rows + col, round_to(own + moved, dtype), mask=ok)


@triton.jit
def _rotary_kernel(
    q_ptr,  # (B, H, T, D) strided: the queries, or their gradient (BACKWARD)
    k_ptr,  # (B, H_kv, T, D) strided: the keys, or their gradient
    cos_ptr,
    sin_ptr,
    q_out_ptr,
    k_out_ptr,
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
    cs_stride_b,
    cs_stride_t,
    batch,
    D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < q_programs:
        _rotate_rows(q_ptr, cos_ptr, sin_ptr, q_out_ptr, pid, batch * q_heads * length, q_heads, length, q_stride_b,
                     q_stride_h, q_stride_t, q_out_stride_b, q_out_stride_h, q_out_stride_t, cs_stride_b, cs_stride_t,
                     D, BLOCK_R, BACKWARD)  # fmt: skip
    else:
        _rotate_rows(k_ptr, cos_ptr, sin_ptr, k_out_ptr, pid - q_programs, batch * k_heads * length, k_heads, length,
                     k_stride_b, k_stride_h, k_stride_t, k_out_stride_b, k_out_stride_h, k_out_stride_t, cs_stride_b,
                     cs_stride_t, D, BLOCK_R, BACKWARD)  # fmt: skip


def rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_out: torch.Tensor,
    k_out: torch.Tensor,
    backward: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of (B, H, T, D) ``q`` and (B, H_kv, T, D) ``k`` with (B or 1, T,
    D) ``cos`` / ``sin`` (last dimensions contiguous, D even, a power of two), in one
    launch, written into ``q_out`` and ``k_out`` (q's and k's shapes, any strides with a
    contiguous last dimension), which are returned; ``backward``: ``q`` and ``k`` are
    dL/dout and the results dL/dq and dL/dk."""
    batch, q_heads, length, dim = q.shape
    block_r = max(1, TILE_ELEMENTS // dim)
    q_programs = triton.cdiv(q.numel() // dim, block_r)
    programs = q_programs + triton.cdiv(k.numel() // dim, block_r)
    if programs == 0:  # no grid to launch
        return q_out, k_out
    cs_stride_b = cos.stride(0) if cos.shape[0] == batch else 0
    _rotary_kernel[(programs,)](
        q, k, cos, sin, q_out, k_out, q_programs, q_heads, k.shape[1], length, *q.stride()[:3], *k.stride()[:3],
        *q_out.stride()[:3], *k_out.stride()[:3], cs_stride_b, cos.stride(1), batch,
        D=dim, BLOCK_R=block_r, BACKWARD=backward, num_warps=4,
    )  # fmt: skip
    return q_out, k_out
