"""Triton backend of the ops: launches ``entrgi_kernels`` and wires their autograd.

Inputs arrive validated and flattened to rows by the public ops. Randomness: Philox
seeds are drawn from ``generator`` into a device tensor (no host sync), so each call,
and each CUDA-graph replay, gets fresh noise while a seeded generator reproduces the
same draws. Inactive rows (``active`` False) are skipped: the per-row kernels do not
read them, and the GEMM-shaped kernels walk a device-side row list of the active rows.
"""

from __future__ import annotations

import torch
from torch.profiler import record_function

from entrgi.ops.layout import last_dim_contiguous


def available() -> bool:
    try:
        import entrgi_kernels.soft_embedding  # noqa: F401
    except ImportError:
        return False
    return True


def _draw_seeds(generator: torch.Generator | None, device: torch.device, count: int = 1) -> torch.Tensor:
    return torch.randint(0, 2**62, (count,), generator=generator, device=device, dtype=torch.int64)


def skip_flags(active: torch.Tensor | None) -> torch.Tensor | None:
    """(R,) int32, nonzero where the per-row kernels skip the row."""
    return None if active is None else (~active).to(torch.int32)


def row_list(active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R,) bool -> (order (R,) int32: active rows first, each group in row order;
    count (1,) int32: number of active rows). Device ops only (no sync, fixed shapes)."""
    n = active.shape[0]
    flags = active.to(torch.int32)
    count = flags.sum(dtype=torch.int32).reshape(1)
    active_before = torch.cumsum(flags, 0, dtype=torch.int32) - flags
    index = torch.arange(n, device=active.device, dtype=torch.int32)
    slot = torch.where(active, active_before, count + index - active_before)
    order = torch.empty_like(index).scatter_(0, slot.long(), index)
    return order, count


class _SoftEmbedding(torch.autograd.Function):
    """out = soft + w (E[token] - soft) with the gradient through soft only."""

    @staticmethod
    def forward(ctx, phi, table, table_rows, stats, weights, tokens, temperature, rows, optimizer):
        from entrgi_kernels.soft_embedding import soft_embedding_forward

        soft, out = soft_embedding_forward(
            phi, table, stats.tempered, stats.argmax, weights, tokens, temperature, rows, table_rows=table_rows
        )
        ctx.save_for_backward(phi, table, *stats.tempered, soft, *(rows or ()))
        ctx.table_rows, ctx.temperature, ctx.optimizer = table_rows, temperature, optimizer
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from entrgi_kernels.row_stats import SoftmaxNorm
        from entrgi_kernels.soft_embedding import soft_embedding_backward

        phi, table, row_max, lse_shifted, soft, *rows = ctx.saved_tensors
        args = (phi, table, grad_out, SoftmaxNorm(row_max, lse_shifted), soft, ctx.temperature, tuple(rows) or None)
        if ctx.optimizer is None:
            dphi = soft_embedding_backward(*args, table_rows=ctx.table_rows)
        else:  # the step happens in the kernel: dphi is never stored
            with record_function("entrgi.op_backward_with_adam"):
                soft_embedding_backward(*args, adam=ctx.optimizer.fused_update(), table_rows=ctx.table_rows)
            dphi = None
        return dphi, None, None, None, None, None, None, None, None


def _filtered_tokens(phi, stats, temperature, top_p, top_k, generator, skip):
    """One draw per row from softmax(filter(phi / tau)): four draws from the full law
    (by ``stats``' tile masses), the first in the kept set wins (one split-V pass over
    phi); the exact threshold search only for rows that reject all four (device-side
    skip, no host sync)."""
    from entrgi_kernels.sampling import rejection_sample, sample_filtered
    from entrgi_kernels.threshold import keep_threshold_keys

    seeds = _draw_seeds(generator, phi.device, 2)
    tokens, accepted = rejection_sample(phi, stats, seeds[:1], temperature, top_p, top_k, skip=skip)
    if top_p < 1.0 or 0 < top_k < phi.shape[1]:
        keys = keep_threshold_keys(phi, stats.tempered, temperature, top_p, top_k, skip=accepted)
        sample_filtered(phi, keys, seeds[1:], temperature, skip=accepted, tokens=tokens)
    return tokens


def guided_embedding(
    phi, table, temperature, top_p, top_k, mode, generator, active=None, optimizer=None, table_rows=None
):  # fmt: skip
    """Rows (R, V) -> embeds (R, d), tokens, weights, argmax (see ``guided_embedding``);
    rows where ``active`` (R,) is False are not computed (zeros, zero gradient).
    ``optimizer``: a fused LogitAdam whose step the backward kernel takes instead of
    returning dphi. ``table_rows`` (V,): token v's embedding is table[table_rows[v]]."""
    from entrgi_kernels.row_stats import row_stats

    phi, table = last_dim_contiguous(phi), last_dim_contiguous(table)
    skip = skip_flags(active)
    draws = temperature > 0 and mode != "expectation"
    stats = row_stats(phi.detach(), temperature if temperature > 0 else 1.0, skip, tiles=draws)
    weights = _mode_weights(stats.entropy, mode)
    if temperature == 0.0:
        greedy_rows = stats.argmax if table_rows is None else table_rows[stats.argmax]
        return table[greedy_rows], stats.argmax, weights, stats.argmax
    if mode == "expectation":
        tokens = stats.argmax
    else:
        tokens = _filtered_tokens(phi.detach(), stats, temperature, top_p, top_k, generator, skip)
    rows = None if active is None else row_list(active)
    embeds = _SoftEmbedding.apply(phi, table, table_rows, stats, weights, tokens, temperature, rows, optimizer)
    return embeds, tokens, weights, stats.argmax


def _mode_weights(entropy: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "entrgi":
        return entropy
    return torch.full_like(entropy, 1.0 if mode == "aps" else 0.0)


def sample_step(phi, phi_init, temperature, top_p, top_k, alg, generator, active=None):
    """Rows (R, V) -> tokens (R,), confidence (R,) (see ``sample_step``); ``phi_init``
    None means phi itself. Inactive rows are not read."""
    from entrgi_kernels.row_stats import row_stats
    from entrgi_kernels.sampling import sample_filtered
    from entrgi_kernels.threshold import keep_threshold_keys

    phi = last_dim_contiguous(phi.detach())
    skip = skip_flags(active)
    tau = temperature if temperature > 0 else 1.0  # greedy reads probabilities at tau = 1, as Dream
    kept_law = alg in ("maskgit_plus", "topk_margin")  # need the kept law's normaliser: threshold path
    stats = row_stats(phi, tau, skip, tiles=temperature > 0 and not kept_law)
    if kept_law:
        keys = keep_threshold_keys(phi, stats.tempered, tau, top_p, top_k, skip=skip)
        drawn = sample_filtered(phi, keys, _draw_seeds(generator, phi.device), tau, skip=skip)
        tokens = drawn["tokens"] if temperature > 0 else stats.argmax
        top1, lse_shifted = drawn["top1"], drawn["lse_kept_shifted"]
        if alg == "maskgit_plus":  # x / tau as the kernel computes it (fp32 x times fp32(1 / tau)), so the
            # top token gets exactly 0 - lse; a Python scalar, not a new device tensor (capturable)
            scaled = _logits_at(phi, tokens) * (1.0 / tau)
            return tokens, torch.exp(scaled - top1 - lse_shifted)
        return tokens, torch.exp(-lse_shifted) - torch.exp(drawn["top2"] - top1 - lse_shifted)
    if temperature > 0:
        tokens = _filtered_tokens(phi, stats, tau, top_p, top_k, generator, skip)
    else:
        tokens = stats.argmax
    if alg == "origin":
        return tokens, torch.zeros_like(stats.row_max)
    if alg == "low_confidence":
        return tokens, torch.exp(_logits_at(phi, tokens) - stats.row_max - stats.lse_1_shifted)
    return tokens, stats.plogp_tau if phi_init is None else entropy_confidence(phi_init, tau, active)


def _logits_at(phi: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """phi (R, V), tokens (R,) -> phi[r, tokens[r]] (R,) float32."""
    return phi.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).float()


def entropy_confidence(phi, temperature, active=None):
    """Rows (R, V) -> sum p log p of softmax(phi / tau) (R,), one row-stats pass;
    inactive rows are not read (0)."""
    from entrgi_kernels.row_stats import row_stats

    tau = temperature if temperature > 0 else 1.0
    return row_stats(last_dim_contiguous(phi.detach()), tau, skip_flags(active)).plogp_tau
