"""The gated activation of SwiGLU MLPs, ``silu(gate) * up``, forward and backward in
one elementwise pass each (eager PyTorch: 2 kernels forward, 3 or 4 backward). Rounding
follows the eager code's: silu(gate) is rounded to gate's dtype before ``up``
multiplies it, and the backward rounds ``grad * up`` before silu's derivative."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from entrgi_kernels.rounding import round_to

BLOCK = 2048


@triton.jit
def _silu(x):
    """As torch's kernel spells it (x / (1 + e^-x), not x * sigmoid(x): another rounding)."""
    return x / (1.0 + tl.exp(-x))


@triton.jit
def _silu_gate_forward_kernel(gate_ptr, up_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < numel
    gate = tl.load(gate_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    silu = round_to(_silu(gate), gate_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + offsets, round_to(silu * up, out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _silu_gate_backward_kernel(grad_ptr, gate_ptr, up_ptr, grad_gate_ptr, grad_up_ptr, numel, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < numel
    grad = tl.load(grad_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    sigmoid = 1.0 / (1.0 + tl.exp(-gate))
    silu = round_to(_silu(gate), gate_ptr.dtype.element_ty).to(tl.float32)
    grad_silu = round_to(grad * up, gate_ptr.dtype.element_ty).to(tl.float32)
    grad_gate = grad_silu * sigmoid * (1.0 + gate * (1.0 - sigmoid))
    tl.store(grad_gate_ptr + offsets, round_to(grad_gate, grad_gate_ptr.dtype.element_ty), mask=ok)
    tl.store(grad_up_ptr + offsets, round_to(grad * silu, grad_up_ptr.dtype.element_ty), mask=ok)


def silu_gate_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of two contiguous tensors of one shape and dtype."""
    out = torch.empty_like(gate)
    if gate.numel() == 0:  # no grid to launch
        return out
    _silu_gate_forward_kernel[(triton.cdiv(gate.numel(), BLOCK),)](gate, up, out, gate.numel(), BLOCK=BLOCK)
    return out


def silu_gate_backward(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dgate, dL/dup) from contiguous dL/dout ``grad`` and the forward's inputs."""
    grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
    if gate.numel() == 0:
        return grad_gate, grad_up
    _silu_gate_backward_kernel[(triton.cdiv(gate.numel(), BLOCK),)](
        grad, gate, up, grad_gate, grad_up, gate.numel(), BLOCK=BLOCK
    )
    return grad_gate, grad_up
