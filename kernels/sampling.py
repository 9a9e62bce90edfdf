"""Gumbel-max sampling of the filtered law, and the step's commit confidences.

x ~ softmax(filter(phi / tau)) is drawn as argmax over kept tokens of
x_v / tau + G_v, with G_v = -log(-log u_v) and u_v from Philox keyed by
(seed + row, absolute token id): no noise tensor is stored, and the draw does not
depend on block sizes. Two ways to the filtered law:
- ``rejection_sample``: draw from the full law and accept iff the draw is in the kept
  set (a second pass counts the mass and number of tokens above it); no threshold.
  Both passes split the vocabulary across programs (``launch.vocab_chunks``).
- ``sample_filtered``: Gumbel-max restricted to a precomputed kept-set threshold
  (``threshold.py``), gathering what the step's commit confidence needs: the
  filtered law's log-normaliser and its two largest logits.
Rows marked in ``skip`` are not read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from entrgi_kernels.row_stats import ROW_WARPS, _first_argmax, _row_is_active, row_geometry
from entrgi_kernels.threshold import _filter_key

_MIN_UNIFORM = tl.constexpr(4.7e-10)


@triton.jit
def _sample_kernel(
    phi_ptr,  # (N, V) logits sampled from
    key_ptr,  # (N,) int64 kept-set key thresholds
    seed_ptr,  # (1,) int64 Philox seed (a device tensor, so graphs can replay fresh draws)
    tokens_ptr,  # (N,) int64 out: sampled token
    lse_kept_ptr,  # (N,) fp32 out: logsumexp of x / tau over kept tokens
    top1_ptr,  # (N,) fp32 out: largest kept x / tau
    top2_ptr,  # (N,) fp32 out: second largest kept x / tau (-inf if none)
    skip_ptr,  # (N,) int32: rows != 0 are skipped, their outputs left unwritten (SKIP)
    stride_phi,
    V,
    inv_tau,
    BLOCK_V: tl.constexpr,
    SKIP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = phi_ptr + row * stride_phi
    active = _row_is_active(skip_ptr, row, SKIP)
    v_end = tl.where(active, V, 0)
    threshold = tl.load(key_ptr + row)
    seed = tl.load(seed_ptr) + row
    best = -float("inf")
    best_idx = 0
    m = -float("inf")
    s = 0.0
    top1 = -float("inf")
    top2 = -float("inf")
    for start in range(0, v_end, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < V
        raw = tl.load(base + cols, mask=in_row, other=-float("inf"))
        x = raw.to(tl.float32) * inv_tau
        kept = in_row & (_filter_key(raw, inv_tau) >= threshold) & (x > -float("inf"))
        u = tl.maximum(tl.rand(seed, cols), _MIN_UNIFORM)
        score = tl.where(kept, x - tl.log(-tl.log(u)), -float("inf"))
        tile_best = tl.max(score, 0)
        tile_idx = tl.min(tl.where(score == tile_best, cols, V), 0)
        better = tile_best > best
        best_idx = tl.where(better, tile_idx, best_idx)
        best = tl.where(better, tile_best, best)
        # filtered law: online logsumexp and the two largest logits
        xk = tl.where(kept, x, -float("inf"))
        tile_max = tl.max(xk, 0)
        m_new = tl.maximum(m, tile_max)
        safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        s = s * tl.exp(m - safe) + tl.sum(tl.exp(xk - safe), 0)
        m = m_new
        tile_first = tl.min(tl.where(xk == tile_max, cols, V), 0)
        tile_second = tl.max(tl.where(cols == tile_first, -float("inf"), xk), 0)
        top2 = tl.maximum(tl.minimum(top1, tile_max), tl.maximum(top2, tile_second))
        top1 = tl.maximum(top1, tile_max)
    tl.store(tokens_ptr + row, best_idx.to(tl.int64), mask=active)
    tl.store(lse_kept_ptr + row, m + tl.log(s), mask=active)
    tl.store(top1_ptr + row, top1, mask=active)
    tl.store(top2_ptr + row, top2, mask=active)


def sample_filtered(
    phi: torch.Tensor,
    keys: torch.Tensor,
    seed: torch.Tensor,
    temperature: float,
    skip: torch.Tensor | None = None,
    tokens: torch.Tensor | None = None,
    block_v: int = 1024,
) -> dict[str, torch.Tensor]:
    """Draw one token per row from the kept set ``_filter_key(x) >= keys``; returns
    tokens (N,) int64 and the kept law's lse_kept, top1, top2 (N,) fp32 of x / tau.
    Rows where ``skip`` (N,) int32 is nonzero are left as they are in ``tokens`` (0 when
    not given) and unwritten elsewhere."""
    n, vocab = phi.shape
    out = dict(
        tokens=tokens if tokens is not None else torch.zeros(n, device=phi.device, dtype=torch.int64),
        lse_kept=torch.empty(n, device=phi.device, dtype=torch.float32),
        top1=torch.empty(n, device=phi.device, dtype=torch.float32),
        top2=torch.empty(n, device=phi.device, dtype=torch.float32),
    )
    _sample_kernel[(n,)](
        phi, keys, seed, out["tokens"], out["lse_kept"], out["top1"], out["top2"], keys if skip is None else skip,
        phi.stride(0), vocab, 1.0 / temperature, BLOCK_V=min(block_v, triton.next_power_of_2(vocab)),
        SKIP=skip is not None,
    )  # fmt: skip
    return out


@triton.jit
def _uniforms(seed, cols, DRAWS: tl.constexpr):
    """(BLOCK_V, DRAWS) uniforms in (0, 1], independent across draws: one Philox call
    gives four (draw 0 is ``tl.rand(seed, cols)``)."""
    if DRAWS == 1:
        u = tl.rand(seed, cols)[:, None]
    else:
        u0, u1, u2, u3 = tl.rand4x(seed, cols)
        u = tl.reshape(tl.join(tl.join(u0, u2), tl.join(u1, u3)), (cols.shape[0], 4))
    return tl.maximum(u, _MIN_UNIFORM)


@triton.jit
def _gumbel_partial_kernel(
    phi_ptr,  # (N, V) logits
    seed_ptr,  # (1,) int64 Philox seed
    skip_ptr,  # (N,) int32: rows != 0 are not read (SKIP)
    best_ptr,  # (N, S, DRAWS) fp32 out: chunk maximum of x / tau + Gumbel noise, per draw
    best_idx_ptr,  # (N, S, DRAWS) int32 out: its first index
    stride_phi,
    V,
    S,
    chunk,  # vocabulary entries per split, a multiple of BLOCK_V
    inv_tau,
    DRAWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    SKIP: tl.constexpr,
):
    """One (row, chunk) of DRAWS independent Gumbel-max draws from the full tempered law."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    if _row_is_active(skip_ptr, row, SKIP):
        base = phi_ptr + row * stride_phi
        seed = tl.load(seed_ptr) + row
        best = tl.full((BLOCK_V, DRAWS), -float("inf"), tl.float32)
        best_idx = tl.zeros((BLOCK_V, DRAWS), tl.int32)
        v_start = split * chunk
        for start in range(v_start, tl.minimum(v_start + chunk, V), BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            raw = tl.load(base + cols, mask=cols < V, other=-float("inf"))
            score = (raw.to(tl.float32) * inv_tau)[:, None] - tl.log(-tl.log(_uniforms(seed, cols, DRAWS)))
            better = score > best  # strict: a lane keeps its first maximum
            best_idx = tl.where(better, cols[:, None], best_idx)
            best = tl.where(better, score, best)
        top, top_idx = _first_argmax(best, best_idx, V)
        slots = (row * S + split) * DRAWS + tl.arange(0, DRAWS)
        tl.store(best_ptr + slots, top)
        tl.store(best_idx_ptr + slots, top_idx)


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
def _mass_above_partial_kernel(
    phi_ptr,  # (N, V) logits
    lse_tau_ptr,  # (N,) fp32: logsumexp(x / tau)
    skip_ptr,  # (N,) int32: rows != 0 are not read (SKIP)
    best_ptr,  # (N, S, DRAWS) fp32: the draws' chunk maxima
    best_idx_ptr,  # (N, S, DRAWS) int32: their indices
    mass_ptr,  # (N, S, DRAWS) fp32 out: chunk probability with a key strictly above each draw's (USE_P)
    count_ptr,  # (N, S, DRAWS) fp32 out: chunk count of those tokens (USE_K)
    stride_phi,
    V,
    S,
    chunk,
    inv_tau,
    USE_P: tl.constexpr,
    USE_K: tl.constexpr,
    DRAWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_S: tl.constexpr,
    SKIP: tl.constexpr,
):
    """One (row, chunk) of the kept-set test of every draw: what lies above it."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    if _row_is_active(skip_ptr, row, SKIP):
        base = phi_ptr + row * stride_phi
        lse = tl.load(lse_tau_ptr + row)
        _, tokens = _drawn_tokens(best_ptr, best_idx_ptr, row, S, V, DRAWS, BLOCK_S)
        drawn_keys = _filter_key(tl.load(base + tokens), inv_tau)
        mass = tl.zeros((BLOCK_V, DRAWS), tl.float32)
        count = tl.zeros((BLOCK_V, DRAWS), tl.float32)
        v_start = split * chunk
        for start in range(v_start, tl.minimum(v_start + chunk, V), BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            raw = tl.load(base + cols, mask=cols < V, other=-float("inf"))
            above = (_filter_key(raw, inv_tau)[:, None] > drawn_keys[None, :]) & (cols < V)[:, None]
            if USE_P:
                mass += tl.where(above, tl.exp(raw.to(tl.float32) * inv_tau - lse)[:, None], 0.0)
            if USE_K:
                count += above.to(tl.float32)
        slots = (row * S + split) * DRAWS + tl.arange(0, DRAWS)
        tl.store(mass_ptr + slots, tl.sum(mass, 0))
        tl.store(count_ptr + slots, tl.sum(count, 0))


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
    lse_tau: torch.Tensor,
    seed: torch.Tensor,
    temperature: float,
    top_p: float,
    top_k: int,
    skip: torch.Tensor | None = None,
    splits: int | None = None,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact filtered sampling without a threshold: four independent Gumbel-max draws
    from the full tempered law (one Philox call yields the four noises), each accepted
    iff it is in the kept set; a row takes its first accepted draw, which follows the
    filtered law exactly. Three launches over (row, vocabulary chunk) programs: the
    draws, what lies above each draw, the choice. Unfiltered: one draw, always kept.

    Returns (tokens (N,) int64, accepted (N,) int32); rows with accepted == 0 had all
    four draws rejected (about (1 - kept mass)^4 of them) and need the threshold path.
    Rows where ``skip`` (N,) int32 is nonzero are not read: token 0, accepted 1."""
    n, vocab = phi.shape
    use_p, use_k = top_p < 1.0, 0 < top_k < vocab
    draws = 4 if use_p or use_k else 1
    block, splits, chunk = row_geometry(phi, splits, block_v)
    best = torch.empty(n, splits, draws, device=phi.device, dtype=torch.float32)
    best_idx = torch.empty(n, splits, draws, device=phi.device, dtype=torch.int32)
    mass = torch.empty_like(best) if use_p or use_k else best
    count = torch.empty_like(best) if use_p or use_k else best
    tokens = torch.empty(n, device=phi.device, dtype=torch.int64)
    accepted = torch.empty(n, device=phi.device, dtype=torch.int32)
    skip_arg = accepted if skip is None else skip
    inv_tau, block_s = 1.0 / temperature, triton.next_power_of_2(splits)
    flags = dict(DRAWS=draws, SKIP=skip is not None)
    _gumbel_partial_kernel[(n, splits)](
        phi, seed, skip_arg, best, best_idx, phi.stride(0), vocab, splits, chunk, inv_tau, BLOCK_V=block,
        num_warps=ROW_WARPS, **flags,
    )  # fmt: skip
    if use_p or use_k:
        _mass_above_partial_kernel[(n, splits)](
            phi, lse_tau, skip_arg, best, best_idx, mass, count, phi.stride(0), vocab, splits, chunk, inv_tau,
            USE_P=use_p, USE_K=use_k, BLOCK_V=block, BLOCK_S=block_s, num_warps=ROW_WARPS, **flags,
        )  # fmt: skip
    _accept_kernel[(n,)](
        best, best_idx, mass, count, tokens, accepted, skip_arg, splits, vocab, float(top_p), int(top_k),
        USE_P=use_p, USE_K=use_k, BLOCK_S=block_s, **flags,
    )  # fmt: skip
    return tokens, accepted
