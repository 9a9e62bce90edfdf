"""Memory-lean autograd for a reward model's RMSNorms and SiLU-gated MLPs.

Guidance differentiates the reward with respect to its input embeddings only, so what
autograd keeps between the reward's forward and backward is activation memory, per
token and layer. Stock transformers code (Llama / Qwen / Mistral families) keeps, for
each RMSNorm, a float32 copy of its input (twice the bfloat16 input) and, for each gated
MLP, ``gate``, ``up`` and ``silu(gate)``. Here an RMSNorm keeps its input in its own
dtype and one 1/rms per row, and the gated product keeps ``gate`` and ``up`` and
recomputes ``silu(gate)`` in the backward (one elementwise op). For a Qwen3-1.7B layer
over 16 x 200 bfloat16 tokens that is 172 MiB kept instead of 253 MiB (counted with
saved-tensor hooks on CPU, :func:`kept_bytes`; ``bench/reward_memory.py``; attention's
own tensors unchanged).

Exactness: each module is swapped only after its lean forward gave bit-identical output
to its own forward on a random input (:func:`lean_forwards`), and the backwards apply
the ATen ops autograd applies to the stock code, in its order, so gradients match too:
bit for bit in bfloat16 (tested on CPU); in float32, where the norm's input needs no
cast, up to the order in which autograd adds the residual branch's gradient (rounding).
Used for layers neither compiled nor checkpointed (:class:`entrgi.layers.LayerRunner`).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


class _RMSNorm(torch.autograd.Function):
    """``weight * (x32 * rsqrt(mean(x32²) + eps)).to(x.dtype)`` with ``x32 = x.float()``,
    keeping x (not x32) and 1/rms. For a frozen ``weight`` (it gets no gradient)."""

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


class _SiluGate(torch.autograd.Function):
    """``silu(gate) * up``, keeping gate and up; silu(gate) is recomputed in the backward."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)


def _lean_rms_norm(module: torch.nn.Module) -> Callable | None:
    eps, weight = getattr(module, "variance_epsilon", None), getattr(module, "weight", None)
    if not isinstance(eps, float) or not isinstance(weight, torch.nn.Parameter) or weight.dim() != 1:
        return None
    if weight.requires_grad:  # a trained norm needs its weight's gradient: left as it is
        return None
    return lambda hidden_states: _RMSNorm.apply(hidden_states, module.weight, eps)


def _lean_gated_mlp(module: torch.nn.Module) -> Callable | None:
    projections = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(p, torch.nn.Linear) for p in projections) or not hasattr(module, "act_fn"):
        return None
    gate_proj, up_proj, down_proj = projections
    return lambda x: down_proj(_SiluGate.apply(gate_proj(x), up_proj(x)))


def _same_output(module: torch.nn.Module, lean: Callable, width: int, dtype: torch.dtype) -> bool:
    device = next(module.parameters()).device
    generator = torch.Generator(device).manual_seed(0)
    x = torch.randn(2, 3, width, generator=generator, device=device).to(dtype)
    with torch.no_grad():
        return torch.equal(module.forward(x), lean(x))


def lean_forwards(model: torch.nn.Module) -> list[tuple[torch.nn.Module, Callable]]:
    """(module, lean forward) for each of ``model``'s RMSNorms and SiLU-gated MLPs whose
    lean forward reproduces the module's own bit for bit on a random input (a host
    sync per module: call once, at load time). Other modules are left out, and so is
    one whose forward a hook library replaced on the instance (e.g. accelerate's
    offloading, which loads the weights inside that forward)."""
    found = []
    for module in model.modules():
        if "forward" in module.__dict__:
            continue
        if (lean := _lean_rms_norm(module)) is not None:
            width, dtype = module.weight.shape[0], module.weight.dtype
        elif (lean := _lean_gated_mlp(module)) is not None:
            width, dtype = module.gate_proj.in_features, module.gate_proj.weight.dtype
        else:
            continue
        if _same_output(module, lean, width, dtype):
            found.append((module, lean))
    return found


def kept_bytes(run: Callable[[], object], model: torch.nn.Module) -> int:
    """Bytes of the distinct storages, other than ``model``'s parameters, that autograd
    keeps for the backward while ``run()`` executes (saved-tensor hooks: any device)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(kept.values())
