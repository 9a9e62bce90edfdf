"""``GuidanceConfig``: every knob of a guided generation, validated on construction."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from numbers import Real

import torch

from entrgi.ops import ALGS, MODES
from entrgi.ops.validation import BACKENDS, check_choice, check_sampling_args

GUIDED_METHODS = MODES  # a guided method is a guided_embedding mode
METHODS = (*GUIDED_METHODS, "bon", "none")
REMASKING = ("low_confidence", "random")
GUIDANCE_SCOPES = ("block", "all")
PROBABILITY_CONFIDENCE = ("maskgit_plus", "low_confidence")
ADAM_MOMENTS = ("float32", "bfloat16", "recompute")
POSITIVE_FIELDS = ("lr", "reward_temperature")
NON_NEGATIVE_FIELDS = ("alg_temp", "cfg_scale")
FIELD_CHOICES = {
    "method": METHODS, "alg": ALGS, "backend": BACKENDS, "adam_moments": ADAM_MOMENTS,
    "guidance_scope": GUIDANCE_SCOPES, "remasking": REMASKING,
}  # fmt: skip


@dataclass(frozen=True)
class GuidanceConfig:
    """Settings of :func:`entrgi.generate`. Defaults are the published run's.

    method : ``entrgi`` | ``aps`` (w = 1) | ``expectation`` (w = 0) | ``bon`` (best of K,
        unguided) | ``none`` (unguided; the first sample is reported as Top@1).
    num_samples : K trajectories per prompt. steps : T denoising steps.
    eps : the last step's time: steps run from t = 1 to t = eps (``linspace(1, eps, T + 1)``, Dream's).
    guidance_steps : M Adam steps on phi per guided step; lr : their learning rate.
    reward_temperature : beta in loss = -sum R / beta. guide_every : guide every k-th step.
    temperature, top_p, top_k : sampling law ``softmax(filter(phi / tau))``; tau = 0 is greedy.
    alg : commit confidence (``entropy`` | ``maskgit_plus`` | ``topk_margin`` | ``origin``);
    alg_temp : > 0 samples the committed positions from softmax(confidence / alg_temp).
    deprioritize_eos : confidence -inf where the sampled token ends the response.
    prompts_per_batch : prompts denoised together (each with K rows).
    chat_template : wrap prompts in the denoiser tokenizer's chat template when it has one.
    cuda_graphs : ``auto`` (on CUDA), True or False: replay each step kind from a CUDA graph.
    adam_moments : how the logits' Adam keeps its two moments. ``float32``: stored, exact.
        ``bfloat16``: stored rounded, 2 x 2 instead of 2 x 4 bytes per logit of the
        response block (an approximation). ``recompute``: not stored; each guidance
        step's backward kernel replays Adam from the denoiser's logits (kept in their own
        dtype, 2 bytes per logit for a bf16 denoiser) at one extra GEMM per earlier step;
        exact (Triton backend; ``torch`` stores float32 moments). See
        :class:`~entrgi.optim.LogitAdam`.
    output_history : keep the response block after every step (``PromptResult.history``,
        the results' ``history``), as Dream's ``output_history``.

    LLaDA-style semi-autoregressive decoding and Fast-dLLM parallel decoding:

    block_length : split the response into blocks of this many positions, decoded left
        to right: only the current block (a row's first block with a mask) may commit,
        with LLaDA's linear schedule (``steps / n_blocks`` steps per block, the block's
        masks spread evenly over them). None: one block, Dream's schedule.
    guidance_scope : with blocks, which masked positions guidance steers: ``block`` (the
        current block; later blocks are seen by the reward as the denoiser predicts
        them) or ``all``.
    remasking : LLaDA's commit rule, replacing ``alg``: ``low_confidence`` (probability of
        the drawn token under softmax(phi)) or ``random`` (uniform confidence).
    cfg_scale : classifier-free guidance: logits ``un + (cfg_scale + 1)(cond - un)``
        where ``un`` sees the prompt masked (a second batch). 0 = off.
    confidence_threshold : commit every masked position of the current block whose
        probability confidence (``alg="maskgit_plus"`` or ``remasking="low_confidence"``)
        is >= this, and at least the most confident one per step; the run ends once
        everything is committed (at most ``max_new_tokens`` steps; ``steps`` is unused).
    """

    method: str = "entrgi"
    num_samples: int = 4
    steps: int = 128
    eps: float = 1e-3
    max_new_tokens: int = 128
    guidance_steps: int = 3
    lr: float = 0.5
    reward_temperature: float = 1.0
    guide_every: int = 1
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0
    alg: str = "entropy"
    alg_temp: float = 0.0
    deprioritize_eos: bool = True
    seed: int = 0
    backend: str = "auto"
    prompts_per_batch: int = 4
    chat_template: bool = True
    cuda_graphs: str | bool = "auto"
    adam_moments: str = "float32"
    output_history: bool = False
    block_length: int | None = None
    guidance_scope: str = "block"
    remasking: str | None = None
    cfg_scale: float = 0.0
    confidence_threshold: float | None = None

    def __post_init__(self):
        for name, choices in FIELD_CHOICES.items():
            if not (name == "remasking" and self.remasking is None):  # None: ``alg`` ranks the commits
                check_choice(name, getattr(self, name), choices)
        check_sampling_args(self.temperature, self.top_p, self.top_k)
        if self.cuda_graphs not in ("auto", True, False):
            raise ValueError(f"cuda_graphs must be 'auto', True or False, got {self.cuda_graphs!r}")
        for name in ("num_samples", "steps", "max_new_tokens", "guide_every", "prompts_per_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(self.guidance_steps, bool) or not isinstance(self.guidance_steps, int) or self.guidance_steps < 0:
            raise ValueError(f"guidance_steps must be an int >= 0, got {self.guidance_steps!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if not 0 < self.eps < 1:
            raise ValueError(f"eps must be in (0, 1), got {self.eps}")
        for name in (*POSITIVE_FIELDS, *NON_NEGATIVE_FIELDS):
            value, positive = getattr(self, name), name in POSITIVE_FIELDS
            number = not isinstance(value, bool) and isinstance(value, Real) and math.isfinite(value)
            if not number or value < 0 or (positive and value == 0):
                raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
        self._check_decoding()

    def _check_decoding(self) -> None:
        if self.block_length is not None:
            length = self.block_length
            if isinstance(length, bool) or not isinstance(length, int) or length < 1:
                raise ValueError(f"block_length must be an int >= 1 or None, got {length!r}")
            if self.max_new_tokens % length:
                raise ValueError(
                    f"max_new_tokens ({self.max_new_tokens}) must be a multiple of block_length ({length})"
                )
            if self.confidence_threshold is None and self.steps % self.num_blocks:
                raise ValueError(f"steps ({self.steps}) must be a multiple of the number of blocks ({self.num_blocks})")
        if self.commit_rule == "origin" and (self.block_length is not None or self.confidence_threshold is not None):
            raise ValueError("alg='origin' commits at random without a count; with block_length or "
                             "confidence_threshold use remasking='random'")  # fmt: skip
        if self.confidence_threshold is not None:
            if not 0 < self.confidence_threshold <= 1:
                raise ValueError(f"confidence_threshold must be in (0, 1], got {self.confidence_threshold}")
            if self.commit_rule not in PROBABILITY_CONFIDENCE:
                raise ValueError(f"confidence_threshold needs a probability confidence (alg='maskgit_plus' or "
                                 f"remasking='low_confidence'), got {self.commit_rule!r}")  # fmt: skip

    @property
    def num_blocks(self) -> int:
        return 1 if self.block_length is None else self.max_new_tokens // self.block_length

    @property
    def most_steps(self) -> int:
        """Steps a run takes at most: ``steps``, or ``max_new_tokens`` with a confidence
        threshold (it commits at least one position a step and ends once all are)."""
        return self.steps if self.confidence_threshold is None else self.max_new_tokens

    @property
    def commit_rule(self) -> str:
        """How committed positions are ranked: ``remasking`` when set, else ``alg``."""
        return self.remasking or self.alg

    @property
    def guided(self) -> bool:
        """Whether steps run the reward-gradient loop. At temperature 0 the soft embedding
        is a one-hot argmax with no gradient, so greedy runs are unguided."""
        return self.method in GUIDED_METHODS and self.guidance_steps > 0 and self.temperature > 0

    @property
    def needs_reward(self) -> bool:
        """Whether the method reads a reward: every guided method, and best-of-K's ranking."""
        return self.method in GUIDED_METHODS or self.method == "bon"

    def use_cuda_graphs(self, device: torch.device) -> bool:
        """Whether denoising steps replay CUDA graphs on ``device`` (``auto``: on CUDA)."""
        if self.cuda_graphs is True and device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a CUDA denoiser, got device {device}")
        return device.type == "cuda" and self.cuda_graphs in ("auto", True)

    def replace(self, **overrides) -> "GuidanceConfig":
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown GuidanceConfig fields: {sorted(unknown)}")
        return dataclasses.replace(self, **overrides)
