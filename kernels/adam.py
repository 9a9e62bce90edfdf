"""Adam on the logits in one pass: reads param, grad and both moments once, writes
param and moments once (torch's unfused update makes about twice the passes).

Rows marked in ``skip`` are not touched: a committed position's logits have zero
gradient and zero moments, so Adam would leave them unchanged anyway.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from entrgi_kernels.row_stats import _row_is_active


@triton.jit
def _adam_kernel(
    param_ptr,  # (N, V) fp32, updated in place
    grad_ptr,  # (N, V) gradient, any float dtype
    exp_avg_ptr,  # (N, V) fp32 first moment, in place
    exp_avg_sq_ptr,  # (N, V) fp32 second moment, in place
    skip_ptr,  # (N,) int32: rows != 0 are left untouched (SKIP)
    V,
    lr_corrected,  # lr / (1 - beta1^t)
    beta1,
    beta2,
    inv_bias2_sqrt,  # 1 / sqrt(1 - beta2^t)
    eps,
    BLOCK_V: tl.constexpr,
    SKIP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    ok = (cols < V) & _row_is_active(skip_ptr, row, SKIP)
    offsets = row * V + cols
    g = tl.load(grad_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    m = tl.load(exp_avg_ptr + offsets, mask=ok, other=0.0)
    v = tl.load(exp_avg_sq_ptr + offsets, mask=ok, other=0.0)
    m = m + (1.0 - beta1) * (g - m)  # torch's lerp
    v = beta2 * v + (1.0 - beta2) * g * g
    p = tl.load(param_ptr + offsets, mask=ok, other=0.0)
    p = p - lr_corrected * m / (tl.sqrt(v) * inv_bias2_sqrt + eps)
    tl.store(exp_avg_ptr + offsets, m, mask=ok)
    tl.store(exp_avg_sq_ptr + offsets, v, mask=ok)
    tl.store(param_ptr + offsets, p, mask=ok)


def adam_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    skip: torch.Tensor | None = None,
    block_v: int = 1024,
) -> None:
    """One Adam step (step count ``step`` >= 1) on contiguous (N, V) fp32 ``param`` and
    moments, in place. Rows where ``skip`` (N,) int32 is nonzero are not touched."""
    n, vocab = param.shape
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.shape != param.shape or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous with shape {tuple(param.shape)}")
    if not param.is_contiguous() or param.dtype != torch.float32:
        raise ValueError("param must be a contiguous float32 tensor")
    block = min(block_v, triton.next_power_of_2(vocab))
    _adam_kernel[(n, triton.cdiv(vocab, block))](
        param, grad, exp_avg, exp_avg_sq, exp_avg if skip is None else skip, vocab, lr / (1 - beta1**step),
        beta1, beta2, 1.0 / (1 - beta2**step) ** 0.5, eps, BLOCK_V=block, SKIP=skip is not None,
    )  # fmt: skip
