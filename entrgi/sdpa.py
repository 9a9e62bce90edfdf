"""transformers' ``sdpa`` attention function, with the mask prepared once per forward
and grouped-query heads folded instead of repeated.

Under a mask, transformers' ``sdpa_attention_forward`` copies each key / value head
once per query head it serves (``repeat_kv``: two copies forward, two sums backward per
layer), since PyTorch's memory-efficient kernel takes no grouped heads, and every
layer's ``scaled_dot_product_attention`` turns the shared bool mask into an additive
one again (and pads its rows to an aligned stride when the key count is not a multiple
of 8). :class:`FoldedSdpa` runs each key / value head's query heads as one sequence
``groups`` times longer against that head's keys (a view of queries dense in (B, H, T,
D), the layout the fused rotary kernel writes), so keys and values are read as they
are, and prepares the additive, aligned, folded mask once per mask tensor. The output
comes back in the stock function's (B, T, H, D) layout (one copy; it is a view with no
grouping), and the backward copies the output's and the folded query's gradients once
each, the output's into the layout the kernel's backward reads (which spares the copy
that kernel makes of a gradient in any other). Per query row it is the same attention
over the same keys, though the kernel's products over the longer query block may sum in
another order (outputs equal up to rounding); the key / value gradients are summed over
a group inside the kernel rather than after it. A call the folding does not cover (no
4-D mask shared by the heads, dropout, a soft cap, a position bias, attention weights
asked for) goes to the stock function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from entrgi.attention import attention_implementation
from entrgi.ops.validation import resolve_backend
from entrgi.swap_checks import Agreement, swapped_agrees, warn_kept_stock

MASK_ALIGNMENT = 16  # elements: the memory-efficient kernel pads a mask whose row stride is not a multiple of 8

# keyword arguments that change what the stock function computes: a call that sets one goes to it
STOCK_ONLY = ("softcap", "position_bias", "s_aux", "sinks", "output_attentions")


def _stock_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


class FoldedSdpa:
    """A stand-in for transformers' ``sdpa`` attention function (same signature and
    output: (B, T, H, D_v), no weights). Keeps the masks it prepared, each with the
    tensor it came from (so an id is not reused): use one instance per model forward."""

    def __init__(self):
        self.stock = _stock_sdpa()
        self._masks: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        if not _folds(query, key, value, attention_mask, dropout, kwargs):
            return self.stock(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal,
                **kwargs,
            )  # fmt: skip
        batch, heads, length, dim = query.shape
        kv_heads = key.shape[1]
        groups = heads // kv_heads
        mask = self.prepared_mask(attention_mask, query.dtype, groups)
        folded = query.reshape(batch, kv_heads, groups * length, dim)  # head h = kv_head * groups + g
        out = F.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=scaling)
        if groups == 1:
            return out.transpose(1, 2).contiguous(), None  # the stock layout: a view
        return _UnfoldedHeads.apply(out, groups), None

    def prepared_mask(self, mask: torch.Tensor, dtype: torch.dtype, groups: int) -> torch.Tensor:
        """(B or 1, 1, T, L) ``mask`` as the folded call reads it: (B or 1, 1, groups * T,
        L), the T rows once per group, additive in ``dtype`` (bool: 0 where allowed and
        -inf elsewhere, as sdpa converts it), rows at an aligned stride; built on the
        first call for a mask tensor, dtype and group count, reused after."""
        cache_key = (id(mask), dtype, groups)
        if (cached := self._masks.get(cache_key)) is not None and cached[0] is mask:
            return cached[1]
        batch, _, length, keys = mask.shape
        stride = -(-keys // MASK_ALIGNMENT) * MASK_ALIGNMENT
        prepared = torch.empty(batch, 1, groups * length, stride, dtype=dtype, device=mask.device)[..., :keys]
        rows = prepared.unflatten(2, (groups, length))
        if mask.dtype == torch.bool:
            rows.fill_(float("-inf")).masked_fill_(mask[:, :, None], 0.0)
        else:
            rows.copy_(mask[:, :, None].expand(rows.shape))
        self._masks[cache_key] = (mask, prepared)
        return prepared


class _UnfoldedHeads(torch.autograd.Function):
    """The folded attention's output (B, H_kv, groups * T, D_v) as (B, T, H, D_v),
    contiguous, head h = kv_head * groups + g: one copy each way. The backward writes
    the gradient in (B, groups * T, H_kv, D_v) memory order, the output's own (the
    memory-efficient kernel writes it so), which is the order that kernel's backward
    reads the gradient in: in any other it makes a contiguous copy first."""

    @staticmethod
    def forward(ctx, out, groups):
        batch, kv_heads, folded, width = out.shape
        ctx.groups = groups
        unfolded = torch.empty(batch, folded // groups, kv_heads * groups, width, dtype=out.dtype, device=out.device)
        grouped = out.unflatten(2, (groups, folded // groups)).permute(0, 3, 1, 2, 4)  # (B, T, H_kv, groups, D_v)
        unfolded.view(grouped.shape).copy_(grouped)
        return unfolded

    @staticmethod
    def backward(ctx, grad):
        batch, length, heads, width = grad.shape
        kv_heads = heads // ctx.groups
        folded = torch.empty(batch, ctx.groups, length, kv_heads, width, dtype=grad.dtype, device=grad.device)
        folded.copy_(grad.reshape(batch, length, kv_heads, ctx.groups, width).permute(0, 3, 1, 2, 4))
        return folded.view(batch, ctx.groups * length, kv_heads, width).transpose(1, 2), None


def _folds(query, key, value, mask, dropout, kwargs) -> bool:
    """Whether :class:`FoldedSdpa` covers a call (shapes and flags only: no host sync)."""
    if dropout or any(kwargs.get(name) is not None and kwargs.get(name) is not False for name in STOCK_ONLY):
        return False
    if not isinstance(mask, torch.Tensor) or not query.dim() == key.dim() == value.dim() == mask.dim() == 4:
        return False
    batch, heads, length, _ = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    shapes_fit = key.shape[0] == value.shape[0] == batch and value.shape[1:3] == (kv_heads, keys)
    mask_fits = mask.shape[0] in (1, batch) and mask.shape[1:] == (1, length, keys)
    return shapes_fit and mask_fits and heads % kv_heads == 0 and mask.dtype in (torch.bool, query.dtype)


def _geometry(model: torch.nn.Module) -> tuple[int, int, int]:
    """(heads, key / value heads, head size) of ``model``'s attention, from its config."""
    config = model.config
    heads = getattr(config, "num_attention_heads", 4)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, "hidden_size", 16 * heads) // heads
    return heads, kv_heads, head_dim


def folded_sdpa_reproduces(model: torch.nn.Module) -> Agreement:
    """Whether :class:`FoldedSdpa` gives the stock function's output on random queries,
    keys, values and a key-padding mask of ``model``'s geometry, dtype and device
    (within ``FUSED_ULPS``; a host sync: call once, at load time)."""
    parameter = next(model.parameters())
    heads, kv_heads, head_dim = _geometry(model)
    generator = torch.Generator(parameter.device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=parameter.device).to(parameter.dtype)

    query, key, value = randn(2, heads, 5, head_dim), randn(2, kv_heads, 7, head_dim), randn(2, kv_heads, 7, head_dim)
    mask = torch.rand(2, 1, 5, 7, generator=generator, device=parameter.device) < 0.7
    mask[..., 0] = True  # no row fully masked
    with torch.no_grad():
        want = _stock_sdpa()(model, query, key, value, mask, scaling=head_dim**-0.5)[0]
        return swapped_agrees(want, lambda: FoldedSdpa()(model, query, key, value, mask, scaling=head_dim**-0.5)[0])


def folded_sdpa_fits(model: torch.nn.Module, backend: str = "auto") -> bool:
    """Whether ``model`` should run :class:`FoldedSdpa`: it runs transformers' stock
    ``sdpa`` function, the backend resolves to ``triton`` (``torch``: the stock code
    runs), and the folded function reproduces the stock one on a random input
    (:func:`folded_sdpa_reproduces`: a host sync, call once, at load time)."""
    parameter = next(model.parameters(), None)
    if parameter is None or resolve_backend(backend, parameter.device) != "triton":
        return False
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if attention_implementation(model) != "sdpa" or ALL_ATTENTION_FUNCTIONS.get("sdpa") is not _stock_sdpa():
        return False
    if agreement := folded_sdpa_reproduces(model):
        return True
    warn_kept_stock([(f"{type(model).__name__}'s sdpa attention", agreement)], "the folded grouped-query sdpa")
    return False


def folded_sdpa_swap() -> tuple[object, str, dict]:
    """(object, attribute, value) for :func:`entrgi.layers.swapped_attributes` that makes
    transformers' ``sdpa`` attention, for every model, a fresh :class:`FoldedSdpa`: the
    attention mapping's per-instance overrides, with it added."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS, "_local_mapping", {**ALL_ATTENTION_FUNCTIONS._local_mapping, "sdpa": FoldedSdpa()}
