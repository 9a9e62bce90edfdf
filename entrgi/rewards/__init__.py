"""Differentiable rewards for guidance and their loaders."""

from __future__ import annotations

import torch

from entrgi.model_source import model_source
from entrgi.rewards.base import EmbeddingInputReward, Reward, RewardContext
from entrgi.rewards.classifier import ClassifierReward
from entrgi.rewards.likelihood import LikelihoodReward
from entrgi.rewards.similarity import SimilarityReward
from entrgi.rewards.vocab import VocabMapping, build_vocab_mapping

REWARD_KINDS = ("classifier", "similarity", "likelihood")
DEFAULT_TARGET = "A warm, friendly and helpful answer about the weather, the sun and the sea."


def check_reward_options(
    kind: str, target: str | None = None, system_prompt: str | None = None, cache_prefix: bool = False
) -> None:
    """Reject options the reward ``kind`` would not read (checked before any model loads)."""
    if kind not in REWARD_KINDS:
        raise ValueError(f"unknown reward kind {kind!r}; expected one of {REWARD_KINDS}")
    if kind == "similarity":
        if system_prompt is not None:
            raise ValueError("system_prompt goes into a classifier or likelihood reward's chat template; a "
                             "similarity reward reads no chat template")  # fmt: skip
        if cache_prefix:
            raise ValueError("cache_prefix needs a causal reward (classifier or likelihood), not a similarity encoder")
    elif target is not None:
        raise ValueError(f"target is the text a similarity reward moves towards; a {kind} reward does not read it")


def load_reward(
    name_or_path: str,
    kind: str = "classifier",
    *,
    target: str | None = None,
    system_prompt: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    cache_prefix: bool = False,
    checkpoint_layers: bool = False,
    compile_layers: bool = False,
    lean_activations: bool = True,
    **from_pretrained_kwargs,
) -> Reward:
    """Load a reward model by hub id or local path.

    kind : ``classifier`` (``AutoModelForSequenceClassification`` with one label),
        ``similarity`` (``AutoModel`` encoder; ``target`` is the text to move towards,
        ``DEFAULT_TARGET`` when None)
        or ``likelihood`` (``AutoModelForCausalLM``: mean log P(response + suffix | prefix)).
    cache_prefix : decoder classifier / likelihood rewards: compute the prompt side's
        keys and values once per batch and score only response and suffix tokens.
    checkpoint_layers : during guidance, keep only each layer's input for the backward
        and recompute the rest (most of the reward's activation memory, for about one
        extra reward forward per guidance step).
    compile_layers : during guidance, run the layers through one ``torch.compile``d
        layer (fused elementwise kernels; see :mod:`entrgi.layers`).
    lean_activations : during guidance, the layers' RMSNorms and gated MLPs keep less
        for the backward (same values; see :mod:`entrgi.lean`).
    Extra keyword arguments go to ``from_pretrained``.
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    check_reward_options(kind, target, system_prompt, cache_prefix)
    name_or_path = model_source(name_or_path, "reward model")
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if dtype is not None:
        from_pretrained_kwargs["dtype"] = dtype
    layers = {"checkpoint_layers": checkpoint_layers, "compile_layers": compile_layers,
              "lean_activations": lean_activations}  # fmt: skip
    options = {"cache_prefix": cache_prefix, **layers}
    if kind == "classifier":
        model = AutoModelForSequenceClassification.from_pretrained(name_or_path, **from_pretrained_kwargs)
        return ClassifierReward(model.to(device), tokenizer, system_prompt=system_prompt, **options)
    if kind == "likelihood":
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **from_pretrained_kwargs)
        return LikelihoodReward(model.to(device), tokenizer, system_prompt=system_prompt, **options)
    model = AutoModel.from_pretrained(name_or_path, **from_pretrained_kwargs)
    return SimilarityReward(model.to(device), tokenizer, target=target or DEFAULT_TARGET, **layers)


__all__ = [
    "DEFAULT_TARGET",
    "REWARD_KINDS",
    "ClassifierReward",
    "EmbeddingInputReward",
    "LikelihoodReward",
    "Reward",
    "RewardContext",
    "SimilarityReward",
    "VocabMapping",
    "build_vocab_mapping",
    "check_reward_options",
    "load_reward",
]
