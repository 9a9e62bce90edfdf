"""A forward for attention layers that normalise each query and key head before the
rotary embedding (Qwen3's ``q_norm`` and ``k_norm``), running both norms and the rotation
as one Triton kernel each way (:func:`entrgi.ops.layer_ops.normed_rotary_embedding`).

The stock forward calls ``q_norm``, ``k_norm`` and ``apply_rotary_pos_emb`` one by one:
three launches forward and three backward, with the normed rows written and read in
between. :class:`NormedRotaryAttention` is that forward with the three calls replaced by
one, and everything else as the stock code has it: the projections (stacked ones where
:func:`entrgi.lean.lean_forwards` stacked them), the cache's ``update``, the model's
attention function (``ALL_ATTENTION_FUNCTIONS``, so :mod:`entrgi.sdpa`'s folded
attention where it is swapped in), ``o_proj``. A call it does not cover runs the stock
forward: positional arguments past the mask, or a key/value cache other than this
package's prefix caches (whose ``update`` takes keys, values and the layer index alone,
under every transformers version); tensors the fused kernel does not take get the stock
norm and rotary calls.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch

from entrgi.layers import CACHE_KWARGS, swapped_attributes
from entrgi.lean import ROTARY, fused_rotary, lean_rms_norm, runs_as_built
from entrgi.ops.layer_ops import fits_fused_rotary, normed_rotary_embedding
from entrgi.ops.validation import resolve_backend
from entrgi.rewards.prefix_cache import OWN_CACHES, PrefixKeysValues, cache_argument
from entrgi.swap_checks import (
    Agreement, file_by_check, random_input, random_rotary, swapped_agrees, warn_kept_stock,
)  # fmt: skip

PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")


class NormedRotaryAttention:
    """The forward of a Qwen3-style attention ``module`` (``PARTS``, ``head_dim``,
    ``layer_idx``, ``scaling``, ``config._attn_implementation``; its modelling module's
    ``eager_attention_forward`` and ``apply_rotary_pos_emb``) with its head norms and
    rotary embedding fused."""

    def __init__(self, module: torch.nn.Module, eager_attention: Callable):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        self.module, self.eager_attention = module, eager_attention
        self.attention_functions = ALL_ATTENTION_FUNCTIONS  # looked up per call: swaps (folded sdpa) apply

    def _stock(self, *args, **kwargs):
        return type(self.module).forward(self.module, *args, **kwargs)

    def __call__(self, hidden_states, position_embeddings=None, attention_mask=None, *args, **kwargs):
        caches = [kwargs[name] for name in CACHE_KWARGS if kwargs.get(name) is not None]
        cos, sin = position_embeddings if isinstance(position_embeddings, tuple) else (None, None)
        if args or cos is None or any(type(cache) not in OWN_CACHES for cache in caches):
            return self._stock(hidden_states, position_embeddings, attention_mask, *args, **kwargs)
        module = self.module
        input_shape = hidden_states.shape[:-1]
        heads = (*input_shape, -1, module.head_dim)
        q, k, v = (getattr(module, name)(hidden_states).view(heads) for name in PARTS[:3])
        q_norm, k_norm = module.q_norm, module.k_norm
        if fits_fused_rotary(q, k, cos, sin) and q_norm.weight.dtype == cos.dtype == q.dtype:
            q, k = normed_rotary_embedding(q.transpose(1, 2), k.transpose(1, 2), cos, sin, q_norm.weight,
                                           k_norm.weight, q_norm.variance_epsilon, "triton")  # fmt: skip
        else:  # tensors the kernel does not take, or float32 cos and sin (a float32 stock result): the stock calls
            rotate = getattr(sys.modules[type(module).__module__], ROTARY)
            q, k = rotate(q_norm(q).transpose(1, 2), k_norm(k).transpose(1, 2), cos, sin)
        v = v.transpose(1, 2)
        for name in CACHE_KWARGS:
            if (cache := kwargs.pop(name, None)) is not None:
                k, v = cache.update(k, v, module.layer_idx)
        attention = self.attention_functions.get_interface(module.config._attn_implementation, self.eager_attention)
        if hasattr(module, "sliding_window"):
            kwargs["sliding_window"] = module.sliding_window
        dropout = module.attention_dropout if module.training else 0.0
        out, weights = attention(module, q, k, v, attention_mask, dropout=dropout, scaling=module.scaling, **kwargs)
        return module.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def _fits(module: torch.nn.Module) -> Callable | None:
    """The modelling module's ``eager_attention_forward`` where ``module`` is a
    Qwen3-style attention :class:`NormedRotaryAttention` can run (frozen head norms of
    one eps and dtype, without hooks or forwards of their own; a power-of-two head
    size); else None."""
    parts = [getattr(module, name, None) for name in PARTS]
    if any(not isinstance(part, torch.nn.Module) for part in parts) or "forward" in module.__dict__:
        return None
    head_dim = getattr(module, "head_dim", None)
    if not isinstance(head_dim, int) or head_dim < 2 or head_dim & (head_dim - 1):
        return None
    q_norm, k_norm = parts[4:]
    if lean_rms_norm(q_norm, "triton") is None or lean_rms_norm(k_norm, "triton") is None:
        return None
    if not (runs_as_built(q_norm, None) and runs_as_built(k_norm, None)):  # hooks the fused op would skip
        return None
    if q_norm.weight.shape != (head_dim,) or k_norm.weight.shape != (head_dim,):
        return None
    if q_norm.variance_epsilon != k_norm.variance_epsilon or q_norm.weight.dtype != k_norm.weight.dtype:
        return None
    if not isinstance(parts[0], torch.nn.Linear) or parts[0].weight.dtype != q_norm.weight.dtype:
        return None  # the kernel's norm weights are of the queries' dtype
    python_module = sys.modules.get(type(module).__module__)
    eager = getattr(python_module, "eager_attention_forward", None)
    has_config = hasattr(getattr(module, "config", None), "_attn_implementation")
    fits = callable(getattr(python_module, ROTARY, None)) and has_config and hasattr(module, "layer_idx")
    return eager if fits and callable(eager) else None


def _normed_attention_reproduces(module: torch.nn.Module, fused: NormedRotaryAttention) -> Agreement:
    """Whether ``fused`` gives the stock forward's output (within ``FUSED_ULPS``; the
    stock one with its norms and rotary embedding run by the separate fused kernels, so
    what differs is the kernel boundaries) on a random input, once without a mask or
    cache and once with a cached prefix and a 4-D mask. Raises one of ``CALL_MISFITS``
    where the module needs other arguments."""
    width, dtype = module.q_proj.in_features, module.q_proj.weight.dtype
    x = random_input(module, width, dtype)
    generator = torch.Generator(x.device).manual_seed(2)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=x.device).to(dtype)

    rotary = random_rotary(module.head_dim, dtype, generator)
    kv_heads = module.k_proj.out_features // module.head_dim
    prefix = PrefixKeysValues([randn(2, kv_heads, 2, module.head_dim)], [randn(2, kv_heads, 2, module.head_dim)])
    mask = torch.ones(2, 1, 3, 5, dtype=torch.bool, device=x.device).tril(2)
    mask[1, :, :, 0] = False  # a padded prefix position
    stock_parts = [(norm, "forward", lean_rms_norm(norm, "triton")) for norm in (module.q_norm, module.k_norm)]
    python_module = sys.modules[type(module).__module__]
    stock_parts.append((python_module, ROTARY, fused_rotary(getattr(python_module, ROTARY))))
    calls = [{"attention_mask": None}, {"attention_mask": mask, cache_argument(module): prefix.for_layer(0)}]
    with torch.no_grad():
        for kwargs in calls:
            with swapped_attributes(stock_parts):
                want = module(x, position_embeddings=rotary, **kwargs)
            agreement = swapped_agrees(want[0], lambda: fused(x, position_embeddings=rotary, **kwargs)[0])
            if not agreement:
                break
    return agreement


def normed_attention_forwards(model: torch.nn.Module, backend: str = "auto") -> list[tuple[torch.nn.Module, Callable]]:
    """(module, :class:`NormedRotaryAttention`) for each of ``model``'s Qwen3-style
    attention layers, when the backend resolves to ``triton`` (``torch``: the stock
    forward with lean norms already runs) and the fused forward reproduces the stock
    one (:func:`_normed_attention_reproduces`: host syncs, call once, at load time)."""
    parameter = next(model.parameters(), None)
    if parameter is None or resolve_backend(backend, parameter.device) != "triton":
        return []
    found, kept_stock = [], []
    for module in model.modules():
        if (eager := _fits(module)) is not None:
            fused = NormedRotaryAttention(module, eager)
            file_by_check(module, fused, _normed_attention_reproduces, found, kept_stock)
    warn_kept_stock(kept_stock, "the normed rotary attention")
    return found
