"""Triton backend of the ops: launches ``entrgi_kernels`` and wires their autograd.

Inputs arrive validated and flattened to rows by the public ops. Randomness: a
Philox seed is drawn from ``generator`` into a device tensor (no host sync), so each
call, and each CUDA-graph replay, gets fresh noise while a seeded generator
reproduces the same draws.
"""

from __future__ import annotations

import torch


def available() -> bool:
    try:
        import entrgi_kernels.soft_embedding  # noqa: F401
    except ImportError:
        return False
    return True


def _draw_seeds(generator: torch.Generator | None, device: torch.device, count: int = 1) -> torch.Tensor:
    return torch.randint(0, 2**62, (count,), generator=generator, device=device, dtype=torch.int64)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class _SoftEmbedding(torch.autograd.Function):
    """out = soft + w (E[token] - soft) with the gradient through soft only."""

    @staticmethod
    def forward(ctx, phi, table, lse_tau, weights, tokens, temperature):
        from entrgi_kernels.soft_embedding import soft_embedding_forward

        soft, out = soft_embedding_forward(phi, table, lse_tau, weights, tokens, temperature)
        ctx.save_for_backward(phi, table, lse_tau, soft)
        ctx.temperature = temperature
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from entrgi_kernels.soft_embedding import soft_embedding_backward

        phi, table, lse_tau, soft = ctx.saved_tensors
        dphi = soft_embedding_backward(phi, table, grad_out, lse_tau, soft, ctx.temperature)
        return dphi, None, None, None, None, None


def _filtered_draw(phi, temperature, top_p, top_k, generator, phi_init=None):
    from entrgi_kernels.row_stats import row_stats
    from entrgi_kernels.sampling import sample_filtered
    from entrgi_kernels.threshold import keep_threshold_keys

    lse_tau, entropy, argmax = row_stats(phi, temperature)
    keys = keep_threshold_keys(phi, lse_tau, temperature, top_p, top_k)
    drawn = sample_filtered(phi, keys, _draw_seeds(generator, phi.device), temperature, phi_init)
    return lse_tau, entropy, argmax, drawn


def _guidance_draw(phi, temperature, top_p, top_k, generator):
    """Row stats and one filtered draw per row: rejection sampling from the full law
    (about one extra pass when the kept mass is large), the exact threshold search
    only for rows rejected every round (device-side skip, no host sync)."""
    from entrgi_kernels.row_stats import row_stats
    from entrgi_kernels.sampling import rejection_sample, sample_filtered
    from entrgi_kernels.threshold import keep_threshold_keys

    lse_tau, entropy, argmax = row_stats(phi, temperature)
    seeds = _draw_seeds(generator, phi.device, 2)
    tokens, accepted = rejection_sample(phi, lse_tau, seeds[:1], temperature, top_p, top_k)
    if top_p < 1.0 or 0 < top_k < phi.shape[1]:
        keys = keep_threshold_keys(phi, lse_tau, temperature, top_p, top_k, skip=accepted)
        sample_filtered(phi, keys, seeds[1:], temperature, skip=accepted, tokens=tokens)
    return lse_tau, entropy, argmax, tokens


def guided_embedding(phi, table, temperature, top_p, top_k, mode, generator):
    """Rows (R, V) -> embeds (R, d), tokens, weights, argmax (see ``guided_embedding``)."""
    from entrgi_kernels.row_stats import row_stats

    phi, table = _rows(phi), _rows(table)
    if temperature == 0.0:
        argmax = phi.argmax(-1)
        _, entropy, _ = row_stats(phi.detach(), 1.0)
        weights = _mode_weights(entropy, mode)
        return table[argmax], argmax, weights, argmax
    if mode == "expectation":
        lse_tau, entropy, argmax = row_stats(phi.detach(), temperature)
        tokens = argmax
    else:
        lse_tau, entropy, argmax, tokens = _guidance_draw(phi.detach(), temperature, top_p, top_k, generator)
    weights = _mode_weights(entropy, mode)
    embeds = _SoftEmbedding.apply(phi, table, lse_tau, weights, tokens, temperature)
    return embeds, tokens, weights, argmax


def _mode_weights(entropy: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "entrgi":
        return entropy
    return torch.full_like(entropy, 1.0 if mode == "aps" else 0.0)


def sample_step(phi, phi_init, temperature, top_p, top_k, alg, generator):
    """Rows (R, V) -> tokens (R,), confidence (R,) (see ``sample_step``)."""
    phi, phi_init = _rows(phi.detach()), _rows(phi_init.detach())
    tau = temperature if temperature > 0 else 1.0  # greedy reads probabilities at tau = 1, as Dream
    _, _, argmax, drawn = _filtered_draw(
        phi, tau, top_p, top_k, generator, phi_init if alg == "entropy" else None
    )
    tokens = drawn["tokens"] if temperature > 0 else argmax
    lse_kept = drawn["lse_kept"]
    if alg == "entropy":
        confidence = drawn["neg_entropy"]
    elif alg == "maskgit_plus":
        chosen = phi.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).float() / tau
        confidence = torch.exp(chosen - lse_kept)
    elif alg == "topk_margin":
        confidence = torch.exp(drawn["top1"] - lse_kept) - torch.exp(drawn["top2"] - lse_kept)
    else:
        confidence = torch.zeros_like(lse_kept)
    return tokens, confidence
