"""The guidance inner loop: M Adam steps on the response logits phi that raise a reward
fed guided embeddings. Shared by the sampler and the drop-in integrations."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.profiler import record_function

from entrgi.ops import GuidedEmbedding, guided_embedding
from entrgi.optim import LogitAdam
from entrgi.rewards import Reward, RewardContext
from entrgi.rewards.base import check_reward_shape
from entrgi.rewards.packing import response_mask_until_end


@dataclass(frozen=True)
class GuidanceStep:
    """How phi is steered: ``mode`` (entrgi | aps | expectation), M ``steps`` of Adam at
    ``lr`` (moments kept as ``adam_moments`` says: see GuidanceConfig), loss
    ``-sum R / reward_temperature``, and the sampling law of the hard tokens."""

    mode: str
    steps: int
    lr: float
    reward_temperature: float
    temperature: float
    top_p: float
    top_k: int
    backend: str = "auto"
    adam_moments: str = "float32"


def optimize_logits(
    phi_init: torch.Tensor,
    masked: torch.Tensor,
    response: torch.Tensor,
    table: torch.Tensor,
    reward: Reward,
    context: RewardContext,
    end_ids: torch.Tensor,
    guidance: GuidanceStep,
    generator: torch.Generator | None = None,
    steered: torch.Tensor | None = None,
    in_place: bool = False,
    table_rows: torch.Tensor | None = None,
    target_table: torch.Tensor | None = None,
    initial: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steer phi towards higher reward. No host syncs.

    phi_init : (N, G, V) float32 logits of the response block; masked : (N, G) bool;
    response : (N, G) token ids (committed ones are read at unmasked positions);
    table : (V, d) reward embeddings in the denoiser's vocabulary; end_ids : (E,) ids
    that end a response (the reward sees positions before the first one, judged on
    argmax(phi) at masked positions). steered : (N, G) bool, the rows allowed to move
    (default: every masked row; the reward sees every masked row either way).
    Unmasked rows are never computed (the op and Adam skip them). ``in_place``: optimise
    phi_init's own storage (a contiguous float32 tensor the caller no longer needs)
    instead of a copy, saving one (N, G, V) float32 buffer. ``table_rows`` (V,): the
    table is in the reward's vocabulary and token v reads row ``table_rows[v]`` (see
    :func:`~entrgi.ops.guided_embedding`).

    ``target_table`` (V_t, d_t), read through ``table_rows`` like ``table`` (a reward's
    :meth:`target_embeddings`): each position's embedding gets two constant target
    vectors appended, ``[mixed | soft]`` with ``soft = softmax(phi / tau) @ target_table``
    and ``mixed = soft + w (target_table[drawn] - soft)`` (the op's draw and w); a
    committed position's token row twice. Embeddings are then (N, G, d + 2 d_t).

    ``initial`` (N, G, V), any float dtype: phi_init's values, left unmodified (e.g. the
    denoiser's bf16 logits phi_init is a float32 copy of), from which
    ``adam_moments="recompute"`` replays Adam. Default: phi_init itself, or a copy of it
    when ``in_place``.

    Returns the optimised phi (N, G, V) float32 and the mean weight w over masked rows
    and steps (a 0-d device tensor).
    """
    if in_place and not (phi_init.dtype == torch.float32 and phi_init.is_contiguous()):
        raise ValueError(f"in_place needs a contiguous float32 phi_init, got {phi_init.dtype}")
    start = phi_init if in_place else phi_init.clone(memory_format=torch.contiguous_format)
    phi = start.detach().requires_grad_(True)
    moving = masked if steered is None else steered
    recompute = guidance.adam_moments == "recompute"
    if recompute and initial is None:
        initial = phi_init.clone() if in_place else phi_init
    optimizer = LogitAdam(phi, guidance.lr, active=moving, backend=guidance.backend,
                          moment_dtype=torch.float32 if recompute else getattr(torch, guidance.adam_moments),
                          replay_from=initial if recompute else None, max_steps=max(guidance.steps, 1))  # fmt: skip
    committed_rows = response if table_rows is None else table_rows[response]
    committed_embeds = table[committed_rows]
    if target_table is not None:
        committed_targets = target_table[committed_rows].repeat(1, 1, 2)
    weight_sum = torch.zeros((), device=phi.device)
    for _ in range(guidance.steps):
        with record_function("entrgi.guided_embedding"):
            out = guided_embedding(
                phi, table, temperature=guidance.temperature, top_p=guidance.top_p, top_k=guidance.top_k,
                mode=guidance.mode, generator=generator, backend=guidance.backend, check_values=False, active=masked,
                optimizer=optimizer, table_rows=table_rows,
            )  # fmt: skip
            embeds = torch.where(masked.unsqueeze(-1), out.embeds, committed_embeds)
            if target_table is not None:
                targets = target_vectors(phi, out, target_table, masked, guidance, table_rows)
                embeds = torch.cat([embeds, torch.where(masked.unsqueeze(-1), targets, committed_targets)], dim=-1)
            ids = torch.where(masked, out.argmax, response)
            valid = response_mask_until_end(ids, end_ids)
            weight_sum += out.weights.sum()  # zero at unmasked rows
        with record_function("entrgi.reward_forward_backward"):
            rewards = reward.score_embeds(context, embeds, valid)
            check_rewards(rewards, embeds)
            loss = -(rewards / guidance.reward_temperature).sum()
            # phi's backward is the Adam step (fused into the op's backward kernel on Triton)
            torch.autograd.backward(loss, inputs=[phi])
    mean_weight = weight_sum / (masked.sum() * max(guidance.steps, 1)).clamp_min(1)
    return phi.detach(), mean_weight


def check_rewards(rewards, embeds: torch.Tensor) -> None:
    """A reward's ``score_embeds`` output: (N,) and differentiable (metadata only: no
    host sync, so the check runs inside captured steps too)."""
    check_reward_shape("score_embeds", rewards, embeds.shape[0])
    if not rewards.requires_grad:
        raise ValueError("score_embeds returned rewards with no gradient to response_embeds (computed under "
                         "torch.no_grad or detached?): guidance needs a differentiable reward")  # fmt: skip


def target_vectors(
    phi: torch.Tensor, out: GuidedEmbedding, target_table: torch.Tensor, masked: torch.Tensor, guidance: GuidanceStep,
    table_rows: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """(N, G, 2 d_t) constant ``[mixed | soft]`` targets of the op's output ``out`` over
    ``target_table`` (see :func:`optimize_logits`): ``soft`` by the expectation op
    (no (N, G, V) tensor), ``mixed`` from the draw and weight ``out`` already holds."""
    soft = guided_embedding(phi.detach(), target_table, temperature=guidance.temperature, mode="expectation",
                            backend=guidance.backend, check_values=False, active=masked,
                            table_rows=table_rows).embeds  # fmt: skip
    hard = target_table[out.tokens if table_rows is None else table_rows[out.tokens]]
    mixed = torch.lerp(soft.float(), hard.float(), out.weights.unsqueeze(-1)).to(soft.dtype)
    return torch.cat([mixed, soft], dim=-1)
