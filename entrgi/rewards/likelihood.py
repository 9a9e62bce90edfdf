"""Autoregressive log-likelihood reward: mean log P(response + suffix | prefix) under a
causal LM, fed guided embeddings like the classifier reward (the published
``entrgi_ar.py`` variant)."""

from __future__ import annotations

import torch

from entrgi.rewards.base import EmbeddingInputReward, chat_context_ids
from entrgi.rewards.packing import RESPONSE, PackedInputs


class LikelihoodReward(EmbeddingInputReward):
    """Reward = mean over response and suffix tokens of ``log P(token | everything before)``
    under ``AutoModelForCausalLM``, the response in the LM's chat template (see
    :func:`~entrgi.rewards.base.chat_context_ids`).

    At a guided position the target is, like the model's input, a mix of tokens:
    the published variant scores ``soft_lp + w * stopgrad(hard_lp - soft_lp)`` with
    ``soft_lp = sum_v p_v log P(v)`` (p held constant) and ``hard_lp = log P(drawn)``.
    Since ``log P(v) = h . W_out[v] - lse(h)`` that is ``h . t - lse(h)`` with the
    target vector ``t = stopgrad(soft + w (hard - soft))`` taken over the *output*
    embedding table. The guidance table is therefore ``[W_in | W_out]`` (just ``W_in``
    when the two are tied), so one fused op call yields the input and the target of
    every position with the same draw and weight; gradients reach phi through the
    input half only, as in the published code. Real tokens get exact log-probs.

    The value equals the published one in every mode. Its gradient is that of
    ``h . t - lse(h)`` with t held constant; the published code differentiates only
    the soft part of the target (``t = soft``), so the two gradients agree for
    ``expectation`` (w = 0) and at committed positions and differ by the term
    ``w (hard - soft)`` of the target elsewhere.
    """

    align = "right"

    def __init__(self, model, tokenizer, system_prompt: str | None = None):
        head = model.get_output_embeddings()
        if head is None or getattr(head, "bias", None) is not None:
            raise ValueError("LikelihoodReward needs a causal LM whose output head is a linear map without bias")
        super().__init__(model, tokenizer)
        self.system_prompt = system_prompt
        inputs = model.get_input_embeddings().weight
        self.hidden_size = inputs.shape[1]
        self.tied = head.weight.data_ptr() == inputs.data_ptr()
        self._table = inputs if self.tied else torch.cat([inputs, head.weight], dim=-1).detach()

    def input_embeddings(self) -> torch.Tensor:
        """(V_lm, d) input table when tied, else (V_lm, 2d) ``[W_in | W_out]``."""
        return self._table

    def context_ids(self, prompt: str) -> tuple[list[int], list[int]]:
        return chat_context_ids(self.tokenizer, prompt, self.system_prompt)

    def score_packed(self, packed: PackedInputs) -> torch.Tensor:
        d = self.hidden_size
        inputs = packed.inputs_embeds[..., :d]
        targets = (inputs if self.tied else packed.inputs_embeds[..., d:]).detach()
        model_inputs = self.model_inputs(packed._replace(inputs_embeds=inputs), causal=True)
        hidden = self.model.base_model(**model_inputs).last_hidden_state[:, :-1]
        log_normaliser = torch.logsumexp(self.model.get_output_embeddings()(hidden).float(), dim=-1)
        log_probs = (hidden.float() * targets[:, 1:].float()).sum(-1) - log_normaliser
        scored = (packed.segment[:, 1:] >= RESPONSE) & packed.attention_mask[:, 1:].bool()
        return (log_probs * scored).sum(-1) / scored.sum(-1).clamp_min(1)
