"""The guided masked-diffusion sampler: EntRGi, APS, Expectation, best-of-K, unguided.

Static-shape design: one ``(B*K, P + G)`` token canvas per batch; every step works on
the whole ``(B*K, G)`` response block with a boolean mask of still-masked positions,
so no step has a data-dependent shape or reads a value back to the host. Host syncs
happen only after the last step (decoding, final scoring, the NaN report).

Decoding orders: Dream's schedule over the whole response, LLaDA's semi-autoregressive
blocks (a row's current block is its first block with a mask, computed on the device),
and Fast-dLLM's confidence threshold, which ends the run once every row is committed
(checked on the host every ``DONE_CHECK_EVERY`` steps).

Batches: each batch of ``prompts_per_batch`` prompts draws from its own generator,
seeded from (seed, batch index), so a batch's tokens do not depend on which other
batches run, in which process or in which order (resumed and multi-process runs
reproduce a single-process run).

CUDA graphs: the step index lives in a device tensor that the step itself advances,
so one captured graph per step kind (guided / unguided) replays every step. The
first step of each kind runs eagerly on a side stream (compiles kernels, lazy
inits), the second is captured, and replays follow; the generator is registered with
each graph, so replays draw the same random numbers as eager steps would. Runs are
kept in the denoiser's ``run_cache`` and refilled (``DiffusionRun.load``) by later
batches and ``generate`` calls of the same shapes, so their graphs are captured once.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch.profiler import record_function

from entrgi.attention import CAPTURABLE_ATTENTION, attention_implementation
from entrgi.config import GuidanceConfig
from entrgi.denoisers import Denoiser
from entrgi.guidance import GuidanceStep, optimize_logits
from entrgi.ops import entropy_confidence, sample_step
from entrgi.ops.validation import check_table_rows_range
from entrgi.rewards import Reward, VocabMapping, build_vocab_mapping
from entrgi.rewards.base import RewardContext, check_reward_shape, pad_id_lists
from entrgi.rewards.vocab import warn_if_sparse
from entrgi.schedule import (
    commit_counts,
    current_block,
    linear_counts,
    random_commits,
    select_commits,
    threshold_commits,
    timesteps,
)

DONE_CHECK_EVERY = 4  # threshold decoding: steps between host checks for a finished batch


@dataclass
class PromptResult:
    """K responses of one prompt and their rewards (scored on real tokens)."""

    prompt: str
    responses: list[str]
    rewards: list[float] | None
    method: str = "entrgi"
    response_ids: list[list[int]] = field(repr=False, default_factory=list)
    forward_passes: int = 0  # denoiser forward passes while this prompt still had masks
    # with ``output_history``: (steps run, K, G) response ids after each step (the mask id where still masked)
    history: list[list[list[int]]] | None = field(repr=False, default=None)

    @property
    def best_index(self) -> int:
        """Highest-reward sample; the first one for unguided ``none`` runs (no selection)."""
        if self.rewards is None or self.method == "none":
            return 0
        return max(range(len(self.rewards)), key=self.rewards.__getitem__)

    @property
    def best_response(self) -> str:
        return self.responses[self.best_index]

    @property
    def top1_reward(self) -> float | None:
        return None if self.rewards is None else self.rewards[self.best_index]

    @property
    def avg_reward(self) -> float | None:
        return None if self.rewards is None else sum(self.rewards) / len(self.rewards)


@dataclass
class GuidanceTable:
    """The reward's embedding tables seen from the denoiser's vocabulary, without a copy.

    ``weight`` (V_t, d) is the reward's own input embedding matrix (shared storage when
    both models are on one device); ``rows`` (V,) int32 is the reward row of each
    denoiser token (None when the vocabularies coincide), gathered by the guidance
    kernels. ``targets`` (V_t, d_t): the reward's ``target_embeddings()`` read through
    the same rows, or None when it has none. ``mapping`` reports how the vocabularies
    were matched (None when the rows were given directly).
    """

    weight: torch.Tensor
    rows: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    mapping: VocabMapping | None = None

    def __post_init__(self):
        if self.targets is not None and self.targets.shape[0] != self.weight.shape[0]:
            raise ValueError(f"the reward's target table has {self.targets.shape[0]} rows but its input table "
                             f"{self.weight.shape[0]}: both must be in the reward's vocabulary")  # fmt: skip
        if self.rows is not None:
            check_table_rows_range(self.rows, self.weight)

    @classmethod
    def between(cls, denoiser: Denoiser, reward: Reward) -> GuidanceTable:
        """The tables of ``reward`` on ``denoiser``'s device, rows matched by token text."""
        mapping = build_vocab_mapping(denoiser.tokenizer, reward.tokenizer, denoiser.vocab_size)
        warn_if_sparse(mapping)
        weight = reward.input_embeddings().detach().to(denoiser.device)
        targets = getattr(reward, "target_embeddings", None)
        targets = None if targets is None else targets().detach().to(denoiser.device)
        ids = mapping.ids
        same_vocabulary = ids.numel() == weight.shape[0] and torch.equal(ids, torch.arange(ids.numel()))
        rows = None if same_vocabulary else ids.to(device=denoiser.device, dtype=torch.int32)
        return cls(weight, rows, targets, mapping)


@dataclass(frozen=True)
class StepHooks:
    """Python callbacks at every denoising step, as Dream's ``generation_logits_hook_func``
    and ``generation_tokens_hook_func``. ``step`` is the step's index from 0 (an int).

    logits : ``(step, canvas, logits) -> logits`` right after the denoiser: ``canvas``
        (N, P + G) token ids, ``logits`` (N, G, V) float32 of the response block (Dream's
        shifted; with ``cfg_scale``, mixed). What it returns (same shape and dtype) is what
        guidance steers and the commit draws from, and what ``alg="entropy"`` scores.
    tokens : ``(step, canvas, logits) -> canvas`` after the commit, ``logits`` the ones the
        commit drew from; the canvas it returns (same shape and dtype) is the next step's
        (a mask id written back re-masks that position).

    Hooks run Python at every step, which a CUDA graph cannot replay: a hooked run
    denoises eagerly (``cuda_graphs=True`` raises).
    """

    logits: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    tokens: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    @property
    def active(self) -> bool:
        return self.logits is not None or self.tokens is not None

    def hooked_logits(self, step: int, canvas: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        given = logits.float()
        return _hook_output("logits_hook", self.logits(step, canvas, given), given)

    def hooked_canvas(self, step: int, canvas: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return _hook_output("tokens_hook", self.tokens(step, canvas, logits), canvas)


def _hook_output(name: str, output, given: torch.Tensor) -> torch.Tensor:
    if isinstance(output, torch.Tensor) and (output.shape, output.dtype, output.device) == (
        given.shape, given.dtype, given.device,
    ):  # fmt: skip
        return output
    got = (f"shape {tuple(output.shape)}, {output.dtype} on {output.device}" if isinstance(output, torch.Tensor)
           else type(output).__name__)  # fmt: skip
    raise ValueError(f"{name} must return a tensor like the one it was given (shape {tuple(given.shape)}, "
                     f"{given.dtype} on {given.device}), got {got}")  # fmt: skip


class DiffusionRun:
    """One batch of prompts being denoised: static buffers plus the per-step update.

    ``canvas`` (N, P + G) holds left-padded prompts and the response block;
    ``attention`` (N, P + G) bool marks real tokens. Rows are K contiguous copies of
    each prompt. ``history`` (steps, N, G), with ``output_history``: the response block
    after each step, written on the device (row ``step_index``). ``hooks``: the
    :class:`StepHooks` the next :meth:`run` calls (set per batch).
    """

    def __init__(
        self,
        denoiser: Denoiser,
        prompt_ids: Sequence[Sequence[int]],
        config: GuidanceConfig,
        generator: torch.Generator,
        table: GuidanceTable | None = None,
        reward: Reward | None = None,
        reward_context: RewardContext | None = None,
    ):
        self.denoiser, self.config, self.generator = denoiser, config, generator
        self.table, self.reward, self.reward_context = table, reward, reward_context
        device = denoiser.device
        self.canvas, self.attention, self.prompt_tokens = (x.to(device) for x in self._batch_canvas(prompt_ids))
        n = self.canvas.shape[0]
        self.prompt_length = self.canvas.shape[1] - config.max_new_tokens
        self.forward_passes = torch.zeros(n, dtype=torch.long, device=device)
        self.end_ids = torch.tensor(denoiser.end_token_ids, dtype=torch.long, device=device)
        self.schedule = timesteps(config.steps, config.eps, device=device)
        self.step_index = torch.zeros(1, dtype=torch.long, device=device)
        self.non_finite = torch.zeros((), dtype=torch.bool, device=device)
        self.history = None
        if config.output_history:
            self.history = torch.empty((config.most_steps, *self.response.shape), dtype=torch.long, device=device)
        self.hooks = StepHooks()
        self.use_graphs = use_cuda_graphs(config, denoiser, reward)
        self._graphs: dict[bool, torch.cuda.CUDAGraph] = {}
        self._warmed: set[bool] = set()
        self.guidance = GuidanceStep(config.method, config.guidance_steps, config.lr, config.reward_temperature,
                                     config.temperature, config.top_p, config.top_k, config.backend,
                                     config.adam_moments)  # fmt: skip

    def _batch_canvas(self, prompt_ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, ...]:
        """Host tensors (N, P + G): canvas ids, real-token mask, prompt-token mask."""
        rows = [ids for ids in prompt_ids for _ in range(self.config.num_samples)]
        prompt, prompt_valid = pad_id_lists(rows, "left")
        n, g = len(rows), self.config.max_new_tokens
        response = torch.full((n, g), self.denoiser.mask_token_id, dtype=torch.long)
        canvas = torch.cat([prompt, response], dim=1)
        attention = torch.cat([prompt_valid, torch.ones(n, g, dtype=torch.bool)], dim=1)
        prompt_tokens = torch.cat([prompt_valid, torch.zeros(n, g, dtype=torch.bool)], dim=1)
        return canvas, attention, prompt_tokens

    def load(self, prompt_ids: Sequence[Sequence[int]], reward_context: RewardContext | None, seed: int) -> None:
        """Start a new batch of the same shapes in these buffers (see :func:`batch_shapes`):
        captured graphs replay on it as they are. The generator is reseeded with ``seed``."""
        for buffer, fresh in zip((self.canvas, self.attention, self.prompt_tokens), self._batch_canvas(prompt_ids)):
            if buffer.shape != fresh.shape:
                raise ValueError(f"batch canvas {tuple(fresh.shape)} does not fit this run's {tuple(buffer.shape)}")
            buffer.copy_(fresh)
        if reward_context is not None:
            for buffer, fresh in zip(self.reward_context.tensors(), reward_context.tensors()):
                buffer.copy_(fresh)
        for counter in (self.forward_passes, self.step_index, self.non_finite):
            counter.zero_()
        self.generator.manual_seed(seed)

    @property
    def response(self) -> torch.Tensor:
        """(N, G) view of the response block of the canvas."""
        return self.canvas[:, self.prompt_length :]

    def guided_at(self, step: int) -> bool:
        return self.config.guided and step % self.config.guide_every == 0

    def step(self, step: int) -> None:
        """Denoise once, eagerly: logits, optional guidance, sample, commit. No host
        syncs. ``step`` picks guided or not; the schedule reads ``step_index``."""
        self._step(self.guided_at(step), step)

    def _step(self, guided: bool, step: int) -> None:
        cfg = self.config
        masked = self.response == self.denoiser.mask_token_id
        self.forward_passes += masked.any(-1)
        with torch.no_grad(), record_function("entrgi.denoiser_forward"):
            if guided and cfg.adam_moments == "recompute":  # Adam replays from the logits as the denoiser gave them
                initial = self.denoiser_logits(step).contiguous()
                phi = initial.to(torch.float32, copy=True)
            elif guided:
                initial, phi = None, self.response_logits(step)
            else:  # only the commit reads them: the model's dtype, no float32 copy of (N, G, V)
                initial, phi = None, self.denoiser_logits(step)
        in_block = masked if cfg.block_length is None else masked & current_block(masked, cfg.block_length)
        initial_confidence = None
        if guided:
            if cfg.commit_rule == "entropy":  # the commit scores the un-steered logits: before they move
                with record_function("entrgi.entropy_confidence"):
                    initial_confidence = entropy_confidence(phi, temperature=cfg.temperature, backend=cfg.backend,
                                                            active=in_block)  # fmt: skip
            steered = in_block if cfg.guidance_scope == "block" and cfg.block_length is not None else None
            self.optimize(phi, masked, steered, initial)
            del initial
        with record_function("entrgi.commit"):
            self.commit(phi, in_block, initial_confidence)
        if self.hooks.tokens is not None:
            self.canvas.copy_(self.hooks.hooked_canvas(step, self.canvas, phi))
        if self.history is not None:
            self.history.index_copy_(0, self.step_index, self.response.unsqueeze(0))
        self.step_index += 1

    def response_logits(self, step: int = 0) -> torch.Tensor:
        """(N, G, V) contiguous float32 logits of the response block at ``step`` (a fresh tensor)."""
        logits = self.denoiser_logits(step)
        fresh = self.config.cfg_scale != 0 and self.hooks.logits is None
        return logits.to(torch.float32, copy=not fresh, memory_format=torch.contiguous_format)

    def denoiser_logits(self, step: int = 0) -> torch.Tensor:
        """(N, G, V) logits of the response block at ``step``: what the logits hook returns
        (float32) when one is set, else the model's (:meth:`model_logits`)."""
        logits = self.model_logits()
        return logits if self.hooks.logits is None else self.hooks.hooked_logits(step, self.canvas, logits)

    def model_logits(self) -> torch.Tensor:
        """(N, G, V) logits of the response block as the denoiser returns them (its
        dtype, possibly a strided view); with ``cfg_scale`` the float32 classifier-free
        mix ``un + (s + 1)(cond - un)``, ``un`` seeing the prompt masked (a fresh tensor)."""
        scale, width = self.config.cfg_scale, self.config.max_new_tokens
        if scale == 0:
            return self.denoiser.logits(self.canvas, self.attention, keep_last=width)
        unconditional = self.canvas.masked_fill(self.prompt_tokens, self.denoiser.mask_token_id)
        both = self.denoiser.logits(torch.cat([self.canvas, unconditional]), self.attention.repeat(2, 1), width)
        cond, un = both.float().chunk(2)
        return un + (scale + 1) * (cond - un)

    def graphed_step(self, step: int) -> None:
        """:meth:`step` through a CUDA graph of its kind (warm-up, capture, then replay)."""
        guided = self.guided_at(step)
        graph = self._graphs.get(guided)
        if graph is None and guided not in self._warmed:
            self._warmed.add(guided)
            side = torch.cuda.Stream(self.canvas.device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._step(guided, step)
            torch.cuda.current_stream().wait_stream(side)
            return
        if graph is None:
            graph = torch.cuda.CUDAGraph()
            graph.register_generator_state(self.generator)
            try:
                with torch.cuda.graph(graph, pool=_graph_pool(self.canvas.device)):
                    self._step(guided, step)
            except RuntimeError as error:  # CUDA's own message names neither the step nor a way out
                raise RuntimeError(
                    f"capturing the {'guided' if guided else 'unguided'} denoising step in a CUDA graph failed: "
                    "code in the step reads a value back to the host (.item(), a Python branch on a tensor, a "
                    "data-dependent shape; e.g. in a custom reward or model code). Make it sync-free or pass "
                    "cuda_graphs=False"
                ) from error
            self._graphs[guided] = graph
        graph.replay()

    def commit(self, phi: torch.Tensor, eligible: torch.Tensor, confidence: torch.Tensor | None = None) -> None:
        """Sample the step's tokens from phi and write the chosen ``eligible`` positions
        (the still-masked positions of each row's current block). ``confidence`` (N, G):
        the commit confidence when the caller computed it before phi was optimised
        (``alg`` entropy scores the un-steered logits); None computes it from phi."""
        cfg, rule = self.config, self.config.commit_rule
        top = phi.amax()  # NaN if any entry is, else +inf if any is: one read of phi, no (N, V) mask
        self.non_finite |= torch.isnan(top) | torch.isposinf(top)
        drawn = sample_step(
            phi, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
            alg="origin" if confidence is not None or rule in ("origin", "random") else rule,
            generator=self.generator, backend=cfg.backend, check_values=False, active=eligible,
        )  # fmt: skip
        if rule == "origin":
            commit = random_commits(eligible, self.schedule, self.step_index, self.generator)
        else:
            if rule == "random":  # LLaDA's random remasking: uniform scores
                confidence = torch.rand(eligible.shape, device=eligible.device, generator=self.generator)
            elif confidence is None:
                confidence = drawn.confidence
            if cfg.deprioritize_eos:
                confidence = confidence.masked_fill(torch.isin(drawn.tokens, self.end_ids), -torch.inf)
            if cfg.confidence_threshold is not None:
                commit = threshold_commits(confidence, eligible, cfg.confidence_threshold)
            else:
                if cfg.block_length is None:
                    counts = commit_counts(eligible, self.schedule, self.step_index)
                else:
                    counts = linear_counts(eligible, cfg.steps // cfg.num_blocks, self.step_index)
                commit = select_commits(confidence, eligible, counts, cfg.alg_temp, self.generator)
        self.response.copy_(torch.where(commit, drawn.tokens, self.response))

    def optimize(self, phi: torch.Tensor, masked: torch.Tensor, steered: torch.Tensor | None = None,
                 initial: torch.Tensor | None = None) -> None:  # fmt: skip
        """M Adam steps, in place, on the contiguous float32 logits phi (N, G, V) that
        raise the reward; only masked rows move (only ``steered`` rows when given; the
        reward still sees every masked row). ``initial``: phi's values before the steps
        in any dtype (see :func:`~entrgi.guidance.optimize_logits`)."""
        optimize_logits(phi, masked, self.response, self.table.weight, self.reward, self.reward_context,
                        self.end_ids, self.guidance, self.generator, steered, in_place=True,
                        table_rows=self.table.rows, target_table=self.table.targets, initial=initial)  # fmt: skip

    def run(self, progress: bool = False) -> None:
        """Denoise until the response is committed: ``steps`` steps, or with a
        confidence threshold until no mask is left (at most ``max_new_tokens`` steps)."""
        cfg = self.config
        until_done = cfg.confidence_threshold is not None
        steps = range(cfg.most_steps)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc=f"denoising ({cfg.method})", leave=False)
        advance = self.graphed_step if self.use_graphs and not self.hooks.active else self.step
        for step in steps:
            advance(step)
            if until_done and (step + 1) % DONE_CHECK_EVERY == 0 and self.finished():
                break
        if self.non_finite.item():
            raise ValueError(
                "non-finite (NaN or +inf) logits appeared during denoising; check the models' dtype and inputs"
            )

    def finished(self) -> bool:
        """Whether every response position is committed (a host sync)."""
        return not bool((self.response == self.denoiser.mask_token_id).any())


def _check_inputs(prompts, denoiser, reward, config: GuidanceConfig) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompts[{i}] must be a str, got {type(prompt).__name__}")
    if not isinstance(denoiser, Denoiser):
        raise TypeError(f"denoiser must be an entrgi.Denoiser, got {type(denoiser).__name__}")
    if config.needs_reward and reward is None:
        raise ValueError(f"method {config.method!r} needs a reward (reward=, on the command line --reward-model)")
    use_cuda_graphs(config, denoiser, reward)  # raises for cuda_graphs=True where no graph can be captured
    return prompts


def cuda_graph_blockers(denoiser: Denoiser, reward: Reward | None, config: GuidanceConfig) -> list[str]:
    """Why a denoising step could not be captured: each model the step runs whose
    attention implementation reads its mask back to the host (LLaDA's own code, given
    the padding as an attention bias, never does; the reward runs in the step only when
    guided)."""
    models = [] if denoiser.kind == "llada" else [("denoiser", denoiser.model)]
    if config.guided and getattr(reward, "model", None) is not None:
        models.append(("reward", reward.model))
    return [
        f"the {role} ({type(model).__name__}) uses {attention_implementation(model)!r} attention"
        for role, model in models
        if attention_implementation(model) not in CAPTURABLE_ATTENTION
    ]


def use_cuda_graphs(config: GuidanceConfig, denoiser: Denoiser, reward: Reward | None) -> bool:
    """Whether steps replay CUDA graphs: ``config.use_cuda_graphs``, unless a model in
    the step cannot be captured (:func:`cuda_graph_blockers`); then ``auto`` runs eager
    steps with a warning and ``cuda_graphs=True`` raises."""
    if not config.use_cuda_graphs(denoiser.device):
        return False
    blockers = cuda_graph_blockers(denoiser, reward, config)
    if not blockers:
        return True
    reason = (f"{'; '.join(blockers)}, which reads the padding mask back to the host where a CUDA graph "
              f"cannot capture it. Load it with attn_implementation='sdpa'")  # fmt: skip
    if config.cuda_graphs is True:
        raise ValueError(f"cuda_graphs=True: {reason}, or pass cuda_graphs=False")
    warnings.warn(f"denoising without CUDA graphs: {reason} for graph replay")
    return False


def batch_shapes(prompt_ids: Sequence[Sequence[int]], num_samples: int, context: RewardContext | None) -> tuple:
    """What a run's buffers and graphs are sized by: rows, padded prompt length and the
    reward context's shapes."""
    rows, prompt_length = len(prompt_ids) * num_samples, max(len(ids) for ids in prompt_ids)
    if context is None:
        return rows, prompt_length
    return rows, prompt_length, tuple(tuple(t.shape) for t in context.tensors())


def _graph_pool(device: torch.device):
    """One CUDA-graph memory pool per device, shared by every run's graphs: they replay
    one at a time on one stream and keep no outputs in the pool (all state lives in
    buffers allocated outside capture), so their temporaries may share memory. The pool
    is a ``MemPool`` held here: a bare ``graph_pool_handle()`` dies with the last graph
    captured in it, and capturing into it again then fails inside the allocator."""
    if device not in _GRAPH_POOLS:
        with torch.cuda.device(device):
            _GRAPH_POOLS[device] = torch.cuda.MemPool()
    return _GRAPH_POOLS[device].id


_GRAPH_POOLS: dict[torch.device, torch.cuda.MemPool] = {}


def batch_seed(seed: int, batch_index: int) -> int:
    """The seed of batch ``batch_index``'s generator: ``seed`` for the first batch,
    distinct and stable for the others."""
    return (seed + 1_000_003 * batch_index) % (2**63)


class BatchedGeneration:
    """Prompts split into fixed batches of ``config.prompts_per_batch``, each generated
    on its own generator (:func:`batch_seed`), so any subset of batches can run, in any
    order and any process, with the tokens of a single :func:`generate` call.

    Validates the inputs and encodes every prompt once. Runs are taken from the
    denoiser's ``run_cache`` when one of the same shapes and settings exists (its CUDA
    graphs replay the new batch), else built and stored there.
    """

    def __init__(self, prompts, denoiser: Denoiser, reward: Reward | None, config: GuidanceConfig,
                 hooks: StepHooks = StepHooks()):  # fmt: skip
        self.prompts = _check_inputs(prompts, denoiser, reward, config)
        if hooks.active and config.cuda_graphs is True:
            raise ValueError("cuda_graphs=True: step hooks run Python at every step, which a CUDA graph cannot "
                             "replay; pass cuda_graphs='auto' (a hooked run denoises eagerly) or False")  # fmt: skip
        self.denoiser, self.reward, self.config, self.hooks = denoiser, reward, config, hooks
        self.encoded = denoiser.encode_prompts(self.prompts, chat_template=config.chat_template)
        longest = max(len(ids) for ids in self.encoded)
        if denoiser.max_length is not None and longest + config.max_new_tokens > denoiser.max_length:
            raise ValueError(
                f"prompt ({longest} tokens) + max_new_tokens ({config.max_new_tokens}) exceeds the "
                f"denoiser's context of {denoiser.max_length} positions"
            )

    @functools.cached_property
    def table(self) -> GuidanceTable | None:
        """Built on first use: batches that reuse a cached run use the run's own table."""
        return GuidanceTable.between(self.denoiser, self.reward) if self.config.guided else None

    @property
    def num_batches(self) -> int:
        return -(-len(self.prompts) // self.config.prompts_per_batch)

    def batch_range(self, batch_index: int) -> range:
        """Indices of the prompts in batch ``batch_index``."""
        per_batch = self.config.prompts_per_batch
        return range(batch_index * per_batch, min(len(self.prompts), (batch_index + 1) * per_batch))

    def run_batch(self, batch_index: int, progress: bool = False) -> list[PromptResult]:
        """Denoise one batch; one :class:`PromptResult` per prompt, in order."""
        if not 0 <= batch_index < self.num_batches:
            raise ValueError(f"batch_index must be in [0, {self.num_batches}), got {batch_index}")
        indices = self.batch_range(batch_index)
        batch = [self.prompts[i] for i in indices]
        config, device = self.config, self.denoiser.device
        seed = batch_seed(config.seed, batch_index)
        prompt_ids = [self.encoded[i] for i in indices]
        context = self.reward.prepare(batch, config.num_samples) if config.guided else None

        def new_run() -> DiffusionRun:
            generator = torch.Generator(device).manual_seed(seed)
            return DiffusionRun(self.denoiser, prompt_ids, config, generator, self.table, self.reward, context)

        key = (id(self.reward), config.replace(seed=0), batch_shapes(prompt_ids, config.num_samples, context))
        run, reused = self.denoiser.run_cache.get_or_build(key, new_run)
        if reused:
            run.load(prompt_ids, context, seed)
        run.hooks = self.hooks
        run.run(progress=progress)
        return _collect(batch, run, self.denoiser, self.reward, config)


def generate(
    prompts: str | Sequence[str],
    *,
    denoiser: Denoiser,
    reward: Reward | None = None,
    config: GuidanceConfig | None = None,
    progress: bool = True,
    logits_hook: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    tokens_hook: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    **overrides,
) -> list[PromptResult]:
    """Sample ``config.num_samples`` responses per prompt, guided by ``reward``.

    Any :class:`GuidanceConfig` field can be overridden by keyword. ``logits_hook`` and
    ``tokens_hook``: Dream-style callbacks at every step (:class:`StepHooks`). Returns
    one :class:`PromptResult` per prompt, in order; ``rewards`` is None without a reward.
    """
    config = (config or GuidanceConfig()).replace(**overrides)
    job = BatchedGeneration(prompts, denoiser, reward, config, StepHooks(logits_hook, tokens_hook))
    return [result for index in range(job.num_batches) for result in job.run_batch(index, progress)]


def _collect(prompts, run: DiffusionRun, denoiser, reward, config) -> list[PromptResult]:
    k = config.num_samples
    ids = run.response.tolist()
    passes = run.forward_passes.view(-1, k).amax(-1).tolist()
    history = [None] * len(prompts)
    if run.history is not None:
        steps_run = int(run.step_index)  # threshold decoding may end before the last row
        history = run.history[:steps_run].view(steps_run, len(prompts), k, -1).transpose(0, 1).tolist()
    texts = [denoiser.decode(row) for row in ids]
    rewards = None
    if reward is not None:
        repeated = [p for p in prompts for _ in range(k)]
        scores = reward.score_texts(repeated, texts)
        check_reward_shape("score_texts", scores, len(texts))
        rewards = scores.tolist()
    return [
        PromptResult(
            prompt=p,
            responses=texts[i * k : (i + 1) * k],
            rewards=None if rewards is None else rewards[i * k : (i + 1) * k],
            method=config.method,
            response_ids=ids[i * k : (i + 1) * k],
            forward_passes=passes[i],
            history=history[i],
        )
        for i, p in enumerate(prompts)
    ]
