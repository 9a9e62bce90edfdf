"""Vocabulary mapping between the denoiser's and the reward model's tokenizers."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

MIN_COVERAGE = 0.9  # below it, a tenth of the denoiser's ids or more reach the reward as the fallback token


@dataclass(frozen=True)
class VocabMapping:
    """``ids[v]`` is the reward-vocabulary id of denoiser token ``v``.

    ids : (V_denoiser,) int64. mapped : how many denoiser ids found their string.
    fallback_id : the reward id used for strings the reward vocabulary lacks and for
    denoiser ids that have no string at all (rows beyond the tokenizer's size).
    """

    ids: torch.Tensor
    mapped: int
    fallback_id: int

    @property
    def coverage(self) -> float:
        return self.mapped / self.ids.numel()

    def report(self) -> str:
        return (
            f"vocabulary mapping: {self.mapped:,} of {self.ids.numel():,} denoiser ids "
            f"({100 * self.coverage:.2f}%) found in the reward vocabulary; the rest map to id {self.fallback_id}"
        )


def warn_if_sparse(mapping: VocabMapping) -> None:
    """Warn when fewer than MIN_COVERAGE of the denoiser's ids found their string in the
    reward vocabulary (tokenizers that spell tokens differently, e.g. SentencePiece's
    '▁' against byte-level BPE's 'Ġ'): guidance reads the fallback's embedding for the rest."""
    if mapping.coverage < MIN_COVERAGE:
        warnings.warn(f"{mapping.report()}, which the reward sees in their place: check that the two "
                      "tokenizers spell tokens alike", UserWarning, stacklevel=3)  # fmt: skip


def fallback_token_id(tokenizer) -> int:
    for candidate in (tokenizer.unk_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id):
        if candidate is not None:
            return candidate
    raise ValueError("the reward tokenizer declares no unk, eos or pad token to map unknown strings to")


def build_vocab_mapping(denoiser_tokenizer, reward_tokenizer, denoiser_vocab_size: int) -> VocabMapping:
    """Map every denoiser id (``0 .. denoiser_vocab_size - 1``) to the same token string
    in the reward vocabulary. ``denoiser_vocab_size`` is the logits width, which can exceed
    the tokenizer's size (Dream: 152,064 rows vs 151,936 strings)."""
    fallback = fallback_token_id(reward_tokenizer)
    ids = torch.full((denoiser_vocab_size,), fallback, dtype=torch.long)
    reward_vocab = reward_tokenizer.get_vocab()
    mapped = 0
    for token, denoiser_id in denoiser_tokenizer.get_vocab().items():
        reward_id = reward_vocab.get(token)
        if reward_id is not None and denoiser_id < denoiser_vocab_size:
            ids[denoiser_id] = reward_id
            mapped += 1
    return VocabMapping(ids=ids, mapped=mapped, fallback_id=fallback)
