"""Sampling of the filtered law, and the step's commit confidences.

x ~ softmax(filter(phi / tau)) is drawn by exponential races (Gumbel-max: token v
arrives at E_v / q_v, E_v = -log u_v ~ Exp(1), q_v proportional to its probability;
the first arrival is argmax x_v / tau - log E_v) on uniforms u from Philox keyed by
(seed + row, a stream and an absolute index): no noise tensor is stored, and a draw
does not depend on how the vocabulary is split across programs. Two ways to the
filtered law:
- ``rejection_sample``: four draws from the full law, each accepted iff it is in the
  kept set (one pass over phi counts the mass and number of tokens above each draw);
  no threshold. A draw races the tiles of the row by their masses (from the row
  statistics pass, ``RowStats.tiles``), then the tokens of the winning tile: one tile
  of phi read per draw, not the row.
- ``sample_filtered``: Gumbel-max over the whole row restricted to a precomputed
  kept-set threshold (``threshold.py``), gathering what the step's commit confidence
  needs: the filtered law's log-normaliser and its two largest logits.
Every pass over phi splits the vocabulary across programs (``launch.vocab_chunks``).
Rows marked in ``skip`` are not read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from entrgi_kernels.launch import FP_FUSION, INTERPRET
from entrgi_kernels.row_stats import (
    _LOG2E,
    ROW_WARPS,
    RowStats,
    _first_argmax,
    _load_norm,
    _load_tile,
    _row_is_active,
    _tempered_probs,
    row_geometry,
)
from entrgi_kernels.threshold import _filter_key, _filter_value

_MIN_UNIFORM = tl.constexpr(4.7e-10)
# Tile width of the kept-set test's pass, which keeps four draws' accumulators per
# token: at 1,024 tokens, half the per-row tile, a thread holds four tokens, not eight
# (54 registers on sm_90, four 8-warp blocks per SM; bench/kernel_resources.py).
DRAW_BLOCK_V = 32 if INTERPRET else 1024
DRAW_WARPS = 8  # a row's two-level draws: one program per row, four tiles of phi


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
        BLOCK_V=block, SKIP=skip is not None, num_warps=ROW_WARPS, enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    _kept_sample_combine_kernel[(n,)](
        part, best_idx, out["tokens"], out["lse_kept_shifted"], out["top1"], out["top2"], skip_arg, splits, vocab,
        BLOCK_S=triton.next_power_of_2(splits), SKIP=skip is not None, enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    return out


# Philox streams (the high word of tl.rand's 64-bit offset) of a row's draws: draw k
# races tiles in stream _TILE_STREAM + k and its tile's tokens in _TOKEN_STREAM + k; the
# kept-law draw reads stream 0 of another seed.
_TILE_STREAM = tl.constexpr(1)
_TOKEN_STREAM = tl.constexpr(5)


@triton.jit
def _noise(seed, draw, FIRST_STREAM: tl.constexpr, index):
    """Uniforms of ``index`` (int32) for draw ``draw`` (broadcast against it), in Philox
    stream FIRST_STREAM + draw of key ``seed``."""
    return tl.rand(seed, ((draw.to(tl.int64) + FIRST_STREAM) << 32) + index)


@triton.jit
def _two_level_draw_kernel(
    phi_ptr,  # (N, V) logits
    tile_max_ptr,  # (N, T) fp32: each tile's maximum
    tile_sum_ptr,  # (N, T) fp32: each tile's sum of exp((x - tile max) / tau)
    row_max_ptr,  # (N,) fp32: max(x)
    seed_ptr,  # (1,) int64 Philox seed
    skip_ptr,  # (N,) int32: rows != 0 are not read (SKIP)
    tokens_ptr,  # (N, DRAWS) int32 out: the drawn tokens
    stride_phi,
    V,
    T,
    inv_tau,
    DRAWS: tl.constexpr,
    TILE: tl.constexpr,  # tile width of the masses
    BLOCK_T: tl.constexpr,  # next power of two >= T
    SKIP: tl.constexpr,
):
    """DRAWS independent draws of one row from softmax(x / tau), each in two
    exponential races: a tile by its mass M_t, then a token of that tile by
    q_v = exp((x_v - tile max) / tau). P(v) = M_t / Z * q_v / M_t = q_v / Z: the full
    law, up to the float rounding of M_t (a sum of TILE terms). Reads DRAWS tiles of phi."""
    row = tl.program_id(0).to(tl.int64)
    if _row_is_active(skip_ptr, row, SKIP):
        seed = tl.load(seed_ptr) + row
        scale = inv_tau * _LOG2E
        draws = tl.arange(0, DRAWS)[None, :]
        tiles = tl.arange(0, BLOCK_T)
        in_row = tiles < T
        tile_max = tl.load(tile_max_ptr + row * T + tiles, mask=in_row, other=-float("inf"))
        tile_sum = tl.load(tile_sum_ptr + row * T + tiles, mask=in_row, other=0.0)
        # exp(max / tau) / M_t: inf for a tile without mass, or one 2^128 below the row's
        inv_mass = tl.exp2((tl.load(row_max_ptr + row) - tile_max) * scale) / tile_sum
        # (BLOCK_T, DRAWS) races, a draw per column: tile t arrives at E_t / M_t
        tiles_2d = tiles[:, None] + draws * 0
        u = _noise(seed, draws, _TILE_STREAM, tiles_2d)
        _, won = _first_argmax(-(_exponential(u) * inv_mass[:, None]), tiles_2d, BLOCK_T)
        for k in tl.static_range(DRAWS):  # one tile at a time: 8 tokens per thread, not 32
            tile = _lane(won, k)
            cols = tile * TILE + tl.arange(0, TILE)
            x = tl.load(phi_ptr + row * stride_phi + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
            inv_q = tl.exp2((tl.load(tile_max_ptr + row * T + tile) - x) * scale)  # in [1, inf]
            u = _noise(seed, tl.full((), k, tl.int32), _TOKEN_STREAM, cols)
            _, token = _first_argmax(-(_exponential(u) * inv_q), cols, V)  # token v arrives at E_v / q_v
            tl.store(tokens_ptr + row * DRAWS + k, token)


@triton.jit
def _split_slots(row, S, DRAWS: tl.constexpr, BLOCK_S: tl.constexpr):
    """A row's per-chunk, per-draw partials in an (N, S, DRAWS) buffer: (BLOCK_S, DRAWS)
    offsets, and a (BLOCK_S, 1) mask of the real chunks."""
    splits = tl.arange(0, BLOCK_S)
    return (row * S + splits)[:, None] * DRAWS + tl.arange(0, DRAWS)[None, :], (splits < S)[:, None]


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
    drawn_ptr,  # (N, 4) int32: the four drawn tokens
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
    SKIP: tl.constexpr,
):
    """One (row, chunk) of the kept-set test of the four draws: what lies above each.
    Filter values stand in for the keys (the same order, at one float compare), and
    each draw keeps its own per-lane accumulators. Padding loads -inf, which lies above
    no draw."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    if _row_is_active(skip_ptr, row, SKIP):
        base = phi_ptr + row * stride_phi
        row_max, log2_norm = _load_norm(row_max_ptr, lse_shifted_ptr, row, True)
        drawn = _filter_value(tl.load(base + tl.load(drawn_ptr + row * 4 + tl.arange(0, 4))), inv_tau)
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
    drawn_ptr,  # (N, DRAWS) int32: the drawn tokens
    mass_ptr,  # (N, S, DRAWS) fp32: chunk mass above each draw (USE_P)
    count_ptr,  # (N, S, DRAWS) fp32: chunk count above each draw (USE_K)
    tokens_ptr,  # (N,) int64 out: the first accepted draw (0 if none, or skipped)
    accepted_ptr,  # (N,) int32 out: 1 where a draw was accepted or the row skipped
    skip_ptr,  # (N,) int32 (SKIP)
    S,
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
        draws = tl.arange(0, DRAWS)
        tokens = tl.load(drawn_ptr + row * DRAWS + draws)
        kept = draws < DRAWS
        slots, ok = _split_slots(row, S, DRAWS, BLOCK_S)
        if USE_P:
            kept = kept & (tl.sum(tl.load(mass_ptr + slots, mask=ok, other=0.0), 0) <= top_p)
        if USE_K:
            kept = kept & (tl.sum(tl.load(count_ptr + slots, mask=ok, other=0.0), 0) < top_k)
        first = tl.min(tl.where(kept, draws, DRAWS), 0)
        token = tl.sum(tl.where(draws == first, tokens, 0), 0)
        accepted = (first < DRAWS).to(tl.int32)
    tl.store(tokens_ptr + row, token.to(tl.int64))
    tl.store(accepted_ptr + row, accepted)


def full_law_draws(
    phi: torch.Tensor,
    stats: RowStats,
    seed: torch.Tensor,
    temperature: float,
    draws: int,
    skip: torch.Tensor | None = None,
) -> torch.Tensor:
    """``draws`` (1, 2 or 4) independent draws per row from softmax(phi / temperature),
    (N, draws) int32, each a tile raced by ``stats.tiles`` and then a token of it (one
    program per row, ``draws`` tiles of phi read). ``stats``: ``row_stats(phi,
    temperature, tiles=True)``; ``seed`` (1,) int64 on the device. Rows where ``skip``
    (N,) int32 is nonzero are not read (their draws unwritten)."""
    if stats.tiles is None:
        raise ValueError("the draws need the tile masses: row_stats(phi, temperature, tiles=True)")
    n, vocab = phi.shape
    tiles = stats.tiles
    drawn = torch.empty(n, draws, device=phi.device, dtype=torch.int32)
    _two_level_draw_kernel[(n,)](
        phi, tiles.max, tiles.sum, stats.row_max, seed, drawn if skip is None else skip, drawn, phi.stride(0), vocab,
        tiles.max.shape[1], 1.0 / temperature, DRAWS=draws, TILE=tiles.width,
        BLOCK_T=triton.next_power_of_2(tiles.max.shape[1]), SKIP=skip is not None, num_warps=DRAW_WARPS,
        enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    return drawn


def rejection_sample(
    phi: torch.Tensor,
    stats: RowStats,
    seed: torch.Tensor,
    temperature: float,
    top_p: float,
    top_k: int,
    skip: torch.Tensor | None = None,
    splits: int | None = None,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact filtered sampling without a threshold: four independent draws from the
    full tempered law, each accepted iff it is in the kept set; a row takes its first
    accepted draw, which follows the filtered law exactly. A draw picks a tile by the
    tile masses ``stats.tiles`` and then a token inside it (two exponential races, one
    tile of phi read); one split-V pass over phi then takes what lies above each draw,
    and a last launch chooses. Unfiltered: one draw, always kept.

    Returns (tokens (N,) int64, accepted (N,) int32); rows with accepted == 0 had all
    four draws rejected (about (1 - kept mass)^4 of them) and need the threshold path.
    ``stats``: ``row_stats(phi, temperature, tiles=True)``. Rows where ``skip`` (N,)
    int32 is nonzero are not read: token 0, accepted 1. ``splits`` / ``block_v``: the
    pass over phi's chunks and tile."""
    n, vocab = phi.shape
    use_p, use_k = top_p < 1.0, 0 < top_k < vocab
    draws = 4 if use_p or use_k else 1
    drawn = full_law_draws(phi, stats, seed, temperature, draws, skip)
    block, splits, chunk = row_geometry(phi, splits, block_v or DRAW_BLOCK_V)
    mass, count = torch.empty(2, n, splits, draws, device=phi.device, dtype=torch.float32)
    tokens = torch.empty(n, device=phi.device, dtype=torch.int64)
    accepted = torch.empty(n, device=phi.device, dtype=torch.int32)
    skip_arg = accepted if skip is None else skip
    inv_tau = 1.0 / temperature
    if use_p or use_k:
        _mass_above_partial_kernel[(n, splits)](
            phi, *stats.tempered, skip_arg, drawn, mass, count, phi.stride(0), vocab, splits, chunk, inv_tau,
            USE_P=use_p, USE_K=use_k, BLOCK_V=block, SKIP=skip is not None, num_warps=ROW_WARPS,
            enable_fp_fusion=FP_FUSION,
        )  # fmt: skip
    _accept_kernel[(n,)](
        drawn, mass, count, tokens, accepted, skip_arg, splits, float(top_p), int(top_k), USE_P=use_p, USE_K=use_k,
        DRAWS=draws, BLOCK_S=triton.next_power_of_2(splits), SKIP=skip is not None, enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    return tokens, accepted
