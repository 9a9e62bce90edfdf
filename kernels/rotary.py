"""Rotary position embedding of one (B, H, T, D) query or key tensor, forward and
backward in one pass each:

    out = x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])

with cos, sin (B, T, D) broadcast over the heads, as Llama / Qwen / Mistral code computes
it (eager PyTorch: about ten kernels forward and ten backward, with slices, a
negation and a concatenation). ``x`` may be any strided view whose last dimension is
contiguous (the models hand over a transpose of the projection's output, or of a slice
of stacked q / k / v projections); the output may have strides of its own. Rounding
follows the eager code's: both products are rounded to x's dtype before their sum, and
the backward rounds each of its two products likewise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from entrgi_kernels.rounding import round_to

TILE_ELEMENTS = 2048  # rows per program: as many as fill this many elements (16 per thread)


@triton.jit
def _rotary_kernel(
    x_ptr,  # (B, H, T, D) strided, last dimension contiguous: x, or dL/dout (BACKWARD)
    cos_ptr,  # (B or 1, T, D) strided, last dimension contiguous
    sin_ptr,
    out_ptr,  # (B, H, T, D) strided, last dimension contiguous: out, or dL/dx (BACKWARD)
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
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
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


def rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool = False, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Rotary embedding of (B, H, T, D) ``x`` with (B or 1, T, D) ``cos`` / ``sin``
    (last dimensions contiguous, D even, a power of two); ``backward``: ``x`` is dL/dout
    and the result dL/dx. Written into ``out`` (x's shape, any strides with a contiguous
    last dimension) when given, else into ``torch.empty_like(x)``."""
    batch, heads, length, dim = x.shape
    out = torch.empty_like(x) if out is None else out
    rows = batch * heads * length
    if rows == 0:  # no grid to launch
        return out
    block_r = max(1, TILE_ELEMENTS // dim)
    cs_stride_b = cos.stride(0) if cos.shape[0] == batch else 0
    _rotary_kernel[(triton.cdiv(rows, block_r),)](
        x, cos, sin, out, rows, heads, length, *x.stride()[:3], *out.stride()[:3], cs_stride_b, cos.stride(1),
        D=dim, BLOCK_R=block_r, BACKWARD=backward, num_warps=4,
    )  # fmt: skip
    return out
