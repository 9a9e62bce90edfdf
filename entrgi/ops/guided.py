"""``guided_embedding``: the EntRGi embedding block, the package's single op seam."""

from __future__ import annotations

from typing import NamedTuple

import torch

from entrgi.ops import reference
from entrgi.ops.validation import (
    check_active,
    check_choice,
    check_embed_table,
    check_finite_rows,
    check_finite_table,
    check_generator,
    check_logits,
    check_optimizer_over,
    check_sampling_args,
    check_table_rows_range,
    resolve_backend,
)

MODES = ("entrgi", "aps", "expectation")


class GuidedEmbedding(NamedTuple):
    """Result of :func:`guided_embedding`; leading dims match ``phi``'s.

    embeds : (..., d), the table's dtype. Forward value ``soft + w (hard - soft)``;
        the gradient flows to phi only through ``soft``.
    tokens : (..., ) int64. Sampled hard tokens (``expectation``: argmax, no draw).
    weights : (..., ) float32. ``w`` (entrgi: normalised entropy; aps: 1; expectation: 0).
    argmax : (..., ) int64. ``argmax(phi)`` (first index on ties), used for EOS tests.

    Rows where the call's ``active`` mask is False hold embeds 0, tokens 0, weights 0
    and argmax 0, and pass no gradient.
    """

    embeds: torch.Tensor
    tokens: torch.Tensor
    weights: torch.Tensor
    argmax: torch.Tensor


class _StepOnBackward(torch.autograd.Function):
    """Identity on phi's rows whose backward hands the gradient to ``optimizer.step``
    and passes none on (``optimizer=`` when the step is not fused into a kernel)."""

    @staticmethod
    def forward(ctx, rows, optimizer):
        ctx.optimizer = optimizer
        return rows.view_as(rows)

    @staticmethod
    def backward(ctx, grad):
        ctx.optimizer.step(grad.view_as(ctx.optimizer.param))
        return None, None


def guided_embedding(
    phi: torch.Tensor,
    embed_table: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    mode: str = "entrgi",
    generator: torch.Generator | None = None,
    backend: str = "auto",
    check_values: bool = True,
    active: torch.Tensor | None = None,
    optimizer=None,
    table_rows: torch.Tensor | None = None,
) -> GuidedEmbedding:
    """Entropy-aware reward-guidance embedding of logits ``phi``.

    Per row: ``w = H(softmax(phi)) / log V`` (a constant), ``soft = softmax(phi/tau) @ E``,
    ``hard = E[x]`` with ``x ~ softmax(filter(phi/tau))`` (top-p then top-k, SPEC.md),
    ``embeds = soft + w * stopgrad(hard - soft)``.

    Parameters
    ----------
    phi : (..., V) float32/bfloat16/float16 logits.
    embed_table : (V, d) reward input embeddings indexed by the denoiser's vocabulary,
        or (V_t, d) in another vocabulary with ``table_rows``.
    temperature : tau >= 0, finite; 0 is greedy (one-hot argmax, no gradient).
    top_p : in (0, 1]; 1 disables. top_k : >= 0; 0 disables.
    mode : ``entrgi`` | ``aps`` (w = 1) | ``expectation`` (w = 0, no sample drawn).
    generator : source of the sampling noise (seeds the Triton kernel's Philox).
    backend : ``auto`` (Triton on CUDA) | ``torch`` | ``triton``.
    check_values : reject NaN / +inf / all -inf rows, rows whose largest logit / tau
        overflows float32, a non-finite table and out-of-range ``table_rows`` (reads
        values back: a host sync).
        The sampler passes False inside its captured step.
    active : (...,) bool, the rows to compute (default all). The Triton backend does
        not read the others (a canvas's committed positions cost next to nothing).
    optimizer : a :class:`~entrgi.optim.LogitAdam` over phi. phi's backward then takes
        the optimizer's step in place instead of producing a gradient (phi.grad stays
        None; run it as ``torch.autograd.backward(loss, inputs=[phi])``); the Triton
        backend applies the step inside its backward kernel, so dphi (N, V) is never
        stored. Rows outside ``active`` take no step (with a fresh optimizer and a
        fixed ``active`` they would not move anyway).
    table_rows : (V,) int32/int64. Token v's embedding is ``embed_table[table_rows[v]]``:
        the reward's own embedding matrix serves without a (V, d) copy in the
        denoiser's vocabulary (the Triton kernels gather through it).

    Example
    -------
    >>> out = guided_embedding(phi, E, temperature=0.7, top_p=0.95)
    >>> reward(out.embeds).sum().backward()   # gradient reaches phi
    """
    check_logits("phi", phi)
    check_embed_table(phi, embed_table, table_rows)
    check_sampling_args(temperature, top_p, top_k)
    check_choice("mode", mode, MODES)
    check_active(active, phi)
    if optimizer is not None:
        check_optimizer_over(optimizer, phi, temperature)
    check_generator(generator, phi.device)
    if check_values:
        check_finite_rows("phi", phi, temperature)
        check_finite_table(embed_table)
        if table_rows is not None:
            check_table_rows_range(table_rows, embed_table)
    backend = resolve_backend(backend, phi.device)
    lead = phi.shape[:-1]
    rows = phi.reshape(-1, phi.shape[-1])
    active_rows = None if active is None else active.reshape(-1)
    in_kernel = optimizer if backend == "triton" and optimizer is not None and optimizer.fused else None
    if optimizer is not None and in_kernel is None:
        rows = _StepOnBackward.apply(rows, optimizer)
    if backend == "triton":
        from entrgi.ops import triton_backend

        embeds, tokens, weights, argmax = triton_backend.guided_embedding(
            rows, embed_table, temperature, top_p, top_k, mode, generator, active_rows, in_kernel, table_rows
        )
    else:  # the reference reads a table in phi's vocabulary
        table = embed_table if table_rows is None else embed_table[table_rows]
        embeds, tokens, weights, argmax = reference.guided_embedding_reference(
            rows, table, temperature, top_p, top_k, mode, generator
        )
    if active_rows is not None:
        embeds = torch.where(active_rows[:, None], embeds, 0)
        tokens, weights, argmax = (x.where(active_rows, 0) for x in (tokens, weights, argmax))
    d = embed_table.shape[1]
    return GuidedEmbedding(embeds.reshape(*lead, d), tokens.reshape(lead), weights.reshape(lead), argmax.reshape(lead))
