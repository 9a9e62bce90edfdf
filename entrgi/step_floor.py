"""The floor of one denoising step at a step-suite preset: per component, the FLOPs and
the bytes that must move, and the time they take at the H100 ceilings of PERF.md
(750 TFLOP/s bf16, 3.0 TB/s). No GPU needed.

The models' FLOPs are counted (``torch.utils.flop_counter``) by running the real
denoiser and reward code on the meta device: the denoiser's forward as the step calls it
(output head on the response only) and the reward's forward + backward as guidance calls
it (gradients to the inputs only). The fused op, Adam and the commit are counted from
shapes: two GEMMs over the active rows per guidance step (more with recomputed Adam
moments), and the (rows, V) tensors each must read or write once: the denoiser writes
its logits in its own dtype, a guided step copies them to float32 for Adam, and the
commit reads whichever of the two the step has. Bytes count weights and those tensors,
not the models' activations, so the floor is a lower bound on a step's time.

``python bench/step_floor.py`` prints the table; ``entrgi bench --profile --preset P``
puts each component's floor beside its measured device time.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, NamedTuple

import torch
from torch.utils.flop_counter import FlopCounterMode

from entrgi.benchmark import PEAK_BYTES_PER_S, PEAK_FLOP_PER_S
from entrgi.rewards.base import RewardContext
from entrgi.step_benchmark import (
    PRESETS,
    PROMPT_TOKENS,
    REWARD_PREFIX_TOKENS,
    REWARD_SUFFIX_TOKENS,
    StepOptions,
    build_models,
)

META = torch.device("meta")
DTYPE = torch.bfloat16
PHI_BYTES = 4  # the guidance loop's logits and Adam moments are float32


class Component(NamedTuple):
    """One part of a step; ``flops`` and ``nbytes`` cover its ``repeats`` (the guidance
    steps). ``runs_in``: the steps that run it ("both", "guided" or "unguided").
    ``detail``: a share of the component above it, not added to the step."""

    name: str
    flops: float
    nbytes: float
    runs_in: str = "both"
    repeats: int = 1
    detail: bool = False

    def counts_in(self, guided: bool) -> bool:
        """Whether the component adds to a guided (else unguided) step's floor."""
        return not self.detail and self.runs_in in ("both", "guided" if guided else "unguided")

    @property
    def label(self) -> str:
        return ("  of which " if self.detail else "") + self.name + (f" (x{self.repeats})" if self.repeats > 1 else "")

    @property
    def floor_ms(self) -> float:
        return max(self.flops / PEAK_FLOP_PER_S, self.nbytes / PEAK_BYTES_PER_S) * 1e3

    @property
    def bound(self) -> str:
        return "compute" if self.flops / PEAK_FLOP_PER_S > self.nbytes / PEAK_BYTES_PER_S else "memory"


def _weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights a pass reads in full: all but the input-embedding table
    (a pass gathers a few of its rows), unless the output head shares it."""
    inputs = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    gathered = 0 if head is not None and head.weight is inputs else inputs.numel() * inputs.element_size()
    return sum(p.numel() * p.element_size() for p in model.parameters()) - gathered


def denoiser_flops(denoiser, rows: int, new_tokens: int) -> tuple[float, float]:
    """(all, output head) FLOPs of the step's denoiser forward over ``rows`` canvases."""
    canvas = torch.zeros(rows, PROMPT_TOKENS + new_tokens, dtype=torch.long, device=META)
    attention = torch.ones(canvas.shape, dtype=torch.bool, device=META)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        denoiser.logits(canvas, attention, keep_last=new_tokens)
    head = sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items() if name.endswith("lm_head"))
    return float(counter.get_total_flops()), float(head)


def reward_call(reward, rows: int, new_tokens: int) -> Callable[[], None]:
    """One guidance call of the reward on the meta device: score ``rows`` responses,
    then backward to the response embeddings. The cached prefix, if any, is built here,
    once per batch, not by the call."""
    d = reward.input_embeddings().shape[1]
    context = RewardContext(
        torch.empty(rows, REWARD_PREFIX_TOKENS, d, dtype=DTYPE, device=META),
        torch.ones(rows, REWARD_PREFIX_TOKENS, dtype=torch.bool, device=META),
        torch.empty(rows, REWARD_SUFFIX_TOKENS, d, dtype=DTYPE, device=META),
        torch.ones(rows, REWARD_SUFFIX_TOKENS, dtype=torch.bool, device=META),
    )
    if reward.cache_prefix:
        context.prefix_kv = reward.cached_prefix(context)
    embeds = torch.empty(rows, new_tokens, d, dtype=DTYPE, device=META, requires_grad=True)
    valid = torch.ones(rows, new_tokens, dtype=torch.bool, device=META)
    return lambda: reward.score_embeds(context, embeds, valid).sum().backward()


def reward_flops(reward, rows: int, new_tokens: int) -> float:
    """FLOPs of one guidance call of the reward (:func:`reward_call`)."""
    call = reward_call(reward, rows, new_tokens)
    with FlopCounterMode(display=False) as counter:
        call()
    return float(counter.get_total_flops())


def step_components(preset: str, options: StepOptions = StepOptions()) -> list[Component]:
    """The components of a guided and an unguided step of ``preset`` run with ``options``
    (:attr:`Component.runs_in` says which): ``masked_fraction`` of the response rows still
    masked, the reward's prefix cache and checkpointing, and the logits' Adam moments
    (``recompute``: none stored; each backward reads the denoiser's bf16 logits and
    replays one GEMM per step so far). Lean, fused and compiled layers change what the
    backward keeps and how many kernels run, not the FLOPs: the count runs stock layers
    (their swap checks and compilation need real tensors, not the meta device's)."""
    stock_layers = replace(options, reward_lean=False, denoiser_fused=False, compile_layers=False)
    denoiser, reward = build_models(preset, META, DTYPE, stock_layers)
    new_tokens = options.new_tokens
    _, _, prompts, k = PRESETS[preset]
    rows = prompts * k
    vocab = denoiser.vocab_size
    table = reward.input_embeddings()
    active = options.masked_fraction * rows * new_tokens  # (rows, V) logits rows the op and commit touch
    phi = active * vocab * PHI_BYTES
    active_logits = active * vocab * DTYPE.itemsize  # the same rows in the denoiser's dtype
    logits = rows * new_tokens * vocab  # the denoiser's response logits, every row
    table_bytes = table.numel() * table.element_size()
    gemm = 2.0 * active * vocab * table.shape[1]
    total, head = denoiser_flops(denoiser, rows, new_tokens)
    denoiser_bytes = _weight_bytes(denoiser.model) + logits * DTYPE.itemsize  # weights, logits out
    passes = 3 if options.reward_checkpoint else 2  # forward, backward (and the checkpoints' recompute)
    reward_bytes = passes * _weight_bytes(reward.model)
    m = options.guidance_steps
    if options.adam_moments == "recompute":  # step t reads the initial logits, writes phi, and replays t GEMMs
        replayed = m * (m + 1) / 2
        adam_bytes = m * (active_logits + phi) + replayed * table_bytes
        backward = Component("op backward + Adam", replayed * gemm, adam_bytes, "guided", m)
    else:
        moment_bytes = getattr(torch, options.adam_moments).itemsize
        adam_bytes = 2 * phi + 4 * active * vocab * moment_bytes  # phi and both moments, read and written
        backward = Component("op backward + Adam", m * gemm, m * (adam_bytes + table_bytes), "guided", m)
    return [
        Component("denoiser forward", total, denoiser_bytes),
        Component("output head", head, 0.0, detail=True),
        Component("logits to float32", 0.0, logits * (DTYPE.itemsize + PHI_BYTES), "guided"),
        Component("entropy confidence", 0.0, phi, "guided"),
        Component("guided op forward", m * gemm, m * (phi + table_bytes), "guided", m),
        Component("reward fwd+bwd", m * reward_flops(reward, rows, new_tokens), m * reward_bytes, "guided", m),
        backward,
        Component("commit from float32 phi", 0.0, phi, "guided"),
        Component("commit from the model's logits", 0.0, active_logits, "unguided"),
    ]


def step_floor_ms(components: list[Component], guided: bool) -> float:
    """A guided (else unguided) step's floor: its components' floors added up."""
    return sum(c.floor_ms for c in components if c.counts_in(guided))


# The profiler's ranges (``entrgi bench --profile``) and the components each one times.
RANGE_COMPONENTS = {
    "entrgi.denoiser_forward": ("denoiser forward", "logits to float32"),
    "entrgi.entropy_confidence": ("entropy confidence",),
    "entrgi.guided_embedding": ("guided op forward",),
    "entrgi.reward_forward_backward": ("reward fwd+bwd", "op backward + Adam"),  # the op's backward runs inside
    "entrgi.commit": ("commit from float32 phi", "commit from the model's logits"),
}


def range_floors(components: list[Component], guided: bool = True) -> dict[str, float]:
    """Floor ms of each profiler range of :data:`RANGE_COMPONENTS` in a guided (else
    unguided) step."""
    return {
        key: sum(c.floor_ms for c in components if c.name in names and c.counts_in(guided))
        for key, names in RANGE_COMPONENTS.items()
    }


def format_floor(preset: str, components: list[Component]) -> str:
    lines = [f"| {preset} | TFLOP | GB | floor ms | bound |", "|---|---|---|---|---|"]
    for c in components:
        lines.append(f"| {c.label} | {c.flops / 1e12:.2f} | {c.nbytes / 1e9:.2f} | {c.floor_ms:.2f} | {c.bound} |")
    unguided, guided = step_floor_ms(components, False), step_floor_ms(components, True)
    lines.append(f"| unguided step | | | {unguided:.2f} | |")
    lines.append(f"| guided step | | | {guided:.2f} | guided / unguided {guided / unguided:.2f} |")
    return "\n".join(lines)
