"""LLaDA's own layers run by the fused layer ops, as :mod:`entrgi.lean` runs the Llama
family's.

LLaDA ships its model as remote code (``modeling_llada.py``, OLMo's layout): its blocks
(``LLaDALlamaBlock``) call their own RMSNorm (``RMSLayerNorm``, swapped by
:func:`entrgi.lean.lean_forwards` with the others), rotary embedding (a
``RotaryEmbedding`` module per block) and SwiGLU MLP (``ff_proj`` the gate, ``up_proj``,
``ff_out`` the down projection, inline in the block's forward), which the Llama-family
swaps do not find. On CUDA (the triton backend) here:

- each block's ``RotaryEmbedding`` rotates q and k in one kernel (:func:`rotary_embedding`),
  with ``rope_full_precision`` (LLaDA-8B's config) in float32, rounded once to the
  model's dtype, as its code does;
- each block runs its q, k and v projections as one GEMM and its gate and up
  projections as another (:class:`entrgi.lean.StackedLinear`), the gate as one kernel,
  the attention's residual add inside the second norm's kernel and the MLP's inside its
  down projection's GEMM (:func:`add_rms_norm_writable`), the first norm handing its
  input back as the residual (:func:`rms_norm_with_residual`). Attention itself is the
  block's own ``attention`` (which calls the rotary module).

Each swap is made only where it reproduces the stock forward on a random input (within
``FUSED_ULPS``; :mod:`entrgi.swap_checks`), and a call the swap does not cover (a
key / value cache, training) runs the stock forward.
"""

from __future__ import annotations

from typing import Callable

import torch

from entrgi.lean import (
    GatedLinears, StackedLinear, lean_rms_norm, norm_epsilon, reproduces_with_fused_norms, residual_norm_mlp,
    runs_as_built,
)  # fmt: skip
from entrgi.ops.layer_ops import fits_fused_rotary, rms_norm_with_residual, rotary_embedding
from entrgi.ops.validation import resolve_backend
from entrgi.swap_checks import (
    Agreement, file_by_check, random_input, random_query_key, swapped_agrees, warn_kept_stock,
)  # fmt: skip

NORMS = ("attn_norm", "ff_norm")
LINEARS = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")
PLAIN_CALL = {"attention_bias", "layer_past", "use_cache"}  # the keywords LLaDAModel calls its blocks with


def is_llada_block(module: torch.nn.Module) -> bool:
    """A block in the shape of LLaDA's ``LLaDALlamaBlock``: lean-able norms ``NORMS``,
    linear layers ``LINEARS``, a SiLU ``act`` (run as built: no hooks) and an
    ``attention`` method."""
    if any(lean_rms_norm(getattr(module, name, None), "triton") is None for name in NORMS):
        return False
    if not all(isinstance(getattr(module, name, None), torch.nn.Linear) for name in LINEARS):
        return False
    act = getattr(module, "act", None)
    return isinstance(act, torch.nn.SiLU) and runs_as_built(act, None) and callable(getattr(module, "attention", None))


def _lean_block(module: torch.nn.Module) -> Callable:
    """The block's forward by the fused ops (see the module docstring); the stock forward
    for a call with a key / value cache or other arguments, in training mode, or with
    the block's own activation checkpointing on."""
    first_norm, second_norm = (getattr(module, name) for name in NORMS)
    first_eps, second_eps = norm_epsilon(first_norm), norm_epsilon(second_norm)
    projections = [module.q_proj, module.k_proj, module.v_proj]
    stacked = StackedLinear(projections) if StackedLinear.fits(projections) else None
    sizes = [linear.out_features for linear in projections]
    mlp = GatedLinears(module.ff_proj, module.up_proj, module.ff_out, "triton")

    def forward(x, *args, **kwargs):
        cached = kwargs.get("layer_past") is not None or kwargs.get("use_cache")
        checkpointed = getattr(module, "_activation_checkpoint_fn", None) is not None  # LLaDA's own, for training
        if args or set(kwargs) - PLAIN_CALL or cached or checkpointed or module.training:
            return type(module).forward(module, x, *args, **kwargs)
        normed, residual = rms_norm_with_residual(x, first_norm.weight, first_eps, "triton")
        if stacked is not None and stacked.current():
            q, k, v = stacked(normed).split(sizes, dim=-1)
        else:
            q, k, v = (linear(normed) for linear in projections)
        attended = module.attention(q, k, v, kwargs.get("attention_bias"))[0]
        return residual_norm_mlp(residual, attended, second_norm.weight, second_eps, mlp, mlp), None

    return forward


def is_llada_rotary(module: torch.nn.Module) -> bool:
    """A rotary module in the shape of LLaDA's ``RotaryEmbedding``: ``forward(q, k)`` with
    the angles from ``get_rotary_embedding(length, device)`` ((1, 1, T, D) sin and cos,
    float32) and a ``config.rope_full_precision``."""
    full = getattr(getattr(module, "config", None), "rope_full_precision", None)
    return isinstance(full, bool) and callable(getattr(module, "get_rotary_embedding", None))


def _fused_rotary(module: torch.nn.Module) -> Callable:
    """The rotary module's forward by one kernel for q and k (B, H, T, D): in float32
    and rounded once to q's dtype with ``rope_full_precision``, else in q's dtype; the
    stock forward for queries fewer than the keys (a cache) or tensors the kernel does
    not take."""

    def forward(q, k):
        length = k.shape[-2]
        if q.shape[-2] != length:
            return type(module).forward(module, q, k)
        sin, cos = (t[0] for t in module.get_rotary_embedding(length, q.device))  # (1, T, D) each
        if not module.config.rope_full_precision:
            cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        if not fits_fused_rotary(q, k, cos, sin):
            return type(module).forward(module, q, k)
        return rotary_embedding(q, k, cos, sin, "triton")

    return forward


def _rotary_reproduces(module: torch.nn.Module, fused: Callable, weight: torch.Tensor) -> Agreement:
    """Whether ``fused`` gives the rotary module's own output on random queries and keys
    (:func:`random_query_key`) of the dtype and on the device of ``weight`` (its block's)."""
    head_dim = module.get_rotary_embedding(3, weight.device)[0].shape[-1]
    q, k = random_query_key(head_dim, weight.dtype, torch.Generator(weight.device).manual_seed(0))
    with torch.no_grad():
        return swapped_agrees(module(q, k), lambda: fused(q, k))


def _block_reproduces(module: torch.nn.Module, lean: Callable) -> Agreement:
    """Whether ``lean`` gives the block's own output on a random (2, 3, width) input
    (:func:`reproduces_with_fused_norms`: what differs is where the residual adds run,
    the stacked GEMMs and the gate)."""
    first_norm = getattr(module, NORMS[0])
    x = random_input(module, first_norm.weight.shape[0], first_norm.weight.dtype)
    return reproduces_with_fused_norms(module, lean, [getattr(module, name) for name in NORMS], x)


def llada_forwards(model: torch.nn.Module, backend: str = "auto") -> list[tuple[torch.nn.Module, Callable]]:
    """(module, fused forward) for each LLaDA-shaped block of ``model`` and its rotary
    module, where the backend resolves to ``triton`` and the fused forward reproduces
    the stock one on a random input (a host sync per module: call once, at load time);
    those that do not are named in one warning."""
    parameter = next(model.parameters(), None)
    if parameter is None or resolve_backend(backend, parameter.device) != "triton":
        return []
    found, kept_stock = [], []
    for module in model.modules():
        if "forward" in module.__dict__ or not is_llada_block(module):
            continue
        rotary = getattr(module, "rotary_emb", None)
        if isinstance(rotary, torch.nn.Module) and "forward" not in rotary.__dict__ and is_llada_rotary(rotary):
            weight = module.q_proj.weight
            file_by_check(rotary, _fused_rotary(rotary), lambda m, f: _rotary_reproduces(m, f, weight), found,
                          kept_stock)  # fmt: skip
        file_by_check(module, _lean_block(module), _block_reproduces, found, kept_stock)
    warn_kept_stock(kept_stock, "the fused (triton) forward")
    return found
