"""Which masked positions a denoising step commits: Dream's schedule, LLaDA's blocks
and linear schedule, Fast-dLLM's confidence threshold. All sync-free: the step index
lives in a device tensor, so one captured graph serves every step."""

from __future__ import annotations

import torch

from entrgi.ops.reference import gumbel_like


def timesteps(steps: int, eps: float = 1e-3, device=None) -> torch.Tensor:
    """(steps + 1,) float32 ``linspace(1, eps, steps + 1)``, as Dream."""
    return torch.linspace(1, eps, steps + 1, device=device)


def _step_fraction(schedule: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 - s/t) of step ``step`` ((1,) int64 device tensor) and whether it is the last."""
    t = schedule.index_select(0, step)
    s = schedule.index_select(0, step + 1)
    return 1 - s / t, step == schedule.numel() - 2


def commit_counts(masked: torch.Tensor, schedule: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """(N,) int64: ``int(n_masks * (1 - s/t))`` per row; every mask on the last step.

    ``step`` is a (1,) int64 tensor on the device, so one captured graph serves every step."""
    n_masks = masked.sum(-1)
    fraction, last = _step_fraction(schedule, step)
    return torch.where(last, n_masks, (n_masks.float() * fraction).long())


def select_commits(
    confidence: torch.Tensor,
    masked: torch.Tensor,
    counts: torch.Tensor,
    alg_temp: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """(N, G) bool: the ``counts[i]`` most confident masked positions of each row.

    Only masked positions are ranked: a masked position with confidence -inf (e.g. a
    deprioritised EOS) still outranks every committed one, so a step never rewrites
    the prompt or a committed token. ``alg_temp > 0`` samples the positions without
    replacement from ``softmax(confidence / alg_temp)`` (Gumbel top-k).
    """
    if alg_temp > 0:
        confidence = confidence / alg_temp + gumbel_like(confidence, generator)
    lowest = torch.finfo(confidence.dtype).min
    ranked = torch.where(masked, confidence.nan_to_num(nan=lowest, neginf=lowest), -torch.inf)
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
    positions = torch.arange(ranked.shape[-1], device=ranked.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    return masked & (rank < counts.unsqueeze(-1))


def random_commits(
    masked: torch.Tensor, schedule: torch.Tensor, step: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """``alg="origin"``: each masked position is committed with probability 1 - s/t
    (all of them on the last step); ``step`` as in :func:`commit_counts`."""
    fraction, last = _step_fraction(schedule, step)
    draws = torch.rand(masked.shape, device=masked.device, generator=generator)
    return masked & ((draws < fraction) | last)


def current_block(masked: torch.Tensor, block_length: int) -> torch.Tensor:
    """(N, G) bool: the positions of each row's current block, the first block that
    still holds a masked position (none once the row is fully committed)."""
    g = masked.shape[-1]
    columns = torch.arange(g, device=masked.device)
    first_masked = torch.where(masked, columns, g).amin(-1, keepdim=True)
    start = torch.div(first_masked, block_length, rounding_mode="floor") * block_length
    return (columns >= start) & (columns < start + block_length)


def linear_counts(masked: torch.Tensor, steps_per_block: int, step: torch.Tensor) -> torch.Tensor:
    """(N,) int64: LLaDA's schedule, the block's masks spread evenly over its steps
    (larger shares first): ``ceil(masks left / steps left in the block)``."""
    steps_left = steps_per_block - torch.remainder(step, steps_per_block)
    return torch.div(masked.sum(-1) + steps_left - 1, steps_left, rounding_mode="floor")


def threshold_commits(confidence: torch.Tensor, masked: torch.Tensor, threshold: float) -> torch.Tensor:
    """(N, G) bool: Fast-dLLM's parallel decoding, every masked position with
    ``confidence >= threshold`` plus each row's most confident masked position."""
    ones = torch.ones(masked.shape[0], dtype=torch.long, device=masked.device)
    best = select_commits(confidence, masked, ones, 0.0, None)
    return best | (masked & (confidence >= threshold))
