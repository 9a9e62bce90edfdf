"""The reward protocol and the shared machinery of embedding-input rewards."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import torch

from entrgi.attention import attention_mask_4d
from entrgi.layers import LayerRunner
from entrgi.rewards.packing import PREFIX, RESPONSE, SUFFIX, PackedInputs, pack_inputs
from entrgi.rewards.prefix_cache import PrefixKeysValues, cache_argument, prefix_keys_values

PLACEHOLDER = "<<ENTRGI_RESPONSE_PLACEHOLDER>>"


@dataclass
class RewardContext:
    """Per-row constant inputs for one batch, built once by :meth:`Reward.prepare`.

    Rows are ``num_samples`` contiguous copies of each prompt. Prefix is left-padded,
    suffix right-padded; ``*_valid`` marks real tokens. ``prefix_kv``: the reward
    model's keys then values over ``prefix[:, :-1]`` (one tensor per layer each) when
    the reward caches its prefix, else None.
    """

    prefix_embeds: torch.Tensor  # (N, P, d)
    prefix_valid: torch.Tensor  # (N, P) bool
    suffix_embeds: torch.Tensor  # (N, S, d)
    suffix_valid: torch.Tensor  # (N, S) bool
    prefix_kv: tuple[torch.Tensor, ...] | None = None

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the context, in field order (cached keys / values flattened)."""
        found = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            found.extend(value if isinstance(value, tuple) else [] if value is None else [value])
        return found


@runtime_checkable
class Reward(Protocol):
    """A differentiable reward usable for guidance.

    ``tokenizer`` and ``input_embeddings()`` define the reward vocabulary (the sampler
    re-indexes the table to the denoiser's vocabulary). ``score_embeds`` must be
    differentiable in ``response_embeds`` and free of host syncs.

    Optional: ``target_embeddings()`` (V_reward, d_t), a second table in the same
    vocabulary. A reward that has it is fed ``[input | mixed target | soft target]``
    (N, G, d + 2 d_t) per position (see :func:`entrgi.guidance.optimize_logits`).
    """

    tokenizer: object

    def input_embeddings(self) -> torch.Tensor:
        """(V_reward, d) input-embedding table."""

    def prepare(self, prompts: Sequence[str], num_samples: int) -> RewardContext:
        """Constant per-row inputs for ``len(prompts) * num_samples`` rows."""

    def score_embeds(
        self, context: RewardContext, response_embeds: torch.Tensor, response_valid: torch.Tensor
    ) -> torch.Tensor:
        """(N, G, d) embeds and (N, G) bool mask -> (N,) float32 rewards."""

    def score_texts(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """Rewards of decoded responses on real tokens, (n,) float32."""


def check_reward_shape(method: str, rewards, rows: int) -> None:
    """A reward ``method``'s output must be a (rows,) tensor (metadata only: no host sync)."""
    if not isinstance(rewards, torch.Tensor) or rewards.shape != (rows,):
        got = tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__
        raise ValueError(f"{method} must return rewards of shape (N,) = ({rows},), got {got}")


def special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens a tokenizer wraps around one sequence (e.g. BERT's CLS/SEP)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    wrapped = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(wrapped) - len(plain) + 1):
        if wrapped[start : start + len(plain)] == plain:
            return wrapped[:start], wrapped[start + len(plain) :]
    return [], []


def chat_context_ids(tokenizer, prompt: str, system_prompt: str | None = None) -> tuple[list[int], list[int]]:
    """Token ids before and after the response in a (user: prompt, assistant: response) chat.

    The chat is rendered with the tokenizer's own template around a placeholder and
    split there, so any template (with or without BOS, with a system prompt) gives the
    exact prefix and suffix. Tokenizers without a template use
    ``prompt + "\\n\\n" + response`` wrapped in the tokenizer's own special tokens.
    """
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": PLACEHOLDER}]
        if system_prompt is not None:
            messages.insert(0, {"role": "system", "content": system_prompt})
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        head, tail = [], []
    else:
        system = f"{system_prompt}\n\n" if system_prompt else ""
        text = f"{system}{prompt}\n\n{PLACEHOLDER}"
        head, tail = special_affixes(tokenizer)
    if text.count(PLACEHOLDER) != 1:
        raise ValueError("the reward chat template must render the assistant message exactly once")
    prefix, suffix = text.split(PLACEHOLDER)
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"] if s else []  # noqa: E731
    return head + encode(prefix), encode(suffix) + tail


def pad_rows(rows: Sequence[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (L_i, ...) tensors to one length with zeros on ``side`` (``left`` or ``right``).
    Returns the stacked rows (n, L, ...) and valid (n, L) bool, on the rows' device."""
    first = rows[0]
    width = max(1, max(r.shape[0] for r in rows))
    padded = first.new_zeros((len(rows), width, *first.shape[1:]))
    valid = torch.zeros(len(rows), width, dtype=torch.bool, device=first.device)
    for i, row in enumerate(rows):
        cols = slice(width - row.shape[0], width) if side == "left" else slice(0, row.shape[0])
        padded[i, cols] = row
        valid[i, cols] = True
    return padded, valid


def pad_id_lists(rows: Sequence[Sequence[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token-id lists to one length with zeros. Returns ids (n, S) and valid (n, S) bool."""
    return pad_rows([torch.tensor(list(row), dtype=torch.long) for row in rows], side)


class EmbeddingInputReward:
    """Base for rewards fed ``[prefix | response | suffix]`` through ``inputs_embeds``.

    Subclasses provide ``context_ids(prompt) -> (prefix ids, suffix ids)`` and
    ``score_packed(packed) -> (N,)``, and set ``align`` (``right`` when the model reads
    the last column, ``left`` when it reads the first).

    ``cache_prefix`` (causal models only): compute the prefix's keys and values once
    per batch in :meth:`prepare`; each scoring then runs the model over the last
    prefix token, the response and the suffix only (see ``prefix_cache``).

    ``checkpoint_layers``: during guidance (:meth:`score_embeds`) the model's layers
    keep only their inputs for the backward and recompute the rest: most of the
    reward's activation memory for about one extra forward. Same values and gradients.

    ``compile_layers``: during guidance the layers run through one ``torch.compile``d
    layer (fused elementwise kernels; compiled on the first guided step of a shape).

    ``lean_activations`` (default on): during guidance the model's RMSNorms and gated
    MLPs keep less for the backward (a third less activation memory for Qwen-family
    layers, same values; see :mod:`entrgi.lean`). See :mod:`entrgi.layers` for all three.
    """

    align = "right"
    max_response_tokens = 1024

    def __init__(
        self, model, tokenizer, cache_prefix: bool = False, checkpoint_layers: bool = False,
        compile_layers: bool = False, lean_activations: bool = True,
    ):  # fmt: skip
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        if cache_prefix and self.align != "right":
            raise ValueError("cache_prefix needs a causal (decoder) reward model; this one reads its first column")
        self.cache_prefix = cache_prefix
        self.guidance_layers = LayerRunner(self.model, compiled=compile_layers, checkpointed=checkpoint_layers,
                                           lean=lean_activations)  # fmt: skip

    @property
    def device(self) -> torch.device:
        return self.input_embeddings().device

    def input_embeddings(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight

    def context_ids(self, prompt: str) -> tuple[list[int], list[int]]:
        raise NotImplementedError

    def score_packed(self, packed: PackedInputs) -> torch.Tensor:
        raise NotImplementedError

    def model_inputs(self, packed: PackedInputs, causal: bool) -> dict:
        """Keyword arguments for the HF model, with a prebuilt 4-D mask (no host sync)
        and, for a cached prefix, its keys and values as the model's key/value cache."""
        dtype = packed.inputs_embeds.dtype
        mask = attention_mask_4d(self.model, packed.attention_mask.bool(), causal, dtype, packed.past_valid)
        inputs = {"inputs_embeds": packed.inputs_embeds, "attention_mask": mask, "position_ids": packed.position_ids}
        if packed.past_kv is not None:
            layers = len(packed.past_kv) // 2
            inputs[cache_argument(self.model)] = PrefixKeysValues(
                list(packed.past_kv[:layers]), list(packed.past_kv[layers:])
            )
            inputs["use_cache"] = True
        elif causal:
            inputs["use_cache"] = False  # no key/value cache to build (and none to grow on recompute)
        return inputs

    def model_embeds(self, embeds: torch.Tensor) -> torch.Tensor:
        """The part of context / guided embeddings the model takes as ``inputs_embeds``."""
        return embeds

    def cached_prefix(self, context: RewardContext) -> tuple[torch.Tensor, ...] | None:
        """The model's keys then values over ``context``'s ``prefix[:, :-1]`` (what
        :meth:`prepare` stores as ``prefix_kv`` with ``cache_prefix``); None when the
        prefix has a single column."""
        if context.prefix_embeds.shape[1] < 2:
            return None  # nothing before the last prefix column
        valid = context.prefix_valid[:, :-1]
        embeds = self.model_embeds(context.prefix_embeds[:, :-1])
        inputs = {
            "inputs_embeds": embeds,
            "attention_mask": attention_mask_4d(self.model, valid, True, embeds.dtype),
            "position_ids": (valid.long().cumsum(-1) - 1).clamp_min(0),
        }
        return prefix_keys_values(self.model.base_model, inputs)

    def _embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.input_embeddings()[ids.to(self.device)]

    def prepare(self, prompts: Sequence[str], num_samples: int) -> RewardContext:
        context_of = {prompt: self.context_ids(prompt) for prompt in dict.fromkeys(prompts)}  # once per prompt
        contexts = [context_of[p] for p in prompts for _ in range(num_samples)]
        prefix_ids, prefix_valid = pad_id_lists([c[0] for c in contexts], "left")
        suffix_ids, suffix_valid = pad_id_lists([c[1] for c in contexts], "right")
        context = RewardContext(
            self._embed_ids(prefix_ids),
            prefix_valid.to(self.device),
            self._embed_ids(suffix_ids),
            suffix_valid.to(self.device),
        )
        if self.cache_prefix:
            with self.guidance_layers.prefill():  # the guidance calls' layers: cached and uncached round alike
                context.prefix_kv = self.cached_prefix(context)
        return context

    def pack(self, context: RewardContext, response_embeds: torch.Tensor, response_valid: torch.Tensor) -> PackedInputs:
        """Concatenate ``[prefix | response | suffix]`` and pack it (see ``pack_inputs``);
        with cached prefix keys only the prefix's last column leads the block."""
        cached = context.prefix_kv is not None
        prefix_embeds, prefix_valid = context.prefix_embeds, context.prefix_valid
        if cached:
            prefix_embeds, prefix_valid = prefix_embeds[:, -1:], prefix_valid[:, -1:]
        embeds = torch.cat([prefix_embeds, response_embeds.to(prefix_embeds.dtype), context.suffix_embeds], dim=1)
        valid = torch.cat([prefix_valid, response_valid, context.suffix_valid], dim=1)
        segment = torch.cat([
            torch.full_like(prefix_valid, PREFIX, dtype=torch.long),
            torch.full_like(response_valid, RESPONSE, dtype=torch.long),
            torch.full_like(context.suffix_valid, SUFFIX, dtype=torch.long),
        ], dim=1)  # fmt: skip
        packed = pack_inputs(embeds, valid, self.align, segment)
        if self.align == "right":  # real tokens keep their order at the end: the response and suffix come last
            packed = packed._replace(tail_width=response_valid.shape[1] + context.suffix_valid.shape[1])
        if not cached:
            return packed
        past_valid = context.prefix_valid[:, :-1]
        positions = packed.position_ids + past_valid.sum(-1, keepdim=True)  # positions count real tokens
        return packed._replace(position_ids=positions, past_kv=context.prefix_kv, past_valid=past_valid)

    def pack_texts(self, prompts: Sequence[str], responses: Sequence[str]) -> PackedInputs:
        """Packed real-token inputs for decoded responses (truncated to ``max_response_tokens``)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        rows = [self.tokenizer(r, add_special_tokens=False)["input_ids"][: self.max_response_tokens] for r in responses]
        ids, valid = pad_id_lists(rows, "right")
        return self.pack(self.prepare(prompts, 1), self._embed_ids(ids), valid.to(self.device))

    def score_embeds(
        self, context: RewardContext, response_embeds: torch.Tensor, response_valid: torch.Tensor
    ) -> torch.Tensor:
        with self.guidance_layers.active():
            return self.score_packed(self.pack(context, response_embeds, response_valid)).float()

    @torch.no_grad()
    def score_texts(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        return self.score_packed(self.pack_texts(prompts, responses)).float()
