"""Test helpers: float64 restatements of the op semantics, a χ² check, whether this machine
can compile, a check that CUDA-graph replay gives the eager run's results, and Chrome
trace events for the profile readers."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from entrgi import generate

# torch.compile's inductor backend builds C++ kernels on the CPU
CAN_COMPILE = torch.cuda.is_available() or shutil.which("g++") is not None
COMPILE_FLAGS = ["--compile-layers"] if CAN_COMPILE else []

# A fused forward that fits a module but fails its load-time check is an error in the modules that test
# the swaps, even where the command line relaxes pyproject's filter (bench/gpu_session.sh, so that on a GPU
# the other tests still run on stock layers and report what else they find)
SWAPS_MUST_REPRODUCE = pytest.mark.filterwarnings("error:.*did not reproduce the stock forward:UserWarning")


def filtered_law(x: torch.Tensor, tau: float, top_p: float, top_k: int) -> torch.Tensor:
    """Exact sampling law of one row: softmax(phi/tau) restricted to the published
    top-p-then-top-k kept set (ties at the boundary kept), renormalised. float64."""
    scaled = x.double() / tau
    probs = torch.softmax(scaled, dim=-1)
    order = sorted(range(len(scaled)), key=lambda v: -scaled[v].item())
    kept, mass = [], 0.0
    for rank, v in enumerate(order):
        if rank > 0 and top_p < 1.0 and mass > top_p:
            break
        if top_k and rank >= top_k:
            break
        kept.append(v)
        mass += probs[v].item()
    boundary = min(scaled[v].item() for v in kept)
    keep = scaled >= boundary
    law = torch.where(keep, probs, torch.zeros_like(probs))
    return law / law.sum()


def restated_forward(phi, table, tau):
    """soft (R, d), w (R,) and p (R, V) in float64."""
    x = phi.double()
    p = torch.softmax(x / tau, dim=-1)
    soft = p @ table.double()
    p1 = torch.softmax(x, dim=-1)
    plogp = torch.where(p1 > 0, p1 * torch.log(p1), torch.zeros_like(p1))
    w = -plogp.sum(-1) / math.log(x.shape[-1])
    return soft, w, p


def restated_grad(phi, table, tau, g):
    """dphi = (1/tau) p * (E g - <g, soft>), float64."""
    soft, _, p = restated_forward(phi, table, tau)
    eg = g.double() @ table.double().T
    return p * (eg - (g.double() * soft).sum(-1, keepdim=True)) / tau


def sum_p_log_p(p: torch.Tensor) -> torch.Tensor:
    """sum over the last dimension of p log p, with 0 log 0 = 0."""
    return torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(-1)


def chi2_critical(df: int, z: float = 3.7) -> float:
    """Wilson-Hilferty upper quantile of χ²(df); z = 3.7 is a 1e-4 false-alarm rate."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def assert_law(samples: torch.Tensor, law: torch.Tensor) -> None:
    """Every sample lies in the support, and the counts pass a χ² test against ``law``."""
    n = samples.numel()
    counts = torch.bincount(samples, minlength=law.numel()).double()
    support = law > 0
    assert counts[~support].sum() == 0, f"samples outside the kept set: {counts[~support]}"
    expected = law[support] * n
    stat = ((counts[support] - expected) ** 2 / expected).sum().item()
    df = int(support.sum()) - 1
    if df > 0:
        assert stat < chi2_critical(df), f"χ²={stat:.1f} exceeds the {df}-dof critical value"


def guided_reward_inputs(reward, rows: int, length: int, seed: int):
    """(rows, length, d) random mixes of the reward's table rows (like guided embeddings)
    in the table's dtype, requiring grad, and (rows, length) valid masks cut at random.
    A reward with target embeddings gets ``[mixed | soft]`` targets appended (the
    mixed one hard: the law's most likely token)."""
    g = torch.Generator().manual_seed(seed)
    table = reward.input_embeddings().detach()
    weights = torch.softmax(torch.randn(rows, length, table.shape[0], generator=g) * 3, dim=-1).to(table.device)
    embeds = weights @ table.float()
    if hasattr(reward, "target_embeddings"):
        targets = reward.target_embeddings().detach().float()
        embeds = torch.cat([embeds, targets[weights.argmax(-1)], weights @ targets], dim=-1)
    embeds = embeds.to(table.dtype)
    ends = torch.randint(0, length + 1, (rows,), generator=g)
    valid = torch.arange(length)[None, :] < ends[:, None]
    return embeds.requires_grad_(True), valid.to(table.device)


def reward_scores_and_grads(reward, context, embeds, valid):
    """Rewards (N,) and their summed gradient with respect to ``embeds``."""
    scores = reward.score_embeds(context, embeds, valid)
    (grad,) = torch.autograd.grad(scores.sum(), embeds)
    return scores, grad


def saved_activation_bytes(reward, context, embeds, valid) -> int:
    """Bytes of the distinct non-parameter tensors autograd keeps for the reward's backward."""
    from entrgi.lean import kept_bytes

    return kept_bytes(lambda: reward.score_embeds(context, embeds, valid), reward.model)


def assert_same_rewards(reference, candidate, embeds, valid, tol: float = 1e-5) -> None:
    """``reference`` and ``candidate`` ((reward, context) pairs) give the same rewards and
    gradients for ``embeds``; the gradient is not all zero."""
    want, want_grad = reward_scores_and_grads(*reference, embeds, valid)
    got, got_grad = reward_scores_and_grads(*candidate, embeds, valid)
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    torch.testing.assert_close(got_grad, want_grad, atol=tol, rtol=tol)
    assert want_grad.abs().sum() > 0


def filter_keys(raw: torch.Tensor, tau: float) -> torch.Tensor:
    """The kernels' kept-set keys restated: order-preserving integers of x / tau (fp32)
    or of the 16-bit logits themselves, with -0 == +0."""
    x = raw * torch.tensor(1.0 / tau) if raw.dtype == torch.float32 else raw  # the kernel's x / tau
    x = torch.where(x == 0, torch.zeros_like(x), x)
    width = 32 if x.dtype == torch.float32 else 16
    bits = x.view(torch.int32 if width == 32 else torch.int16).long()
    return (bits ^ ((bits >> (width - 1)) & (2 ** (width - 1) - 1))) + 2 ** (width - 1)


def graphed_runs_match_eager(prompts, denoiser, reward, calls: int = 1, **common) -> list[int]:
    """Generate once eagerly, then ``calls`` times with CUDA graphs (each must give the
    eager tokens and rewards); returns each graphed call's number of graph replays."""
    eager = generate(prompts, denoiser=denoiser, reward=reward, cuda_graphs=False, progress=False, **common)
    counts = []
    replay = torch.cuda.CUDAGraph.replay
    for _ in range(calls):
        replays = []
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch.cuda.CUDAGraph, "replay", lambda graph: replays.append(1) or replay(graph))
            graphed = generate(prompts, denoiser=denoiser, reward=reward, progress=False, **common)  # "auto"
        assert [r.response_ids for r in graphed] == [r.response_ids for r in eager]
        assert [r.history for r in graphed] == [r.history for r in eager]
        assert sum((r.rewards for r in graphed), []) == pytest.approx(sum((r.rewards for r in eager), []))
        counts.append(len(replays))
    return counts


def trace_event(cat: str, name: str, ts: float, dur: float, tid: int = 1, correlation: int | None = None) -> dict:
    """One complete ("X") event of a torch profiler's Chrome trace."""
    args = {} if correlation is None else {"correlation": correlation}
    return {"ph": "X", "cat": cat, "name": name, "pid": 1, "tid": tid, "ts": ts, "dur": dur, "args": args}
