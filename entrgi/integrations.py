"""Drop-in replacements for the guidance loop of other EntRGi code bases.

Two published loops are covered, each replaced by :func:`entrgi.guidance.optimize_logits`
(one static-shape batch, the fused op, no per-trajectory Python loop or host sync):

* the authors' scripts (``main_expts/entrgi.py``): module-level
  ``optimize_logits(base_logits, mask_indices, trajectories, max_prompt_len,
  trajectory_pad_lens, B, K, reward_model, caches, token_mapping, mapped_embeds,
  reward_embed_layer, eos_token_id, pad_token_id, cfg) -> (phi, phi_init)``;
  patch with ``apply_entrgi_to_published(module)``.
* dllm's ``EntrgiDreamSampler._optimize_logits(self, base_logits, mask_index, x,
  max_prompt_len, caches, K, config, device) -> (phi, phi_init, ew_mean)``; patch
  with ``apply_entrgi_to_dllm()`` (no dependency on dllm until called).

The replacements keep the callers' contracts (same arguments, the masked rows of phi
returned in ``mask.nonzero()`` order, ``None`` when nothing is masked) and fix the
pitfalls listed in SPEC.md: the reward is read at the last real token with position
ids for left-padded prefixes, and positions from the first end token on are hidden.
phi is optimised in float32.
"""

from __future__ import annotations

import types
from typing import Sequence

import torch

from entrgi.guidance import GuidanceStep, optimize_logits as guide
from entrgi.rewards import ClassifierReward, RewardContext
from entrgi.rewards.base import pad_rows

DLLM_SAMPLER_MODULES = ("dllm.pipelines.entrgi", "dllm.pipelines.rl")
WRAPPER_ATTRIBUTE = "_entrgi_classifier_reward"


def _classifier(reward_model) -> ClassifierReward:
    """The reward model behind our packing, made once per model and kept on it (a
    reference cycle, freed with the model; a table keyed by the model would keep every
    model alive)."""
    wrapper = getattr(reward_model, WRAPPER_ATTRIBUTE, None)
    if wrapper is None:
        wrapper = ClassifierReward(reward_model, tokenizer=None)
        setattr(reward_model, WRAPPER_ATTRIBUTE, wrapper)
    return wrapper


def context_from_caches(prefixes: Sequence[torch.Tensor], suffixes: Sequence[torch.Tensor], k: int) -> RewardContext:
    """A :class:`RewardContext` for K contiguous rows per prompt from per-prompt cached
    (1, P_b, d) prefix and (1, S_b, d) suffix embeddings."""
    prefix, prefix_valid = pad_rows([p[0] for p in prefixes], "left")
    suffix, suffix_valid = pad_rows([s[0] for s in suffixes], "right")
    repeat = lambda t: t.repeat_interleave(k, dim=0)  # noqa: E731
    return RewardContext(repeat(prefix), repeat(prefix_valid), repeat(suffix), repeat(suffix_valid))


def _end_ids(device, *ids) -> torch.Tensor:
    return torch.tensor(sorted({int(i) for i in ids if i is not None}), dtype=torch.long, device=device)


def _guide_masked_rows(base_logits, mask, x, max_prompt_len, table, reward_model, context, end_ids, guidance):
    """Optimise the response block; return the masked rows of phi and phi_init."""
    masked = mask[:, max_prompt_len:]
    phi_init = base_logits[:, max_prompt_len:].float()
    phi, mean_weight = guide(phi_init, masked, x[:, max_prompt_len:], table, _classifier(reward_model), context,
                             end_ids, guidance)  # fmt: skip
    return phi[masked], phi_init[masked], mean_weight


def published_optimize_logits(
    base_logits, mask_indices, trajectories, max_prompt_len, trajectory_pad_lens, B, K, reward_model, caches,
    token_mapping, mapped_embeds, reward_embed_layer, eos_token_id, pad_token_id, cfg,
):  # fmt: skip
    """Drop-in for the published ``optimize_logits``: returns ``(phi, phi_init)``, the
    masked rows (published order) after ``cfg.M`` Adam steps at ``cfg.eta``, or
    ``(None, None)`` when nothing is masked. Mode from ``cfg.use_entrgi`` / ``cfg.use_aps``
    (else the expectation relaxation), as published."""
    mask = torch.stack(list(mask_indices)) if not torch.is_tensor(mask_indices) else mask_indices
    if not bool(mask.any()):
        return None, None
    mode = "entrgi" if cfg.use_entrgi else "aps" if cfg.use_aps else "expectation"
    guidance = GuidanceStep(mode, cfg.M, cfg.eta, getattr(cfg, "reward_temperature", 1.0), cfg.temperature,
                            cfg.top_p if cfg.top_p is not None else 1.0, cfg.top_k or 0)  # fmt: skip
    context = context_from_caches([c.prefix_embeds for c in caches], [c.suffix_embeds for c in caches], K)
    end_ids = _end_ids(trajectories.device, eos_token_id, pad_token_id)
    phi, phi_init, _ = _guide_masked_rows(base_logits, mask, trajectories, max_prompt_len, mapped_embeds,
                                          reward_model, context, end_ids, guidance)  # fmt: skip
    return phi, phi_init


def dllm_optimize_logits(self, base_logits, mask_index, x, max_prompt_len, caches, K, config, device):
    """Drop-in for dllm's ``EntrgiDreamSampler._optimize_logits``: returns
    ``(phi, phi_init, ew_mean)`` or ``(None, None)`` when nothing is masked; ``ew_mean``
    is the mean entropy weight over masked rows and steps. Mode from ``config.aps`` /
    ``config.soft_only`` (else EntRGi), as dllm does."""
    if not bool(mask_index.any()):
        return None, None
    mode = "aps" if config.aps else "expectation" if config.soft_only else "entrgi"
    guidance = GuidanceStep(mode, config.M, config.eta, config.reward_temperature, config.temperature,
                            config.top_p if config.top_p is not None else 1.0, config.top_k or 0)  # fmt: skip
    context = context_from_caches([c[0] for c in caches], [c[1] for c in caches], K)
    pad_id = getattr(self.tokenizer, "pad_token_id", None)
    end_ids = _end_ids(x.device, self.tokenizer.eos_token_id, pad_id)
    phi, phi_init, mean_weight = _guide_masked_rows(base_logits, mask_index, x, max_prompt_len, self.mapped_embeds,
                                                    self.reward_model, context, end_ids, guidance)  # fmt: skip
    return phi, phi_init, float(mean_weight)


def apply_entrgi_to_published(module: types.ModuleType) -> None:
    """Swap ``module.optimize_logits`` (the authors' script, imported under any name:
    it is called ``entrgi.py`` too) for :func:`published_optimize_logits`."""
    if not callable(getattr(module, "optimize_logits", None)):
        raise AttributeError(f"{module.__name__} has no optimize_logits to replace")
    module.optimize_logits = published_optimize_logits


def apply_entrgi_to_dllm(sampler_class: type | None = None) -> type:
    """Swap ``EntrgiDreamSampler._optimize_logits`` for :func:`dllm_optimize_logits`.

    ``sampler_class`` defaults to dllm's own class (looked up in
    ``DLLM_SAMPLER_MODULES``); returns the patched class. Raises ImportError when dllm
    is not installed and no class is given.
    """
    if sampler_class is None:
        import importlib

        for name in DLLM_SAMPLER_MODULES:
            try:
                sampler_class = importlib.import_module(name).EntrgiDreamSampler
                break
            except (ImportError, AttributeError):
                continue
        else:
            raise ImportError(f"dllm's EntrgiDreamSampler was not found in {DLLM_SAMPLER_MODULES}; install dllm "
                              "or pass the sampler class")  # fmt: skip
    sampler_class._optimize_logits = dllm_optimize_logits
    return sampler_class
