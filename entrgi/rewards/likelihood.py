"""Autoregressive log-likelihood reward: mean log P(response + suffix | prefix) under a
causal LM, fed guided embeddings like the classifier reward (the published
``entrgi_ar.py`` variant)."""

from __future__ import annotations

import dataclasses

import torch

from entrgi.rewards.base import EmbeddingInputReward, RewardContext, chat_context_ids
from entrgi.rewards.packing import RESPONSE, PackedInputs

LOGIT_CHUNK_BYTES = 256 * 2**20  # float32 logits held at once by log_normaliser


class _LogNormaliser(torch.autograd.Function):
    """``logsumexp(hidden @ weight.T)`` per row, a chunk of rows at a time. The forward
    keeps each row's gradient direction ``softmax(hidden @ weight.T) @ weight`` (d
    numbers), so no (rows, V) logits outlive a chunk; the backward scales it."""

    @staticmethod
    def forward(ctx, hidden, weight, rows_per_chunk):
        if ctx.needs_input_grad[1]:
            raise ValueError("log_normaliser differentiates hidden only: the output head's weight must be frozen")
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        direction = torch.empty_like(hidden, dtype=torch.float32) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], rows_per_chunk):
            chunk = slice(start, start + rows_per_chunk)
            logits = (hidden[chunk] @ weight.T).float()
            lse[chunk] = torch.logsumexp(logits, dim=-1)
            if direction is not None:
                probs = torch.exp(logits.sub_(lse[chunk, None]))
                direction[chunk] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(direction)
        ctx.hidden_dtype = hidden.dtype
        return lse

    @staticmethod
    def backward(ctx, grad):
        (direction,) = ctx.saved_tensors
        return (grad[:, None] * direction).to(ctx.hidden_dtype), None, None


def log_normaliser(hidden: torch.Tensor, weight: torch.Tensor, chunk_bytes: int = LOGIT_CHUNK_BYTES) -> torch.Tensor:
    """(...,) float32 ``logsumexp(hidden @ weight.T)`` for ``hidden`` (..., d) and an
    output head ``weight`` (V, d), differentiable in ``hidden``, holding at most
    ``chunk_bytes`` of float32 logits at a time (the stock head would keep all of them,
    2 GB at 16 x 200 positions x 152k for the backward)."""
    rows = hidden.reshape(-1, hidden.shape[-1])
    rows_per_chunk = max(1, chunk_bytes // (4 * weight.shape[0]))
    return _LogNormaliser.apply(rows, weight, rows_per_chunk).view(hidden.shape[:-1])


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
        targets = embeds[:, -packed.tail_width :].detach().float()  # the scored tokens, all in the tail
        mixed = targets[..., self.soft_target_columns]
        soft = targets[..., width:] if embeds.shape[-1] > width else mixed
        model_inputs = self.model_inputs(packed._replace(inputs_embeds=inputs), causal=True)
        hidden = self.model.base_model(**model_inputs).last_hidden_state[:, -packed.tail_width - 1 : -1]
        normaliser = log_normaliser(hidden, self.model.get_output_embeddings().weight)  # the head on the tail only
        hidden = hidden.float()
        target_logits = (hidden * soft).sum(-1) + (hidden * (mixed - soft)).sum(-1).detach()
        tail = slice(-packed.tail_width, None)
        scored = (packed.segment[:, tail] >= RESPONSE) & packed.attention_mask[:, tail].bool()
        return ((target_logits - normaliser) * scored).sum(-1) / scored.sum(-1).clamp_min(1)
