"""Autoregressive log-likelihood reward: mean log P(response + suffix | prefix) under a
causal LM, fed guided embeddings like the classifier reward (the published
``entrgi_ar.py`` variant)."""

from __future__ import annotations

import dataclasses

import torch

from entrgi.rewards.base import EmbeddingInputReward, RewardContext, chat_context_ids
from entrgi.rewards.packing import RESPONSE, PackedInputs


class LikelihoodReward(EmbeddingInputReward):
    """Reward = mean over response and suffix tokens of ``log P(token | everything before)``
    under ``AutoModelForCausalLM``, the response in the LM's chat template (see
    :func:`~entrgi.rewards.base.chat_context_ids`).

    At a guided position the target is, like the model's input, a mix of tokens:
    the published variant scores ``soft_lp + w * stopgrad(hard_lp - soft_lp)`` with
    ``soft_lp = sum_v p_v log P(v)`` (p held constant) and ``hard_lp = log P(drawn)``.
    Since ``log P(v) = h . W_out[v] - lse(h)`` that is
    ``h . t_soft + stopgrad(h . (t_mix - t_soft)) - lse(h)`` with the constant target
    vectors ``t_mix = soft + w (hard - soft)`` and ``t_soft = soft`` over the *output*
    embedding table. The guidance table is therefore ``[W_in | W_out]`` (just ``W_in``
    when the two are tied): one fused op call yields each position's input and
    ``t_mix``, and the guidance loop appends ``t_soft`` (``soft_target_columns``).
    Gradients reach phi through the input half only, as in the published code; value
    and gradient equal the published ones. Real tokens get exact log-probs.
    ``cache_prefix``, ``checkpoint_layers``, ``compile_layers``, ``lean_activations``: see
    :class:`EmbeddingInputReward`.
    """

    align = "right"

    def __init__(
        self, model, tokenizer, system_prompt: str | None = None, cache_prefix: bool = False,
        checkpoint_layers: bool = False, compile_layers: bool = False, lean_activations: bool = True,
    ):  # fmt: skip
        head = model.get_output_embeddings()
        if head is None or getattr(head, "bias", None) is not None:
            raise ValueError("LikelihoodReward needs a causal LM whose output head is a linear map without bias")
        super().__init__(model, tokenizer, cache_prefix, checkpoint_layers, compile_layers, lean_activations)
        self.system_prompt = system_prompt
        inputs = model.get_input_embeddings().weight
        self.hidden_size = inputs.shape[1]
        self.tied = head.weight.data_ptr() == inputs.data_ptr()
        self._table = inputs if self.tied else torch.cat([inputs, head.weight], dim=-1).detach()

    def input_embeddings(self) -> torch.Tensor:
        """(V_lm, d) input table when tied, else (V_lm, 2d) ``[W_in | W_out]``."""
        return self._table

    @property
    def soft_target_columns(self) -> slice:
        """The table columns that hold output embeddings (see the guidance loop)."""
        return slice(0, self.hidden_size) if self.tied else slice(self.hidden_size, 2 * self.hidden_size)

    def context_ids(self, prompt: str) -> tuple[list[int], list[int]]:
        return chat_context_ids(self.tokenizer, prompt, self.system_prompt)

    def pack(self, context: RewardContext, response_embeds: torch.Tensor, response_valid: torch.Tensor) -> PackedInputs:
        if response_embeds.shape[-1] > self._table.shape[1]:  # soft targets appended: a real token is its own
            columns = self.soft_target_columns
            widen = lambda embeds: torch.cat([embeds, embeds[..., columns]], dim=-1)  # noqa: E731
            context = dataclasses.replace(
                context, prefix_embeds=widen(context.prefix_embeds), suffix_embeds=widen(context.suffix_embeds)
            )
        return super().pack(context, response_embeds, response_valid)

    def model_embeds(self, embeds: torch.Tensor) -> torch.Tensor:
        return embeds[..., : self.hidden_size]  # the W_in half

    def score_packed(self, packed: PackedInputs) -> torch.Tensor:
        width = self._table.shape[1]
        embeds = packed.inputs_embeds
        inputs = self.model_embeds(embeds)
        mixed = embeds[:, 1:, self.soft_target_columns].detach().float()
        soft = embeds[:, 1:, width:].detach().float() if embeds.shape[-1] > width else mixed
        model_inputs = self.model_inputs(packed._replace(inputs_embeds=inputs), causal=True)
        hidden = self.model.base_model(**model_inputs).last_hidden_state[:, :-1]
        log_normaliser = torch.logsumexp(self.model.get_output_embeddings()(hidden).float(), dim=-1)
        hidden = hidden.float()
        target_logits = (hidden * soft).sum(-1) + (hidden * (mixed - soft)).sum(-1).detach()
        scored = (packed.segment[:, 1:] >= RESPONSE) & packed.attention_mask[:, 1:].bool()
        return ((target_logits - log_normaliser) * scored).sum(-1) / scored.sum(-1).clamp_min(1)
