"""Autoregressive log-likelihood reward: mean log P(response + suffix | prefix) under a
causal LM, fed guided embeddings like the classifier reward (the published
``entrgi_ar.py`` variant)."""

from __future__ import annotations

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
    embedding table, :meth:`target_embeddings`: the guidance loop appends
    ``[t_mix | t_soft]`` to each position's input embedding, and a real token is
    ``[W_in[v] | W_out[v] | W_out[v]]``. Gradients reach phi through the input part
    only, as in the published code; value and gradient equal the published ones.
    Neither table is copied (untied or tied alike). ``cache_prefix``,
    ``checkpoint_layers``, ``compile_layers``, ``lean_activations``: see
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
        self.hidden_size = self.input_embeddings().shape[1]

    def target_embeddings(self) -> torch.Tensor:
        """(V_lm, d) the output head's weight, the table of the targets' tokens."""
        return self.model.get_output_embeddings().weight

    def context_ids(self, prompt: str) -> tuple[list[int], list[int]]:
        return chat_context_ids(self.tokenizer, prompt, self.system_prompt)

    def _embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """(..., 3d) ``[W_in | W_out | W_out]`` rows: a real token is its own target."""
        ids = ids.to(self.device)
        targets = self.target_embeddings()[ids]
        return torch.cat([super()._embed_ids(ids), targets, targets], dim=-1)

    def pack(self, context: RewardContext, response_embeds: torch.Tensor, response_valid: torch.Tensor) -> PackedInputs:
        if response_embeds.shape[-1] != 3 * self.hidden_size:
            raise ValueError(
                f"likelihood response embeddings are [input | mixed target | soft target], 3 x {self.hidden_size} "
                f"wide; got {response_embeds.shape[-1]} (guide with target_table=reward.target_embeddings())"
            )
        return super().pack(context, response_embeds, response_valid)

    def model_embeds(self, embeds: torch.Tensor) -> torch.Tensor:
        return embeds[..., : self.hidden_size]  # the W_in part

    def score_packed(self, packed: PackedInputs) -> torch.Tensor:
        d = self.hidden_size
        embeds = packed.inputs_embeds
        targets = embeds[:, -packed.tail_width :].detach().float()  # the scored tokens, all in the tail
        mixed, soft = targets[..., d : 2 * d], targets[..., 2 * d :]
        model_inputs = self.model_inputs(packed._replace(inputs_embeds=self.model_embeds(embeds)), causal=True)
        hidden = self.model.base_model(**model_inputs).last_hidden_state[:, -packed.tail_width - 1 : -1]
        normaliser = log_normaliser(hidden, self.target_embeddings())  # the head on the tail only
        hidden = hidden.float()
        target_logits = (hidden * soft).sum(-1) + (hidden * (mixed - soft)).sum(-1).detach()
        tail = slice(-packed.tail_width, None)
        scored = (packed.segment[:, tail] >= RESPONSE) & packed.attention_mask[:, tail].bool()
        return ((target_logits - normaliser) * scored).sum(-1) / scored.sum(-1).clamp_min(1)
