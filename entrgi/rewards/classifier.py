"""Sequence-classifier reward (e.g. Skywork-Reward-V2): one logit per (prompt, response)."""

from __future__ import annotations

import torch

from entrgi.rewards.base import EmbeddingInputReward, chat_context_ids
from entrgi.rewards.packing import PackedInputs


def last_token_pooling(model) -> bool:
    """True when the classifier reads its last column (decoder reward models)."""
    from transformers.modeling_layers import GenericForSequenceClassification

    return isinstance(model, GenericForSequenceClassification)


class ClassifierReward(EmbeddingInputReward):
    """Reward = the single logit of an ``AutoModelForSequenceClassification``, read at
    the last real token (decoder reward models) or the first (BERT-style ``[CLS]``).
    The response sits in the reward tokenizer's chat (see :func:`chat_context_ids`);
    ``tokenizer`` may be None when only :meth:`score_embeds` is used (integrations).
    ``cache_prefix`` (decoder classifiers only), ``checkpoint_layers``, ``compile_layers`` and
    ``lean_activations``: see :class:`EmbeddingInputReward`.
    """

    def __init__(
        self, model, tokenizer, system_prompt: str | None = None, cache_prefix: bool = False,
        checkpoint_layers: bool = False, compile_layers: bool = False, lean_activations: bool = True,
    ):  # fmt: skip
        num_labels = getattr(model.config, "num_labels", 1)
        if num_labels != 1:
            raise ValueError(f"a classifier reward needs num_labels == 1, got {num_labels}")
        self.align = "right" if last_token_pooling(model) else "left"
        super().__init__(model, tokenizer, cache_prefix, checkpoint_layers, compile_layers, lean_activations)
        self.system_prompt = system_prompt
        if getattr(model.config, "pad_token_id", None) is None:
            # Only checked for presence when batching: pooling reads our right-aligned last column.
            pad = getattr(tokenizer, "pad_token_id", None)
            model.config.pad_token_id = pad if pad is not None else 0

    def context_ids(self, prompt: str) -> tuple[list[int], list[int]]:
        return chat_context_ids(self.tokenizer, prompt, self.system_prompt)

    def score_packed(self, packed: PackedInputs) -> torch.Tensor:
        return self.model(**self.model_inputs(packed, causal=self.align == "right")).logits[:, 0]
