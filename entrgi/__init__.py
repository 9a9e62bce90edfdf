"""entrgi: fast, faithful Entropy-aware Reward Guidance for masked diffusion LMs."""

from entrgi.config import METHODS, GuidanceConfig
from entrgi.denoisers import Denoiser, load_denoiser
from entrgi.ops import GuidedEmbedding, StepSample, guided_embedding, sample_step
from entrgi.rewards import (
    ClassifierReward,
    LikelihoodReward,
    Reward,
    SimilarityReward,
    build_vocab_mapping,
    load_reward,
)
from entrgi.sampler import PromptResult, generate

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "ClassifierReward",
    "Denoiser",
    "GuidanceConfig",
    "GuidedEmbedding",
    "LikelihoodReward",
    "PromptResult",
    "Reward",
    "SimilarityReward",
    "StepSample",
    "build_vocab_mapping",
    "generate",
    "guided_embedding",
    "load_denoiser",
    "load_reward",
    "sample_step",
]
