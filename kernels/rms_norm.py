"""RMSNorm over the last dimension with a frozen weight, forward and backward in one
pass each:

    y = weight * (x32 * rsqrt(mean(x32²) + eps)).to(x.dtype),   x32 = x.float()

as Llama / Qwen / Mistral code computes it (the product in the promoted dtype of weight
and x). Eager PyTorch runs this as 22 kernels forward and backward together, most
of them over fp32 copies of x: about 110 bytes moved per element against the 10 here
(read x, write y; read x and the gradient, write dx). Each program holds ``BLOCK_R``
whole rows in registers; the forward keeps 1 / rms per row (fp32) for the backward.
Rounding follows the eager code's: the normalised row is rounded to x's dtype before
the weight multiplies it, and the backward rounds the gradient reaching it likewise,
so results differ from eager only by the order of the row sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from entrgi_kernels.rounding import round_to

MAX_WIDTH = 16_384  # one row per program in registers: 32 values per thread at 16 warps
TILE_ELEMENTS = 4096  # rows per program: as many as fill this many elements


@triton.jit
def _load_rows(x_ptr, weight_ptr, rows, width, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """This program's rows: (offsets (BLOCK_R, BLOCK_H) int64, in-range mask, row
    indices (BLOCK_R,), x (BLOCK_R, BLOCK_H) fp32, weight (1, BLOCK_H) fp32)."""
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    col = tl.arange(0, BLOCK_H)
    ok = (row[:, None] < rows) & (col[None, :] < width)
    offsets = row[:, None] * width + col[None, :]
    x = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    weight = tl.load(weight_ptr + col, mask=col < width, other=0.0).to(tl.float32)
    return offsets, ok, row, x, weight[None, :]


@triton.jit
def _rms_norm_forward_kernel(
    x_ptr,  # (rows, width) bf16 / fp16 / fp32
    weight_ptr,  # (width,)
    y_ptr,  # (rows, width) in the promoted dtype of weight and x
    inv_rms_ptr,  # (rows,) fp32 out: 1 / rms
    rows,
    width,
    eps,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    offsets, ok, row, x, weight = _load_rows(x_ptr, weight_ptr, rows, width, BLOCK_R, BLOCK_H)
    inv_rms = tl.rsqrt(tl.sum(x * x, axis=1) / width + eps)
    normed = round_to(x * inv_rms[:, None], x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + offsets, round_to(weight * normed, y_ptr.dtype.element_ty), mask=ok)
    tl.store(inv_rms_ptr + row, inv_rms, mask=row < rows)


@triton.jit
def _rms_norm_backward_kernel(
    grad_ptr,  # (rows, width) dL/dy
    x_ptr,  # (rows, width)
    weight_ptr,  # (width,)
    inv_rms_ptr,  # (rows,) fp32, from the forward
    grad_x_ptr,  # (rows, width) out, x's dtype
    rows,
    width,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    offsets, ok, row, x, weight = _load_rows(x_ptr, weight_ptr, rows, width, BLOCK_R, BLOCK_H)
    grad = tl.load(grad_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    inv_rms = tl.load(inv_rms_ptr + row, mask=row < rows, other=0.0)[:, None]
    # the gradient reaching the normalised row arrives in its dtype, x's (autograd's cast)
    grad_normed = round_to(grad * weight, x_ptr.dtype.element_ty).to(tl.float32)
    grad_inv_rms = tl.sum(grad_normed * x, axis=1)[:, None]
    grad_mean_square = -0.5 * grad_inv_rms * inv_rms * inv_rms * inv_rms  # rsqrt's backward
    grad_x = grad_normed * inv_rms + (grad_mean_square / width) * (2.0 * x)
    tl.store(grad_x_ptr + offsets, round_to(grad_x, grad_x_ptr.dtype.element_ty), mask=ok)


def _geometry(width: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_H, warps) for rows of ``width``."""
    if width > MAX_WIDTH:
        raise ValueError(f"rms_norm keeps a row in registers: width at most {MAX_WIDTH}, got {width}")
    block_h = triton.next_power_of_2(width)
    block_r = max(1, TILE_ELEMENTS // block_h)
    return block_r, block_h, min(16, max(4, block_r * block_h // 512))


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous (rows, width) ``x``, (width,) ``weight`` -> (y (rows, width) in the
    promoted dtype of weight and x, 1 / rms (rows,) fp32)."""
    rows, width = x.shape
    block_r, block_h, warps = _geometry(width)
    y = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    inv_rms = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows == 0:  # no grid to launch
        return y, inv_rms
    _rms_norm_forward_kernel[(triton.cdiv(rows, block_r),)](
        x, weight, y, inv_rms, rows, width, eps, BLOCK_R=block_r, BLOCK_H=block_h, num_warps=warps
    )
    return y, inv_rms


def rms_norm_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, inv_rms: torch.Tensor) -> torch.Tensor:
    """dL/dx (rows, width) in x's dtype from contiguous dL/dy ``grad`` and the
    forward's ``x``, ``weight`` and ``inv_rms``."""
    rows, width = x.shape
    block_r, block_h, warps = _geometry(width)
    grad_x = torch.empty_like(x)
    if rows == 0:
        return grad_x
    _rms_norm_backward_kernel[(triton.cdiv(rows, block_r),)](
        grad, x, weight, inv_rms, grad_x, rows, width, BLOCK_R=block_r, BLOCK_H=block_h, num_warps=warps
    )
    return grad_x
