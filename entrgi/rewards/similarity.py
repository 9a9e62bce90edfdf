"""Embedding-similarity reward: cosine between mean-pooled response and target embeddings."""

from __future__ import annotations

import torch

from entrgi.rewards.base import EmbeddingInputReward, special_affixes
from entrgi.rewards.packing import PackedInputs


class SimilarityReward(EmbeddingInputReward):
    """Reward = cos(mean_pool(encoder(response)), mean_pool(encoder(target))).

    Works with any HF encoder that accepts ``inputs_embeds`` (e.g. the MiniLM sentence
    encoder). The response is wrapped in the tokenizer's own special tokens; the
    prompt is not read. Rewards lie in [-1, 1]. ``checkpoint_layers``,
    ``compile_layers``, ``lean_activations``: see :class:`EmbeddingInputReward`.
    """

    align = "left"

    def __init__(
        self, model, tokenizer, target: str, checkpoint_layers: bool = False, compile_layers: bool = False,
        lean_activations: bool = True,
    ):  # fmt: skip
        if not target:
            raise ValueError("SimilarityReward needs a non-empty target text")
        super().__init__(model, tokenizer, checkpoint_layers=checkpoint_layers, compile_layers=compile_layers,
                         lean_activations=lean_activations)  # fmt: skip
        self.target = target
        self._affixes = special_affixes(tokenizer)
        self.target_pooled = self.encode_texts([target])[0]  # (d,) unit norm

    def context_ids(self, prompt: str) -> tuple[list[int], list[int]]:
        return self._affixes

    def pooled(self, packed: PackedInputs) -> torch.Tensor:
        hidden = self.model(**self.model_inputs(packed, causal=False)).last_hidden_state.float()
        weights = packed.attention_mask.unsqueeze(-1).float()
        mean = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return torch.nn.functional.normalize(mean, dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """(n, d) unit-norm sentence embeddings of plain texts."""
        return self.pooled(self.pack_texts([""] * len(texts), texts))

    def score_packed(self, packed: PackedInputs) -> torch.Tensor:
        return self.pooled(packed) @ self.target_pooled
