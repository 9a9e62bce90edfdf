"""End-to-end denoising-step benchmark on random-weight models of the paper's shapes.

Dream-7B is a Qwen2-7B body run bidirectionally (the model ``load_denoiser`` builds
from a Dream checkpoint); the rewards are Qwen3 sequence classifiers of
Skywork-Reward-V2's 0.6B and 1.7B shapes. Weights are random (speed does not depend on
them) and built in place, so nothing is downloaded. On a CPU the ``tiny`` preset keeps
the same code path at toy sizes.

For each method (unguided ``none`` and every guided one) and each execution mode
(eager, CUDA graphs) it runs the real :class:`DiffusionRun` and reports ms per step
(median / p20 / p80 over the timed steps), peak memory, and the guided / unguided
ratio measured in the same run. Timing starts from a canvas with ``masked_fraction``
of the response still masked (default 0.5, the average step of a run: committed
positions are skipped by the kernels; 1.0 times the first steps).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, fields

import torch

from entrgi.benchmark import RunInfo, cell, environment, quantile
from entrgi.config import GuidanceConfig
from entrgi.denoisers import Denoiser
from entrgi.rewards import ClassifierReward
from entrgi.rewards.base import RewardContext
from entrgi.sampler import DiffusionRun, GuidanceTable

# (hidden, intermediate, layers, heads, kv heads, head dim, vocab)
SHAPES = {
    "dream-7b": (3584, 18944, 28, 28, 4, 128, 152064),
    "qwen3-0.6b": (1024, 3072, 28, 16, 8, 128, 151936),
    "qwen3-1.7b": (2048, 6144, 28, 16, 8, 128, 151936),
    "tiny-denoiser": (64, 128, 2, 4, 2, 16, 1024),
    "tiny-reward": (32, 64, 2, 2, 1, 16, 1000),
}
PRESETS = {  # name: (denoiser, reward, prompts, K)
    "1xK4-0.6b": ("dream-7b", "qwen3-0.6b", 1, 4),
    "4xK4-1.7b": ("dream-7b", "qwen3-1.7b", 4, 4),
    "tiny": ("tiny-denoiser", "tiny-reward", 1, 2),
}
PROMPT_TOKENS, REWARD_PREFIX_TOKENS, REWARD_SUFFIX_TOKENS = 64, 64, 8


def check_masked_fraction(masked_fraction: float) -> None:
    if not 0 < masked_fraction <= 1:
        raise ValueError(f"masked_fraction must be in (0, 1], got {masked_fraction}")


@dataclass(frozen=True)
class StepOptions:
    """How a benchmarked step runs, besides its preset, method and graphs."""

    guidance_steps: int = 3  # Adam steps M per guided step
    new_tokens: int = 128  # response length G (= steps T)
    masked_fraction: float = 0.5  # of the response still masked when timing starts
    reward_cache_prefix: bool = False  # the reward's prompt side computed once
    reward_checkpoint: bool = False  # the reward's layers recomputed in the backward
    reward_lean: bool = True  # the reward's norms and MLPs keep less (fused on CUDA)
    denoiser_fused: bool = True  # the denoiser's norms and MLPs fused on CUDA
    compile_layers: bool = False  # both models' layers through one compiled layer
    adam_moments: str = "float32"  # the logits' Adam moments: float32, bfloat16 or recompute

    def __post_init__(self):
        check_masked_fraction(self.masked_fraction)

    @classmethod
    def from_args(cls, args) -> StepOptions:
        """The options an argparse namespace names (the others at their defaults)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


@dataclass
class StepRow(RunInfo):
    preset: str
    method: str
    graphs: bool
    reward_cache_prefix: bool
    reward_checkpoint: bool
    reward_lean: bool
    denoiser_fused: bool
    compile_layers: bool
    adam_moments: str
    new_tokens: int
    guidance_steps: int
    masked_fraction: float
    denoiser_layers: str  # what runs in place of the stock layers (LayerRunner.describe)
    reward_layers: str
    ms_per_step: float
    p20_ms: float
    p80_ms: float
    peak_gib: float | None
    vs_unguided: float | None = None


class _IdsOnlyTokenizer:
    """Just enough tokenizer for a denoiser / reward built from ids (no vocabulary)."""

    mask_token_id = eos_token_id = sep_token_id = None
    pad_token_id = 0

    def get_vocab(self) -> dict:
        return {}


def _qwen_config(shape: str, classifier: bool):
    from transformers import Qwen2Config, Qwen3Config

    hidden, inter, layers, heads, kv, head_dim, vocab = SHAPES[shape]
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096)  # fmt: skip
    if classifier:
        return Qwen3Config(head_dim=head_dim, num_labels=1, pad_token_id=0, **common)
    return Qwen2Config(**common)


def build_models(preset: str, device: torch.device, dtype: torch.dtype, options: StepOptions = StepOptions()):
    """Random-weight denoiser and reward of ``preset``'s shapes, built on ``device`` with
    ``options``' layer and reward memory settings."""
    from transformers import Qwen2ForCausalLM, Qwen3ForSequenceClassification

    denoiser_shape, reward_shape, _, _ = PRESETS[preset]
    if torch.device(device).type == "cpu" and preset != "tiny":
        raise ValueError(f"preset {preset!r} builds a {denoiser_shape} denoiser and needs a CUDA device; "
                         "on a CPU use the 'tiny' preset")  # fmt: skip
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            body = Qwen2ForCausalLM(_qwen_config(denoiser_shape, classifier=False))
            classifier = Qwen3ForSequenceClassification(_qwen_config(reward_shape, classifier=True))
    finally:
        torch.set_default_dtype(default)
    vocab = SHAPES[denoiser_shape][-1]
    denoiser = Denoiser(body, _IdsOnlyTokenizer(), kind="dream", mask_token_id=vocab - 1,
                        compile_layers=options.compile_layers, fused_layers=options.denoiser_fused)  # fmt: skip
    reward = ClassifierReward(classifier, _IdsOnlyTokenizer(), cache_prefix=options.reward_cache_prefix,
                              checkpoint_layers=options.reward_checkpoint, compile_layers=options.compile_layers,
                              lean_activations=options.reward_lean)  # fmt: skip
    return denoiser, reward


def step_config(preset: str, method: str, options: StepOptions = StepOptions(), graphs: bool = False) -> GuidanceConfig:
    """The config of ``preset``'s batch: one batch of its prompts x K, T = G = new_tokens."""
    _, _, prompts, k = PRESETS[preset]
    return GuidanceConfig(method=method, num_samples=k, steps=options.new_tokens, max_new_tokens=options.new_tokens,
                          guidance_steps=options.guidance_steps, prompts_per_batch=prompts, cuda_graphs=graphs,
                          adam_moments=options.adam_moments)  # fmt: skip


def new_run(denoiser, reward, config: GuidanceConfig, seed: int = 0, masked_fraction: float = 1.0) -> DiffusionRun:
    """A run over random prompt ids with a random reward context (no tokenizers), with
    ``masked_fraction`` of its response positions masked and the rest random tokens;
    all drawn from ``seed``."""
    check_masked_fraction(masked_fraction)
    generator = torch.Generator(denoiser.device).manual_seed(seed)
    prompts = config.prompts_per_batch
    n = prompts * config.num_samples
    vocab = denoiser.vocab_size - 1
    prompt_ids = torch.randint(0, vocab, (prompts, PROMPT_TOKENS), generator=generator, device=generator.device)
    table = reward.input_embeddings()

    def random_embeds(length: int) -> torch.Tensor:
        ids = torch.randint(0, table.shape[0], (n, length), generator=generator, device=generator.device)
        return table[ids.to(table.device)]

    context = RewardContext(
        random_embeds(REWARD_PREFIX_TOKENS), torch.ones(n, REWARD_PREFIX_TOKENS, dtype=torch.bool, device=table.device),
        random_embeds(REWARD_SUFFIX_TOKENS), torch.ones(n, REWARD_SUFFIX_TOKENS, dtype=torch.bool, device=table.device),
    )  # fmt: skip
    if reward.cache_prefix:
        context.prefix_kv = reward.cached_prefix(context)
    # Dream and the Qwen3 rewards share the Qwen vocabulary: identity mapping, clamped,
    # read through the rows (no copy of the reward's table).
    rows = torch.arange(denoiser.vocab_size, dtype=torch.int32, device=table.device).clamp_max(table.shape[0] - 1)
    guidance = GuidanceTable(table.detach(), rows)
    run = DiffusionRun(denoiser, prompt_ids.tolist(), config, generator, guidance, reward, context)
    shape, device = run.response.shape, run.response.device
    committed = torch.rand(shape, generator=generator, device=device) >= masked_fraction
    random_tokens = torch.randint(0, vocab, shape, generator=generator, device=device)
    run.response.copy_(torch.where(committed, random_tokens, run.response))
    return run


def _device_and_dtype(device: str | None) -> tuple[torch.device, torch.dtype]:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32


def preset_run(preset: str, method: str = "entrgi", options: StepOptions = StepOptions(),
               graphs: bool = False) -> DiffusionRun:  # fmt: skip
    """A ready :class:`DiffusionRun` of ``preset``'s models and batch (for profiling)."""
    denoiser, reward = build_models(preset, *_device_and_dtype(None), options)
    config = step_config(preset, method, options, graphs)
    return new_run(denoiser, reward, config, masked_fraction=options.masked_fraction)


def _time_steps(run: DiffusionRun, warmup: int, timed: int) -> list[float]:
    cuda = run.canvas.is_cuda
    advance = run.graphed_step if run.use_graphs else run.step
    for step in range(warmup):
        advance(step)
    times = []
    for step in range(warmup, warmup + timed):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        advance(step)
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def bench_steps(
    preset: str,
    methods=("none", "entrgi", "aps", "expectation"),
    graph_modes=(False, True),
    options: StepOptions = StepOptions(),
    timed: int = 8,
    device: str | None = None,
) -> list[StepRow]:
    """ms per step of each method in each execution mode (graphs only on CUDA), one row each."""
    device, dtype = _device_and_dtype(device)
    denoiser, reward = build_models(preset, device, dtype, options)
    env = environment()
    layers = dict(denoiser_layers=denoiser.layers.describe(), reward_layers=reward.guidance_layers.describe())
    rows = []
    for graphs in graph_modes:
        if graphs and device.type != "cuda":
            continue
        for method in methods:
            config = step_config(preset, method, options, graphs)
            run = new_run(denoiser, reward, config, masked_fraction=options.masked_fraction)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            times = _time_steps(run, warmup=2 if graphs else 1, timed=min(timed, options.new_tokens - 2))
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
            rows.append(StepRow(**env, preset=preset, method=method, graphs=graphs, **asdict(options), **layers,
                                ms_per_step=statistics.median(times),
                                p20_ms=quantile(times, 0.2), p80_ms=quantile(times, 0.8), peak_gib=peak))  # fmt: skip
            del run
    unguided = {r.graphs: r.ms_per_step for r in rows if r.method == "none"}
    for r in rows:
        r.vs_unguided = r.ms_per_step / unguided[r.graphs] if r.graphs in unguided else None
    return rows


def format_steps(rows: list[StepRow]) -> str:
    head = (f"{'preset':<10} {'method':<12} {'graphs':<6} {'masked':>6} {'ms/step':>9} {'p20':>8} {'p80':>8} "
            f"{'peak GiB':>9} {'x unguided':>10}")  # fmt: skip
    presets = {r.preset: r for r in rows}  # one set of models per preset
    lines = [f"{name}: denoiser layers: {r.denoiser_layers}\n{name}: reward layers: {r.reward_layers}"
             for name, r in presets.items()]  # fmt: skip
    lines += [head, "-" * len(head)]
    for r in rows:
        peak = cell(r.peak_gib, "9.2f")
        ratio = cell(r.vs_unguided, "10.2f", missing="")
        lines.append(f"{r.preset:<10} {r.method:<12} {str(r.graphs):<6} {r.masked_fraction:6.2f} "
                     f"{r.ms_per_step:9.2f} {r.p20_ms:8.2f} "
                     f"{r.p80_ms:8.2f} {peak} {ratio}")  # fmt: skip
    return "\n".join(lines)
