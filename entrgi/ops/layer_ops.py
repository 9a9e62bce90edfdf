"""RMSNorm and the SwiGLU gate of a frozen transformer layer, with the gradient to the
activations only (guidance differentiates a reward with respect to its inputs).

Both backends keep the same tensors for the backward, less than the stock module code
does: an RMSNorm keeps its input in its own dtype and 1 / rms per row (the stock code
keeps a float32 copy of the input too), the gate keeps ``gate`` and ``up`` and
recomputes ``silu(gate)``.

``torch``: the ATen ops autograd applies to the stock code, in its order, so values
and gradients match it bit for bit. ``triton``: one kernel per forward and backward
(``kernels/rms_norm.py``, ``kernels/silu_gate.py``), the same roundings in the same
places; only the order of an RMSNorm's row sum differs (16-bit results equal or one
unit in the last place apart). One guidance call of a Qwen3-1.7B reward over 16 x 137
tokens moves 79.6 GB in 3,819 elementwise launches with the ``torch`` backend and
29.0 GB in 1,560 with ``triton``, against 15.2 GB for all its GEMMs (counted on the
meta device by ``bench/layer_traffic.py``; not a timing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from entrgi.ops.validation import FLOAT_DTYPES, resolve_backend


class _TorchRMSNorm(torch.autograd.Function):
    """``weight * (x32 * rsqrt(mean(x32²) + eps)).to(x.dtype)`` with ``x32 = x.float()``,
    keeping x (not x32) and 1/rms."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        x32 = x.to(torch.float32)
        inv_rms = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, inv_rms)
        return weight * (x32 * inv_rms).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, inv_rms = ctx.saved_tensors
        x32 = x.to(torch.float32)
        grad_normed = (grad * weight).to(torch.float32)
        grad_inv_rms = (grad_normed * x32).sum(-1, keepdim=True)
        grad_mean_square = -0.5 * grad_inv_rms * inv_rms.pow(3)  # rsqrt's backward
        grad_square = grad_mean_square / x.shape[-1]  # mean's backward (broadcast below)
        grad_x32 = grad_normed * inv_rms + grad_square * (2 * x32)
        return grad_x32.to(x.dtype), None, None


class _TritonRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        from entrgi_kernels.rms_norm import rms_norm_forward

        rows = x.reshape(-1, x.shape[-1])
        y, inv_rms = rms_norm_forward(rows, weight, eps)
        ctx.save_for_backward(rows, weight, inv_rms)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, grad):
        from entrgi_kernels.rms_norm import rms_norm_backward

        rows, weight, inv_rms = ctx.saved_tensors
        grad_rows = grad.reshape(rows.shape).contiguous()
        return rms_norm_backward(grad_rows, rows, weight, inv_rms).view(grad.shape), None, None


class _TorchSiluGate(torch.autograd.Function):
    """``silu(gate) * up``, keeping gate and up; silu(gate) is recomputed in the backward."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)


class _TritonSiluGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        from entrgi_kernels.silu_gate import silu_gate_forward

        ctx.save_for_backward(gate, up)
        return silu_gate_forward(gate, up)

    @staticmethod
    def backward(ctx, grad):
        from entrgi_kernels.silu_gate import silu_gate_backward

        gate, up = ctx.saved_tensors
        return silu_gate_backward(grad.contiguous(), gate, up)


def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "auto") -> torch.Tensor:
    """RMSNorm of ``x`` (..., H) with a frozen ``weight`` (H,), as Llama / Qwen /
    Mistral compute it: ``weight * (x32 * rsqrt(mean(x32²) + eps)).to(x.dtype)``, x32 =
    x in float32; the result in the promoted dtype of weight and x. Differentiable in
    ``x`` only (``weight`` must not require a gradient). ``backend``: ``auto`` (Triton
    on CUDA) | ``torch`` | ``triton``."""
    _check_float("x", x)
    _check_float("weight", weight)
    if weight.dim() != 1 or x.dim() < 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rms_norm needs x (..., H) and weight (H,), got {tuple(x.shape)} and {tuple(weight.shape)}")
    if weight.requires_grad:
        raise ValueError("rms_norm gives no gradient to weight, but weight requires one")
    if weight.device != x.device:
        raise ValueError(f"x is on {x.device} but weight is on {weight.device}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if resolve_backend(backend, x.device) == "triton":
        return _TritonRMSNorm.apply(x.contiguous(), weight.contiguous(), float(eps))
    return _TorchRMSNorm.apply(x, weight, eps)


def silu_gate(gate: torch.Tensor, up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``silu(gate) * up`` (a SwiGLU MLP's activation) of two tensors of one shape,
    dtype and device, keeping only gate and up for the backward. ``backend``: ``auto``
    (Triton on CUDA) | ``torch`` | ``triton``."""
    _check_float("gate", gate)
    _check_float("up", up)
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(
            f"silu_gate needs gate and up of one shape, dtype and device, got {tuple(gate.shape)} {gate.dtype} "
            f"{gate.device} and {tuple(up.shape)} {up.dtype} {up.device}"
        )
    if resolve_backend(backend, gate.device) == "triton":
        return _TritonSiluGate.apply(gate.contiguous(), up.contiguous())
    return _TorchSiluGate.apply(gate, up)
