"""Gumbel-max sampling of the filtered law, and the step's commit confidences.

x ~ softmax(filter(phi / tau)) is drawn as argmax over kept tokens of
x_v / tau + G_v, with G_v = -log E_v, E_v = -log u_v ~ Exp(1) and u_v from
Philox keyed by (seed + row, absolute token id): no noise tensor is stored, and the
draw does not depend on block sizes. Two ways to the filtered law:
- ``rejection_sample``: draw from the full law and accept iff the draw is in the kept
  set (a second pass counts the mass and number of tokens above it); no threshold. Its
  draws run Gumbel-max as an exponential race (the same draw for the same u, one log
  per token and draw instead of two).
- ``sample_filtered``: Gumbel-max restricted to a precomputed kept-set threshold
  (``threshold.py``), gathering what the step's commit confidence needs: the
  filtered law's log-normaliser and its two largest logits.
Every pass over phi splits the vocabulary across programs (``launch.vocab_chunks``).
Rows marked in ``skip`` are not read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from entrgi_kernels.launch import INTERPRET
from entrgi_kernels.row_stats import (
    _LOG2E,
    ROW_WARPS,
    SoftmaxNorm,
    _first_argmax,
    _load_norm,
    _load_tile,
    _row_is_active,
    _tempered_probs,
    row_geometry,
)
from entrgi_kernels.threshold import _filter_key, _filter_value

_MIN_UNIFORM = tl.constexpr(4.7e-10)
# Tile width of the rejection sampler's two passes, which keep four draws' accumulators
# per token: at 1,024 tokens, half the per-row tile, a thread holds four tokens, not
# eight; with one register layout through its loop the draw pass then needs 64
# registers on sm_90 (triton 3.6), not 159: four 8-warp blocks share an SM instead of
# one (bench/kernel_resources.py, RESULTS.md).
DRAW_BLOCK_V = 32 if INTERPRET else 1024


@triton.jit
def _exponential(u):
    """Exp(1) noise -log u from uniforms u in [0, 1) (tl.rand's, which step by 2^-31
    near 0 and end at 1 - 2^-23): in [1.2e-7, 21.5] with u clamped to 4.7e-10, so a
    Gumbel value -log E lies in [-3.1, 15.9] (the reference's float32 draws: up to 16.6)."""
    return -tl.log(tl.maximum(u, _MIN_UNIFORM))


@triton.jit
def _two_largest(top1, top2):
    """The largest and second largest of a multiset given per lane as (largest, second
    largest): ties count twice, so equal maxima in two lanes give first == second."""
    lanes = tl.arange(0, top1.shape[0])
    first = tl.max(top1, 0)
    first_lane = tl.min(tl.where(top1 == first, lanes, top1.shape[0]), 0)
    return first, tl.maximum(tl.max(top2, 0), tl.max(tl.where(lanes == first_lane, -float("inf"), top1), 0))


@triton.jit
def _kept_sample_partial_kernel(
    phi_ptr,  # (N, V) logits sampled from
    key_ptr,  # (N,) int64 kept-set key thresholds
    seed_ptr,  # (1,) int64 Philox seed (a device tensor, so graphs can replay fresh draws)
    skip_ptr,  # (N,) int32: rows != 0 are not read (SKIP)
    part_ptr,  # (N, S, 5) fp32 out per chunk, of kept x / tau: best x + Gumbel noise, max m,
    #            sum e^(x - m), largest, second largest
    best_idx_ptr,  # (N, S) int32 out: token of the chunk's best noisy score
    stride_phi,
    V,
    S,
    chunk,  # vocabulary entries per split, a multiple of BLOCK_V
    inv_tau,
    BLOCK_V: tl.constexpr,
    SKIP: tl.constexpr,
):
    """One (row, chunk) of the Gumbel-max draw over kept tokens and of the kept law's
    log-normaliser and two largest logits; per-lane accumulators, one cross-lane
    reduction (the tile maximum) per tile."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    if _row_is_active(skip_ptr, row, SKIP):
        base = phi_ptr + row * stride_phi
        threshold = tl.load(key_ptr + row)
        seed = tl.load(seed_ptr) + row
        best = tl.full((BLOCK_V,), -float("inf"), tl.float32)
        best_idx = tl.zeros((BLOCK_V,), tl.int32)
        m = -float("inf")
        s = tl.zeros((BLOCK_V,), tl.float32)
        top1 = tl.full((BLOCK_V,), -float("inf"), tl.float32)
        top2 = tl.full((BLOCK_V,), -float("inf"), tl.float32)
        v_start = split * chunk
        v_end = tl.minimum(v_start + chunk, V)
        ahead = _load_tile(base, v_start, v_end, BLOCK_V)
        for start in range(v_start, v_end, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_row = cols < V
            raw = ahead
            ahead = _load_tile(base, start + BLOCK_V, v_end, BLOCK_V)
            x = raw.to(tl.float32) * inv_tau
            kept = in_row & (_filter_key(raw, inv_tau) >= threshold) & (x > -float("inf"))
            score = tl.where(kept, x - tl.log(_exponential(tl.rand(seed, cols))), -float("inf"))
            better = score > best  # strict: a lane keeps its first maximum
            best_idx = tl.where(better, cols, best_idx)
            best = tl.where(better, score, best)
            xk = tl.where(kept, x, -float("inf"))
            m_new = tl.maximum(m, tl.max(xk, 0))
            safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            s = s * tl.exp(m - safe) + tl.exp(xk - safe)
            m = m_new
            top2 = tl.maximum(top2, tl.minimum(top1, xk))
            top1 = tl.maximum(top1, xk)
        top, top_idx = _first_argmax(best, best_idx, V)
        first, second = _two_largest(top1, top2)
        part = part_ptr + (row * S + split) * 5
        tl.store(part, top)
        tl.store(part + 1, m)
        tl.store(part + 2, tl.sum(s, 0))
        tl.store(part + 3, first)
        tl.store(part + 4, second)
        tl.store(best_idx_ptr + row * S + split, top_idx)


@triton.jit
def _kept_sample_combine_kernel(
    part_ptr,  # (N, S, 5) fp32: the chunks' partials (see the partial kernel)
    best_idx_ptr,  # (N, S) int32
    tokens_ptr,  # (N,) int64 out: sampled token
    lse_kept_shifted_ptr,  # (N,) fp32 out: logsumexp of x / tau - top1 over kept tokens
    top1_ptr,  # (N,) fp32 out: largest kept x / tau
    top2_ptr,  # (N,) fp32 out: second largest kept x / tau (-inf if none)
    skip_ptr,  # (N,) int32: rows != 0 are left unwritten (SKIP)
    S,
    V,
    BLOCK_S: tl.constexpr,
    SKIP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if _row_is_active(skip_ptr, row, SKIP):
        splits = tl.arange(0, BLOCK_S)
        ok = splits < S
        part = part_ptr + (row * S + splits) * 5
        best = tl.load(part, mask=ok, other=-float("inf"))
        _, token = _first_argmax(best, tl.load(best_idx_ptr + row * S + splits, mask=ok, other=V), V)
        m = tl.load(part + 1, mask=ok, other=-float("inf"))
        top = tl.max(m, 0)
        safe = tl.where(top == -float("inf"), 0.0, top)
        total = tl.sum(tl.load(part + 2, mask=ok, other=0.0) * tl.exp(m - safe), 0)
        first, second = _two_largest(
            tl.load(part + 3, mask=ok, other=-float("inf")), tl.load(part + 4, mask=ok, other=-float("inf"))
        )
        tl.store(tokens_ptr + row, token.to(tl.int64))
        tl.store(lse_kept_shifted_ptr + row, tl.log(total))  # safe == first: no ulp(first) rounding
        tl.store(top1_ptr + row, first)
        tl.store(top2_ptr + row, second)


def sample_filtered(
    phi: torch.Tensor,
    keys: torch.Tensor,
    seed: torch.Tensor,
    temperature: float,
    skip: torch.Tensor | None = None,
    tokens: torch.Tensor | None = None,
    splits: int | None = None,
    block_v: int | None = None,
) -> dict[str, torch.Tensor]:
    """Draw one token per row from the kept set ``_filter_key(x) >= keys``; returns
    tokens (N,) int64 and, of the kept law over x / tau (x / tau computed as
    ``x.float() * float32(1 / tau)``), top1 and top2 (the two largest) and
    lse_kept_shifted = logsumexp(kept - top1) (N,) fp32: probabilities read as
    exp((x / tau - top1) - lse_kept_shifted) stay exact to ~1e-7 even where |x / tau| is
    large.
    Rows where ``skip`` (N,) int32 is nonzero are left as they are in ``tokens`` (0 when
    not given) and unwritten elsewhere. Two launches: (row, vocabulary chunk) partials,
    then a fixed-order combine per row."""
    n, vocab = phi.shape
    out = dict(
        tokens=tokens if tokens is not None else torch.zeros(n, device=phi.device, dtype=torch.int64),
        lse_kept_shifted=torch.empty(n, device=phi.device, dtype=torch.float32),
        top1=torch.empty(n, device=phi.device, dtype=torch.float32),
        top2=torch.empty(n, device=phi.device, dtype=torch.float32),
    )
    block, splits, chunk = row_geometry(phi, splits, block_v)
    part = torch.empty(n, splits, 5, device=phi.device, dtype=torch.float32)
    best_idx = torch.empty(n, splits, device=phi.device, dtype=torch.int32)
    skip_arg = keys if skip is None else skip
    _kept_sample_partial_kernel[(n, splits)](
        phi, keys, seed, skip_arg, part, best_idx, phi.stride(0), vocab, splits, chunk, 1.0 / temperature,
        BLOCK_V=block, SKIP=skip is not None, num_warps=ROW_WARPS,
    )  # fmt: skip
    _kept_sample_combine_kernel[(n,)](
        part, best_idx, out["tokens"], out["lse_kept_shifted"], out["top1"], out["top2"], skip_arg, splits, vocab,
        BLOCK_S=triton.next_power_of_2(splits), SKIP=skip is not None,
    )  # fmt: skip
    return out


@triton.jit
def _race_step(first, first_idx, u, inv_weight, cols):
    """One draw's per-lane first arrival, given uniforms ``u``: token v arrives at
    E_v / q_v with E_v = ``_exponential(u_v)`` and q_v = exp((x_v - max) / tau); the
    first arrival is the Gumbel-max draw argmax x_v / tau - log E_v, one log per token
    and draw instead of two. A lane keeps its first minimum."""
    arrival = _exponential(u) * inv_weight
    earlier = arrival < first
    return tl.where(earlier, arrival, first), tl.where(earlier, cols, first_idx)


@triton.jit
def _store_first_arrival(best_ptr, best_idx_ptr, slot, first, first_idx, V):
    """A chunk's first arrival of one draw, stored as its score -arrival (-inf: none)."""
    top, top_idx = _first_argmax(-first, first_idx, V)
    tl.store(best_ptr + slot, top)
    tl.store(best_idx_ptr + slot, top_idx)


@triton.jit
def _race_partial_kernel(
    phi_ptr,  # (N, V) logits
    row_max_ptr,  # (N,) fp32: max(x)
    seed_ptr,  # (1,) int64 Philox seed
    skip_ptr,  # (N,) int32: rows != 0 are not read (SKIP)
    best_ptr,  # (N, S, DRAWS) fp32 out: minus the chunk's first arrival time, per draw
    best_idx_ptr,  # (N, S, DRAWS) int32 out: its first index
    stride_phi,
    V,
    S,
    chunk,  # vocabulary entries per split, a multiple of BLOCK_V
    inv_tau,
    DRAWS: tl.constexpr,  # 1 or 4
    BLOCK_V: tl.constexpr,
    SKIP: tl.constexpr,
):
    """One (row, chunk) of DRAWS independent draws from the full tempered law, each an
    exponential race (``_race_step``) on uniforms from one Philox call per token (for a
    token that can arrive, draw 0's is ``tl.rand(seed, v)``, as in the kept-law draw);
    each draw keeps its own per-lane accumulators, so the four never leave their
    registers."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    if _row_is_active(skip_ptr, row, SKIP):
        base = phi_ptr + row * stride_phi
        seed = tl.load(seed_ptr) + row
        row_max = tl.load(row_max_ptr + row)
        scale = inv_tau * _LOG2E
        first0 = tl.full((BLOCK_V,), float("inf"), tl.float32)
        first1, first2, first3 = first0, first0, first0
        idx0 = tl.zeros((BLOCK_V,), tl.int32)
        idx1, idx2, idx3 = idx0, idx0, idx0
        v_start = split * chunk
        v_end = tl.minimum(v_start + chunk, V)
        ahead = _load_tile(base, v_start, v_end, BLOCK_V)
        for start in range(v_start, v_end, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            raw = ahead
            ahead = _load_tile(base, start + BLOCK_V, v_end, BLOCK_V)
            inv_weight = tl.exp2((row_max - raw.to(tl.float32)) * scale)  # 1 / q_v in [1, inf]
            # Noise keyed through the loaded logits is computed in the load's register
            # layout; keyed by cols alone, Triton computed it in another and moved every
            # draw's arrivals through shared memory (four layout conversions with barriers
            # per tile). Tokens whose 1 / q_v is inf never arrive, whatever their noise.
            noise_keys = tl.where(inv_weight < float("inf"), cols, 0)
            if DRAWS == 1:
                first0, idx0 = _race_step(first0, idx0, tl.rand(seed, noise_keys), inv_weight, cols)
            else:
                u0, u1, u2, u3 = tl.rand4x(seed, noise_keys)
                first0, idx0 = _race_step(first0, idx0, u0, inv_weight, cols)
                first1, idx1 = _race_step(first1, idx1, u1, inv_weight, cols)
                first2, idx2 = _race_step(first2, idx2, u2, inv_weight, cols)
                first3, idx3 = _race_step(first3, idx3, u3, inv_weight, cols)
        slot = (row * S + split) * DRAWS
        _store_first_arrival(best_ptr, best_idx_ptr, slot, first0, idx0, V)
        if DRAWS == 4:
            _store_first_arrival(best_ptr, best_idx_ptr, slot + 1, first1, idx1, V)
            _store_first_arrival(best_ptr, best_idx_ptr, slot + 2, first2, idx2, V)
            _store_first_arrival(best_ptr, best_idx_ptr, slot + 3, first3, idx3, V)


@triton.jit
def _split_slots(row, S, DRAWS: tl.constexpr, BLOCK_S: tl.constexpr):
    """A row's per-chunk, per-draw partials in an (N, S, DRAWS) buffer: (BLOCK_S, DRAWS)
    offsets, and a (BLOCK_S, 1) mask of the real chunks."""
    splits = tl.arange(0, BLOCK_S)
    return (row * S + splits)[:, None] * DRAWS + tl.arange(0, DRAWS)[None, :], (splits < S)[:, None]


@triton.jit
def _drawn_tokens(best_ptr, best_idx_ptr, row, S, V, DRAWS: tl.constexpr, BLOCK_S: tl.constexpr):
    """Combine a row's chunk maxima: (each draw's score, its token), (DRAWS,) each."""
    slots, ok = _split_slots(row, S, DRAWS, BLOCK_S)
    best = tl.load(best_ptr + slots, mask=ok, other=-float("inf"))
    return _first_argmax(best, tl.load(best_idx_ptr + slots, mask=ok, other=V), V)


@triton.jit
def _lane(x, j):
    """Element ``j`` of a small vector, as a scalar."""
    return tl.sum(tl.where(tl.arange(0, x.shape[0]) == j, x, 0), 0)


@triton.jit
def _above_step(mass, count, value, drawn, probs, USE_P: tl.constexpr, USE_K: tl.constexpr):
    """One draw's per-lane probability mass (USE_P) and count (USE_K) of the tokens
    whose filter value lies strictly above the drawn token's."""
    above = value > drawn
    if USE_P:
        mass += tl.where(above, probs, 0.0)
    if USE_K:
        count += above.to(tl.float32)
    return mass, count


@triton.jit
def _store_above(mass_ptr, count_ptr, slot, mass, count):
    tl.store(mass_ptr + slot, tl.sum(mass, 0))
    tl.store(count_ptr + slot, tl.sum(count, 0))


@triton.jit
def _mass_above_partial_kernel(
    phi_ptr,  # (N, V) logits
    row_max_ptr,  # (N,) fp32: max(x)
    lse_shifted_ptr,  # (N,) fp32: logsumexp((x - max) / tau)
    skip_ptr,  # (N,) int32: rows != 0 are not read (SKIP)
    best_ptr,  # (N, S, 4) fp32: the four draws' chunk maxima
    best_idx_ptr,  # (N, S, 4) int32: their indices
    mass_ptr,  # (N, S, 4) fp32 out: chunk probability with a key strictly above each draw's (USE_P)
    count_ptr,  # (N, S, 4) fp32 out: chunk count of those tokens (USE_K)
    stride_phi,
    V,
    S,
    chunk,
    inv_tau,
    USE_P: tl.constexpr,
    USE_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_S: tl.constexpr,
    SKIP: tl.constexpr,
):
    """One (row, chunk) of the kept-set test of the four draws: what lies above each.
    Filter values stand in for the keys (the same order, at one float compare), and
    each draw keeps its own per-lane accumulators, as in the draw pass. Padding loads
    -inf, which lies above no draw."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    if _row_is_active(skip_ptr, row, SKIP):
        base = phi_ptr + row * stride_phi
        row_max, log2_norm = _load_norm(row_max_ptr, lse_shifted_ptr, row, True)
        _, tokens = _drawn_tokens(best_ptr, best_idx_ptr, row, S, V, 4, BLOCK_S)
        drawn = _filter_value(tl.load(base + tokens), inv_tau)
        drawn0, drawn1, drawn2, drawn3 = _lane(drawn, 0), _lane(drawn, 1), _lane(drawn, 2), _lane(drawn, 3)
        mass0 = tl.zeros((BLOCK_V,), tl.float32)
        mass1, mass2, mass3 = mass0, mass0, mass0
        count0, count1, count2, count3 = mass0, mass0, mass0, mass0
        v_start = split * chunk
        v_end = tl.minimum(v_start + chunk, V)
        ahead = _load_tile(base, v_start, v_end, BLOCK_V)
        for start in range(v_start, v_end, BLOCK_V):
            raw = ahead
            ahead = _load_tile(base, start + BLOCK_V, v_end, BLOCK_V)
            value = _filter_value(raw, inv_tau)
            probs = _tempered_probs(raw.to(tl.float32), row_max, log2_norm, inv_tau) if USE_P else 0.0
            mass0, count0 = _above_step(mass0, count0, value, drawn0, probs, USE_P, USE_K)
            mass1, count1 = _above_step(mass1, count1, value, drawn1, probs, USE_P, USE_K)
            mass2, count2 = _above_step(mass2, count2, value, drawn2, probs, USE_P, USE_K)
            mass3, count3 = _above_step(mass3, count3, value, drawn3, probs, USE_P, USE_K)
        slot = (row * S + split) * 4
        _store_above(mass_ptr, count_ptr, slot, mass0, count0)
        _store_above(mass_ptr, count_ptr, slot + 1, mass1, count1)
        _store_above(mass_ptr, count_ptr, slot + 2, mass2, count2)
        _store_above(mass_ptr, count_ptr, slot + 3, mass3, count3)


@triton.jit(do_not_specialize=["top_k"])
def _accept_kernel(
    best_ptr,  # (N, S, DRAWS) fp32: the draws' chunk maxima
    best_idx_ptr,  # (N, S, DRAWS) int32: their indices
    mass_ptr,  # (N, S, DRAWS) fp32: chunk mass above each draw (USE_P)
    count_ptr,  # (N, S, DRAWS) fp32: chunk count above each draw (USE_K)
    tokens_ptr,  # (N,) int64 out: the first accepted draw (0 if none, or skipped)
    accepted_ptr,  # (N,) int32 out: 1 where a draw was accepted or the row skipped
    skip_ptr,  # (N,) int32 (SKIP)
    S,
    V,
    top_p,
    top_k,
    USE_P: tl.constexpr,
    USE_K: tl.constexpr,
    DRAWS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    SKIP: tl.constexpr,
):
    """A draw is in the kept set iff the mass strictly above it is <= top_p and fewer
    than top_k tokens lie strictly above it; the row takes its first such draw."""
    row = tl.program_id(0).to(tl.int64)
    active = _row_is_active(skip_ptr, row, SKIP)
    token = tl.zeros((), tl.int32)
    accepted = 1 - active.to(tl.int32)
    if active:
        scores, tokens = _drawn_tokens(best_ptr, best_idx_ptr, row, S, V, DRAWS, BLOCK_S)
        kept = scores > -float("inf")
        slots, ok = _split_slots(row, S, DRAWS, BLOCK_S)
        if USE_P:
            kept = kept & (tl.sum(tl.load(mass_ptr + slots, mask=ok, other=0.0), 0) <= top_p)
        if USE_K:
            kept = kept & (tl.sum(tl.load(count_ptr + slots, mask=ok, other=0.0), 0) < top_k)
        draws = tl.arange(0, DRAWS)
        first = tl.min(tl.where(kept, draws, DRAWS), 0)
        token = tl.sum(tl.where(draws == first, tokens, 0), 0)
        accepted = (first < DRAWS).to(tl.int32)
    tl.store(tokens_ptr + row, token.to(tl.int64))
    tl.store(accepted_ptr + row, accepted)


def rejection_sample(
    phi: torch.Tensor,
    norm: SoftmaxNorm,
    seed: torch.Tensor,
    temperature: float,
    top_p: float,
    top_k: int,
    skip: torch.Tensor | None = None,
    splits: int | None = None,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact filtered sampling without a threshold: four independent Gumbel-max draws
    from the full tempered law (exponential races on the four uniforms of one Philox
    call per token), each accepted iff it is in the kept set; a row takes its first
    accepted draw, which follows the filtered law exactly. Three launches over (row,
    vocabulary chunk) programs: the draws, what lies above each draw, the choice.
    Unfiltered: one draw, always kept.

    Returns (tokens (N,) int64, accepted (N,) int32); rows with accepted == 0 had all
    four draws rejected (about (1 - kept mass)^4 of them) and need the threshold path.
    ``norm``: softmax(phi / temperature) (``row_stats(phi, temperature).tempered``).
    Rows where ``skip`` (N,) int32 is nonzero are not read: token 0, accepted 1."""
    n, vocab = phi.shape
    use_p, use_k = top_p < 1.0, 0 < top_k < vocab
    draws = 4 if use_p or use_k else 1
    block, splits, chunk = row_geometry(phi, splits, block_v or DRAW_BLOCK_V)
    best = torch.empty(n, splits, draws, device=phi.device, dtype=torch.float32)
    best_idx = torch.empty(n, splits, draws, device=phi.device, dtype=torch.int32)
    mass = torch.empty_like(best) if use_p or use_k else best
    count = torch.empty_like(best) if use_p or use_k else best
    tokens = torch.empty(n, device=phi.device, dtype=torch.int64)
    accepted = torch.empty(n, device=phi.device, dtype=torch.int32)
    skip_arg = accepted if skip is None else skip
    inv_tau, block_s = 1.0 / temperature, triton.next_power_of_2(splits)
    flags = dict(DRAWS=draws, SKIP=skip is not None)
    _race_partial_kernel[(n, splits)](
        phi, norm.row_max, seed, skip_arg, best, best_idx, phi.stride(0), vocab, splits, chunk, inv_tau,
        BLOCK_V=block, num_warps=ROW_WARPS, **flags,
    )  # fmt: skip
    if use_p or use_k:
        _mass_above_partial_kernel[(n, splits)](
            phi, *norm, skip_arg, best, best_idx, mass, count, phi.stride(0), vocab, splits, chunk, inv_tau,
            USE_P=use_p, USE_K=use_k, BLOCK_V=block, BLOCK_S=block_s, SKIP=skip is not None, num_warps=ROW_WARPS,
        )  # fmt: skip
    _accept_kernel[(n,)](
        best, best_idx, mass, count, tokens, accepted, skip_arg, splits, vocab, float(top_p), int(top_k),
        USE_P=use_p, USE_K=use_k, BLOCK_S=block_s, **flags,
    )  # fmt: skip
    return tokens, accepted
