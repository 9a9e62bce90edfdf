"""RMSNorm over the last dimension with a frozen weight, forward and backward in one
pass each:

    y = weight * (x32 * rsqrt(mean(x32²) + eps)).to(x.dtype),   x32 = x.float()

as Llama / Qwen / Mistral code computes it (the product in the promoted dtype of weight
and x). Eager PyTorch runs this as 22 kernels forward and backward together, most
of them over fp32 copies of x: about 110 bytes moved per element against the 10 here
(read x, write y; read x and the gradient, write dx). Each program holds ``BLOCK_R``
whole rows in registers; the forward keeps 1 / rms per row (fp32) for the backward.
``x`` is read as (outer, inner, width) with a stride for each of the first two
dimensions, so a per-head norm reads the heads of a projection's output where they lie
(e.g. the query slice of stacked q / k / v projections) without a copy; outputs and
gradients are contiguous.
Rounding follows the eager code's: the normalised row is rounded to x's dtype before
the weight multiplies it, and the backward rounds the gradient reaching it likewise,
so results differ from eager only by the order of the row sum.

A pre-norm decoder layer's residual adds fold in: the forward may normalise ``x +
branch`` (storing the sum, the next residual, and optionally a second copy of it that
a GEMM may then accumulate into in place while the first stays for the backward), and
the backward may add the gradient of x's residual use to its own, so no add is a
launch of its own.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from entrgi_kernels.launch import FP_FUSION
from entrgi_kernels.rounding import round_to

MAX_WIDTH = 16_384  # one row per program in registers: 32 values per thread at 16 warps
TILE_ELEMENTS = 4096  # rows per program: as many as fill this many elements


@triton.jit
def inverse_rms(x, width, eps):
    """1 / rms of each row of fp32 ``x`` (R, W) whose ``width`` real columns are
    followed by zeros: (R,) fp32."""
    return tl.rsqrt(tl.sum(x * x, axis=1) / width + eps)


@triton.jit
def normed_rows(x, inv_rms, weight, x_dtype: tl.constexpr, out_dtype: tl.constexpr):
    """``weight * (x * inv_rms).to(x_dtype)`` rounded to ``out_dtype``: the normalised row
    rounded to x's dtype before the weight multiplies it, as the eager code rounds it
    (fp32 ``x`` (R, W), ``inv_rms`` (R, 1), ``weight`` (1, W))."""
    return round_to(weight * round_to(x * inv_rms, x_dtype).to(tl.float32), out_dtype)


@triton.jit
def normed_rows_grad(grad, x, weight, inv_rms, width, x_dtype: tl.constexpr):
    """fp32 dL/dx (unrounded) of :func:`normed_rows` from fp32 dL/dy ``grad`` (R, W), the
    rows ``x``, ``weight`` (1, W) and ``inv_rms`` (R, 1); the gradient reaching the
    normalised row arrives in x's dtype (autograd's cast)."""
    grad_normed = round_to(grad * weight, x_dtype).to(tl.float32)
    grad_inv_rms = tl.sum(grad_normed * x, axis=1)[:, None]
    grad_mean_square = -0.5 * grad_inv_rms * inv_rms * inv_rms * inv_rms  # rsqrt's backward
    return grad_normed * inv_rms + (grad_mean_square / width) * (2.0 * x)


@triton.jit
def _load_rows(x_ptr, weight_ptr, rows, inner, stride_outer, stride_inner, width, BLOCK_R: tl.constexpr,
               BLOCK_H: tl.constexpr):  # fmt: skip
    """This program's rows: (offsets (BLOCK_R, BLOCK_H) int64 of the contiguous outputs,
    in-range mask, row indices (BLOCK_R,), x (BLOCK_R, BLOCK_H) fp32, weight (1, BLOCK_H)
    fp32). Row r of x lies at (r // inner, r % inner)."""
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    col = tl.arange(0, BLOCK_H)
    ok = (row[:, None] < rows) & (col[None, :] < width)
    x_rows = (row // inner) * stride_outer + (row % inner) * stride_inner
    x = tl.load(x_ptr + x_rows[:, None] + col[None, :], mask=ok, other=0.0).to(tl.float32)
    weight = tl.load(weight_ptr + col, mask=col < width, other=0.0).to(tl.float32)
    return row[:, None] * width + col[None, :], ok, row, x, weight[None, :]


@triton.jit
def _rms_norm_forward_kernel(
    x_ptr,  # (outer, inner, width) bf16 / fp16 / fp32, strided rows
    branch_ptr,  # (rows, width) x's dtype (ADD): added to x before the norm
    weight_ptr,  # (width,)
    y_ptr,  # (rows, width) in the promoted dtype of weight and x
    sum_ptr,  # (rows, width) x's dtype out (ADD): x + branch
    sum_copy_ptr,  # (rows, width) x's dtype out (ADD and COPY_SUM): x + branch again
    inv_rms_ptr,  # (rows,) fp32 out: 1 / rms
    rows,  # outer * inner
    inner,
    stride_outer,
    stride_inner,
    width,
    eps,
    ADD: tl.constexpr,
    COPY_SUM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    offsets, ok, row, x, weight = _load_rows(x_ptr, weight_ptr, rows, inner, stride_outer, stride_inner, width,
                                             BLOCK_R, BLOCK_H)  # fmt: skip
    if ADD:  # the row normalised is x + branch rounded as the stock residual add rounds it
        branch = tl.load(branch_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        x = round_to(x + branch, x_ptr.dtype.element_ty).to(tl.float32)
        tl.store(sum_ptr + offsets, x.to(sum_ptr.dtype.element_ty), mask=ok)
        if COPY_SUM:
            tl.store(sum_copy_ptr + offsets, x.to(sum_copy_ptr.dtype.element_ty), mask=ok)
    inv_rms = inverse_rms(x, width, eps)
    y = normed_rows(x, inv_rms[:, None], weight, x_ptr.dtype.element_ty, y_ptr.dtype.element_ty)
    tl.store(y_ptr + offsets, y, mask=ok)
    tl.store(inv_rms_ptr + row, inv_rms, mask=row < rows)


@triton.jit
def _rms_norm_backward_kernel(
    grad_ptr,  # (rows, width) dL/dy
    x_ptr,  # (outer, inner, width), strided rows
    weight_ptr,  # (width,)
    inv_rms_ptr,  # (rows,) fp32, from the forward
    residual_grad_ptr,  # (rows, width) x's dtype (ACCUMULATE): added to dL/dx
    grad_x_ptr,  # (rows, width) out, x's dtype
    rows,
    inner,
    stride_outer,
    stride_inner,
    width,
    ACCUMULATE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    offsets, ok, row, x, weight = _load_rows(x_ptr, weight_ptr, rows, inner, stride_outer, stride_inner, width,
                                             BLOCK_R, BLOCK_H)  # fmt: skip
    grad = tl.load(grad_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    inv_rms = tl.load(inv_rms_ptr + row, mask=row < rows, other=0.0)[:, None]
    grad_x = normed_rows_grad(grad, x, weight, inv_rms, width, x_ptr.dtype.element_ty)
    if ACCUMULATE:  # x's other use (a residual path) adds its gradient, as autograd adds it: to the rounded one
        residual_grad = tl.load(residual_grad_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        grad_x = round_to(grad_x, grad_x_ptr.dtype.element_ty).to(tl.float32) + residual_grad
    tl.store(grad_x_ptr + offsets, round_to(grad_x, grad_x_ptr.dtype.element_ty), mask=ok)


def _geometry(width: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_H, warps) for rows of ``width``."""
    if width > MAX_WIDTH:
        raise ValueError(f"rms_norm keeps a row in registers: width at most {MAX_WIDTH}, got {width}")
    block_h = triton.next_power_of_2(width)
    block_r = max(1, TILE_ELEMENTS // block_h)
    return block_r, block_h, min(16, max(4, block_r * block_h // 512))


def _strided_rows(x: torch.Tensor) -> tuple[int, int, int]:
    """(inner, stride_outer, stride_inner) of an (outer, inner, width) ``x`` whose last
    dimension is contiguous."""
    if x.dim() != 3 or x.stride(2) != 1:
        raise ValueError(f"rms_norm kernels read x as (outer, inner, width) with contiguous rows, got shape "
                         f"{tuple(x.shape)} strides {x.stride()}")  # fmt: skip
    return x.shape[1], x.stride(0), x.stride(1)


def rms_norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    branch: torch.Tensor | None = None,
    sum_copy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(outer, inner, width) ``x`` (strided, rows contiguous), (width,) ``weight`` ->
    (y (outer * inner, width) contiguous in the promoted dtype of weight and x, 1 / rms
    (outer * inner,) fp32, None). With a contiguous (outer * inner, width) ``branch`` of
    x's dtype, the row normalised is ``x + branch`` (rounded to x's dtype), returned as
    the third value (contiguous), and also written into ``sum_copy`` when given (a
    contiguous tensor of that shape and dtype)."""
    width = x.shape[-1]
    block_r, block_h, warps = _geometry(width)
    rows = x.shape[0] * x.shape[1]
    if sum_copy is not None and (
        branch is None or sum_copy.shape != (rows, width) or sum_copy.dtype != x.dtype or not sum_copy.is_contiguous()
    ):
        given = "a branch" if branch is not None else "no branch"
        raise ValueError(f"sum_copy: a contiguous ({rows}, {width}) {x.dtype} tensor, with a branch; got "
                         f"{tuple(sum_copy.shape)} {sum_copy.dtype} and {given}")  # fmt: skip
    y = torch.empty(rows, width, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    inv_rms = torch.empty(rows, dtype=torch.float32, device=x.device)
    total = None if branch is None else torch.empty(rows, width, dtype=x.dtype, device=x.device)
    if rows == 0:  # no grid to launch
        return y, inv_rms, total
    _rms_norm_forward_kernel[(triton.cdiv(rows, block_r),)](
        x, x if branch is None else branch, weight, y, y if total is None else total,
        y if sum_copy is None else sum_copy, inv_rms, rows, *_strided_rows(x), width, eps, ADD=branch is not None,
        COPY_SUM=sum_copy is not None, BLOCK_R=block_r, BLOCK_H=block_h, num_warps=warps, enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    return y, inv_rms, total


def rms_norm_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    inv_rms: torch.Tensor,
    residual_grad: torch.Tensor | None = None,
) -> torch.Tensor:
    """dL/dx (outer * inner, width) contiguous in x's dtype, from contiguous dL/dy
    ``grad`` (outer * inner, width) and the forward's ``x`` (outer, inner, width; the sum,
    when the forward added a branch), ``weight`` and ``inv_rms``; plus ``residual_grad``
    (contiguous, (outer * inner, width), x's dtype) when given: the gradient of x's other
    use, added in the same pass."""
    width = x.shape[-1]
    block_r, block_h, warps = _geometry(width)
    rows = x.shape[0] * x.shape[1]
    grad_x = torch.empty(rows, width, dtype=x.dtype, device=x.device)
    if rows == 0:
        return grad_x
    _rms_norm_backward_kernel[(triton.cdiv(rows, block_r),)](
        grad, x, weight, inv_rms, grad if residual_grad is None else residual_grad, grad_x, rows, *_strided_rows(x),
        width, ACCUMULATE=residual_grad is not None, BLOCK_R=block_r, BLOCK_H=block_h, num_warps=warps,
        enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    return grad_x
