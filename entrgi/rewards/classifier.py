"""Sequence-classifier reward (e.g. Skywork-Reward-V2): one logit per (prompt, response)."""

from __future__ import annotations

import torch

from entrgi.rewards.base import EmbeddingInputReward, special_affixes
from entrgi.rewards.packing import PackedInputs

PLACEHOLDER = "<<ENTRGI_RESPONSE_PLACEHOLDER>>"


def last_token_pooling(model) -> bool:
    """True when the classifier reads its last column (decoder reward models)."""
    from transformers.modeling_layers import GenericForSequenceClassification

    return isinstance(model, GenericForSequenceClassification)


class ClassifierReward(EmbeddingInputReward):
    """Reward = the single logit of an ``AutoModelForSequenceClassification``.

    The (user: prompt, assistant: response) chat is rendered with the reward
    tokenizer's own template around a placeholder and split there, so any template
    (with or without BOS, with a system prompt) gives the exact prefix and suffix.
    Tokenizers without a template use ``prompt + "\\n\\n" + response`` wrapped in the
    tokenizer's own special tokens.
    """

    def __init__(self, model, tokenizer, system_prompt: str | None = None):
        num_labels = getattr(model.config, "num_labels", 1)
        if num_labels != 1:
            raise ValueError(f"a classifier reward needs num_labels == 1, got {num_labels}")
        super().__init__(model, tokenizer)
        self.system_prompt = system_prompt
        self.align = "right" if last_token_pooling(model) else "left"
        if getattr(model.config, "pad_token_id", None) is None:
            # Only checked for presence when batching: pooling reads our right-aligned last column.
            model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def _render(self, prompt: str) -> tuple[str, str, bool]:
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": PLACEHOLDER}]
            if self.system_prompt is not None:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            text = self.tokenizer.apply_chat_template(messages, tokenize=False)
            templated = True
        else:
            system = f"{self.system_prompt}\n\n" if self.system_prompt else ""
            text = f"{system}{prompt}\n\n{PLACEHOLDER}"
            templated = False
        if text.count(PLACEHOLDER) != 1:
            raise ValueError("the reward chat template must render the assistant message exactly once")
        prefix, suffix = text.split(PLACEHOLDER)
        return prefix, suffix, templated

    def context_ids(self, prompt: str) -> tuple[list[int], list[int]]:
        prefix, suffix, templated = self._render(prompt)
        encode = lambda s: self.tokenizer(s, add_special_tokens=False)["input_ids"] if s else []  # noqa: E731
        head, tail = ([], []) if templated else special_affixes(self.tokenizer)
        return head + encode(prefix), encode(suffix) + tail

    def score_packed(self, packed: PackedInputs) -> torch.Tensor:
        return self.model(**self.model_inputs(packed, causal=self.align == "right")).logits[:, 0]
