"""The gated activation of SwiGLU MLPs, ``silu(gate) * up``, forward and backward in
one elementwise pass each (eager PyTorch: 2 kernels forward, 3 or 4 backward). Rounding
follows the eager code's: silu(gate) is rounded to gate's dtype before ``up``
multiplies it, and the backward rounds ``grad * up`` before silu's derivative.

Operands are (rows, width) with a row stride each, so ``gate`` and ``up`` may be the two
halves of one (rows, 2 width) GEMM output (the gate and up projections stacked), and
their gradients the two halves of one buffer: the backward then feeds one GEMM."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from entrgi_kernels.launch import FP_FUSION
from entrgi_kernels.rounding import round_to

BLOCKS = (2048, 1024, 512)  # elements per program; a row wider than the block is split across programs


@triton.jit
def _silu(x):
    """As torch's kernel spells it (x / (1 + e^-x), not x * sigmoid(x): another rounding)."""
    return x / (1.0 + tl.exp(-x))


@triton.jit
def _tile(width, BLOCK: tl.constexpr):
    """This program's row (int64) and columns, and the in-row mask."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    return row, cols, cols < width


@triton.jit
def _silu_gate_forward_kernel(gate_ptr, up_ptr, out_ptr, width, stride_in, stride_out, BLOCK: tl.constexpr):
    row, cols, ok = _tile(width, BLOCK)
    gate = tl.load(gate_ptr + row * stride_in + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * stride_in + cols, mask=ok, other=0.0).to(tl.float32)
    silu = round_to(_silu(gate), gate_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, round_to(silu * up, out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _silu_gate_backward_kernel(
    grad_ptr, gate_ptr, up_ptr, grad_gate_ptr, grad_up_ptr, width, stride_grad, stride_in, stride_grad_in,
    BLOCK: tl.constexpr,
):  # fmt: skip
    row, cols, ok = _tile(width, BLOCK)
    grad = tl.load(grad_ptr + row * stride_grad + cols, mask=ok, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + row * stride_in + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * stride_in + cols, mask=ok, other=0.0).to(tl.float32)
    sigmoid = 1.0 / (1.0 + tl.exp(-gate))
    silu = round_to(_silu(gate), gate_ptr.dtype.element_ty).to(tl.float32)
    grad_silu = round_to(grad * up, gate_ptr.dtype.element_ty).to(tl.float32)
    grad_gate = grad_silu * sigmoid * (1.0 + gate * (1.0 - sigmoid))
    out = row * stride_grad_in + cols
    tl.store(grad_gate_ptr + out, round_to(grad_gate, grad_gate_ptr.dtype.element_ty), mask=ok)
    tl.store(grad_up_ptr + out, round_to(grad * silu, grad_up_ptr.dtype.element_ty), mask=ok)


def _geometry(rows: int, width: int) -> tuple[tuple[int, int], int]:
    """The grid and block for rows of ``width``: the block that pads a row least (the
    widest among equals): 3,072 columns take three blocks of 1,024, not two of 2,048."""
    block = min(BLOCKS, key=lambda b: (triton.cdiv(width, b) * b, -b))
    return (rows, triton.cdiv(width, block)), block


def _check_rows(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dim() != 2 or t.stride(1) != 1:
            raise ValueError(f"silu_gate kernels take (rows, width) tensors with contiguous rows, got shape "
                             f"{tuple(t.shape)} strides {t.stride()}")  # fmt: skip


def silu_gate_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (rows, width), contiguous, from (rows, width) ``gate`` and
    ``up`` of one dtype sharing a row stride (e.g. the halves of one buffer)."""
    rows, width = gate.shape
    out = torch.empty(rows, width, dtype=gate.dtype, device=gate.device)
    if out.numel() == 0:  # no grid to launch
        return out
    _check_rows(gate, up)
    grid, block = _geometry(rows, width)
    _silu_gate_forward_kernel[grid](
        gate, up, out, width, gate.stride(0), width, BLOCK=block, enable_fp_fusion=FP_FUSION
    )
    return out


def silu_gate_backward(
    grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, grad_gate: torch.Tensor, grad_up: torch.Tensor
) -> None:
    """Writes dL/dgate and dL/dup into ``grad_gate`` and ``grad_up`` (rows, width; one
    row stride, e.g. the halves of one buffer) from dL/dout ``grad`` and the forward's
    ``gate`` and ``up``."""
    rows, width = gate.shape
    if grad.numel() == 0:
        return
    _check_rows(grad, gate, up, grad_gate, grad_up)
    grid, block = _geometry(rows, width)
    _silu_gate_backward_kernel[grid](
        grad, gate, up, grad_gate, grad_up, width, grad.stride(0), gate.stride(0), grad_gate.stride(0), BLOCK=block,
        enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
