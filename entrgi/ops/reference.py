"""Pure-PyTorch reference of every fused op.

This is the CPU path and the oracle the Triton kernels are tested against. It
materialises full-vocabulary tensors freely; only the fused kernels avoid that.

Filter semantics (published sampler, SPEC.md): top-p on the full tempered
distribution, then top-k on what is left. Both keep a prefix of the descending
order, so the kept set is ``{v : x_v >= theta}`` for a per-row threshold ``theta``.
Ties at ``theta`` are all kept (for top-k that is the published rule; for top-p it
makes the published sort-order-dependent choice deterministic).
"""

from __future__ import annotations

import math

import torch

# Smallest uniform draw: keeps -log(-log(u)) finite when the generator returns 0.
_MIN_UNIFORM = 4.7e-10


def keep_threshold(scaled: torch.Tensor, top_p: float, top_k: int) -> torch.Tensor:
    """Per-row threshold of the published top-p-then-top-k filter.

    Parameters
    ----------
    scaled : (R, V) float32 tempered logits ``phi / tau``.
    top_p : keep tokens while the mass strictly above them is <= top_p (1 = off).
    top_k : keep the k largest (0 = off).

    Returns
    -------
    (R,) float32 ``theta``: token v is kept iff ``scaled[v] >= theta``.
    """
    rows, vocab = scaled.shape
    if top_p >= 1.0 and (top_k <= 0 or top_k >= vocab):
        return torch.full((rows,), -math.inf, device=scaled.device)
    ordered = torch.sort(scaled, dim=-1, descending=True).values
    kept = torch.full((rows,), vocab, device=scaled.device, dtype=torch.long)
    if top_p < 1.0:
        probs = torch.softmax(ordered, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        kept_by_p = (mass_before <= top_p).sum(dim=-1).clamp_min(1)
        kept = torch.minimum(kept, kept_by_p)
    if 0 < top_k < vocab:
        kept = kept.clamp_max(top_k)
    return ordered.gather(-1, (kept - 1).unsqueeze(-1)).squeeze(-1)


def gumbel_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard Gumbel noise with the shape of ``x`` (float32)."""
    u = torch.rand(x.shape, device=x.device, generator=generator, dtype=torch.float32)
    return -torch.log(-torch.log1p(-u.clamp_min(_MIN_UNIFORM)))


def sample_filtered(
    phi: torch.Tensor,
    temperature: float,
    top_p: float,
    top_k: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Draw ``x ~ softmax(filter(phi / tau))`` per row by Gumbel-max; tau = 0 is argmax.

    phi : (R, V) any float dtype. Returns (R,) int64.
    """
    x = phi.float()
    if temperature == 0.0:
        return x.argmax(dim=-1)
    scaled = x / temperature
    theta = keep_threshold(scaled, top_p, top_k)
    scores = scaled + gumbel_like(scaled, generator)
    scores = scores.masked_fill(scaled < theta.unsqueeze(-1), -math.inf)
    return scores.argmax(dim=-1)


def xlogx_sum(log_probs: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim of ``p log p`` (with 0 log 0 = 0) from log-probabilities."""
    probs = log_probs.exp()
    return torch.where(probs > 0, probs * log_probs, torch.zeros_like(probs)).sum(dim=-1)


def normalized_entropy(phi: torch.Tensor) -> torch.Tensor:
    """``H(softmax(phi)) / log V`` per row, at temperature 1. phi (R, V) -> (R,) float32."""
    log_probs = torch.log_softmax(phi.float(), dim=-1)
    return -xlogx_sum(log_probs) / math.log(phi.shape[-1])


def guided_embedding_reference(
    phi: torch.Tensor,
    embed_table: torch.Tensor,
    temperature: float,
    top_p: float,
    top_k: int,
    mode: str,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference EntRGi embedding block on flattened rows.

    phi : (R, V); embed_table : (V, d).
    Returns ``embeds`` (R, d) in the table's dtype, ``tokens`` (R,) int64,
    ``weights`` (R,) float32 and ``argmax`` (R,) int64. The gradient reaches phi
    only through ``soft = softmax(phi / tau) @ E``.
    """
    x = phi.float()
    argmax = x.argmax(dim=-1)
    if mode == "entrgi":
        weights = normalized_entropy(x.detach())
    else:
        weights = torch.full_like(x[:, 0], 1.0 if mode == "aps" else 0.0).detach()
    if temperature == 0.0:
        # Greedy limit: softmax(phi / 0) is the one-hot argmax, with no gradient.
        hard = embed_table[argmax]
        return hard, argmax, weights, argmax
    probs = torch.softmax(x / temperature, dim=-1)
    soft = (probs.to(embed_table.dtype) @ embed_table).float()
    if mode == "expectation":
        tokens = argmax
        embeds = soft
    else:
        tokens = sample_filtered(x.detach(), temperature, top_p, top_k, generator)
        hard = embed_table[tokens].float()
        embeds = soft + (weights.unsqueeze(-1) * (hard - soft)).detach()
    return embeds.to(embed_table.dtype), tokens, weights, argmax


def entropy_confidence_reference(phi: torch.Tensor, temperature: float) -> torch.Tensor:
    """sum p log p of ``softmax(phi / tau)`` per row (tau = 0 reads tau = 1, as Dream).
    phi (R, V) -> (R,) float32."""
    tau = temperature if temperature > 0 else 1.0
    return xlogx_sum(torch.log_softmax(phi.float() / tau, dim=-1))


def step_confidence_reference(
    phi: torch.Tensor,
    phi_init: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float,
    top_p: float,
    top_k: int,
    alg: str,
) -> torch.Tensor:
    """Commit confidence per row for the denoising step (Dream's ``sample_tokens``).

    ``entropy``: sum p log p of ``softmax(phi_init / tau)`` (un-steered logits);
    ``maskgit_plus``: probability of ``tokens`` under ``softmax(filter(phi / tau))``;
    ``topk_margin``: top-1 minus top-2 probability of that same distribution;
    ``origin``: zeros (positions are committed at random). tau = 0 reads the
    probabilities at temperature 1, as Dream does. ``low_confidence`` (LLaDA):
    probability of ``tokens`` under ``softmax(phi)``, unfiltered. Returns (R,) float32.
    """
    if alg == "entropy":
        return entropy_confidence_reference(phi_init, temperature)
    if alg == "low_confidence":
        return torch.softmax(phi.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    tau = temperature if temperature > 0 else 1.0
    if alg == "origin":
        return torch.zeros(phi.shape[0], device=phi.device)
    scaled = phi.float() / tau
    theta = keep_threshold(scaled, top_p, top_k)
    probs = torch.softmax(scaled.masked_fill(scaled < theta.unsqueeze(-1), -math.inf), dim=-1)
    if alg == "maskgit_plus":
        return probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    top2 = probs.topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1]
