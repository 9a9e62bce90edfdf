"""The reward protocol and the shared machinery of embedding-input rewards."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import torch

from entrgi.rewards.packing import pack_inputs


@dataclass
class RewardContext:
    """Per-row constant inputs for one batch, built once by :meth:`Reward.prepare`.

    Rows are ``num_samples`` contiguous copies of each prompt. Prefix is left-padded,
    suffix right-padded; ``*_valid`` marks real tokens.
    """

    prefix_embeds: torch.Tensor  # (N, P, d)
    prefix_valid: torch.Tensor  # (N, P) bool
    suffix_embeds: torch.Tensor  # (N, S, d)
    suffix_valid: torch.Tensor  # (N, S) bool


@runtime_checkable
class Reward(Protocol):
    """A differentiable reward usable for guidance.

    ``tokenizer`` and ``input_embeddings()`` define the reward vocabulary (the sampler
    re-indexes the table to the denoiser's vocabulary). ``score_embeds`` must be
    differentiable in ``response_embeds`` and free of host syncs.
    """

    tokenizer: object

    def input_embeddings(self) -> torch.Tensor:
        """(V_reward, d) input-embedding table."""

    def prepare(self, prompts: Sequence[str], num_samples: int) -> RewardContext:
        """Constant per-row inputs for ``len(prompts) * num_samples`` rows."""

    def pack(self, context: RewardContext, response_embeds: torch.Tensor, response_valid: torch.Tensor):
        """Concatenate ``[prefix | response | suffix]`` and pack it (see ``pack_inputs``)."""
        embeds = torch.cat(
            [context.prefix_embeds, response_embeds.to(context.prefix_embeds.dtype), context.suffix_embeds], dim=1
        )
        valid = torch.cat([context.prefix_valid, response_valid, context.suffix_valid], dim=1)
        return pack_inputs(embeds, valid, self.align)

    def pack_texts(self, prompts: Sequence[str], responses: Sequence[str]):
        """Packed real-token inputs for decoded responses (truncated to ``max_response_tokens``)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        rows = [
            self.tokenizer(r, add_special_tokens=False)["input_ids"][: self.max_response_tokens] for r in responses
        ]
        ids, valid = pad_id_lists(rows, "right")
        return self.pack(self.prepare(prompts, 1), self._embed_ids(ids), valid.to(self.device))

    def score_embeds(
        self, context: RewardContext, response_embeds: torch.Tensor, response_valid: torch.Tensor
    ) -> torch.Tensor:
        return self.score_packed(self.pack(context, response_embeds, response_valid)).float()

    @torch.no_grad()
    def score_texts(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        return self.score_packed(self.pack_texts(prompts, responses)).float()
