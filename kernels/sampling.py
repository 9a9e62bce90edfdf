"""Gumbel-max sampling of the filtered law, and the step's commit confidences.

x ~ softmax(filter(phi / tau)) is drawn as argmax over kept tokens of
x_v / tau + G_v, with G_v = -log(-log u_v) and u_v from Philox keyed by
(seed + row, absolute token id): no noise tensor is stored, and the draw does not
depend on block sizes. Two ways to the filtered law:
- ``rejection_sample``: draw from the full law and accept iff the draw is in the kept
  set (a second pass counts the mass and number of tokens above it); no threshold.
- ``sample_filtered``: Gumbel-max restricted to a precomputed kept-set threshold
  (``threshold.py``), gathering what the step's commit confidence needs: the
  filtered law's log-normaliser and its two largest logits.
Rows marked in ``skip`` are not read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from entrgi_kernels.row_stats import _row_is_active
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


@triton.jit(do_not_specialize=["top_k"])
def _rejection_sample_kernel(
    phi_ptr,  # (N, V) logits
    lse_tau_ptr,  # (N,) fp32: logsumexp(x / tau)
    seed_ptr,  # (1,) int64 Philox seed
    tokens_ptr,  # (N,) int64 out: the accepted draw (0 where rejected or skipped)
    accepted_ptr,  # (N,) int32 out: 1 where a draw was accepted or the row skipped
    skip_ptr,  # (N,) int32: rows != 0 are not read (SKIP)
    stride_phi,
    V,
    inv_tau,
    top_p,
    top_k,
    USE_P: tl.constexpr,
    USE_K: tl.constexpr,
    ROUNDS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    SKIP: tl.constexpr,
):
    """Exact filtered sampling without a threshold: draw from the full tempered law by
    Gumbel-max, accept iff the draw is in the kept set (mass strictly above it <= top_p
    and fewer than top_k tokens strictly above it). Accepted draws follow the filtered
    law exactly; rows rejected ROUNDS times are left to the threshold path."""
    row = tl.program_id(0).to(tl.int64)
    base = phi_ptr + row * stride_phi
    lse = tl.load(lse_tau_ptr + row)
    seed = tl.load(seed_ptr) + row
    token = tl.zeros((), tl.int32)
    done = 1 - _row_is_active(skip_ptr, row, SKIP).to(tl.int32)
    r = 0
    while (r < ROUNDS) & (done == 0):
        best = -float("inf")
        best_idx = tl.zeros((), tl.int32)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            raw = tl.load(base + cols, mask=cols < V, other=-float("inf"))
            u = tl.maximum(tl.rand(seed, cols + r * V), _MIN_UNIFORM)
            score = raw.to(tl.float32) * inv_tau - tl.log(-tl.log(u))
            tile_best = tl.max(score, 0)
            tile_idx = tl.min(tl.where(score == tile_best, cols, V), 0)
            better = tile_best > best
            best_idx = tl.where(better, tile_idx, best_idx)
            best = tl.where(better, tile_best, best)
        accept = best > -float("inf")
        if USE_P or USE_K:
            drawn_key = _filter_key(tl.load(base + best_idx), inv_tau)
            mass = 0.0
            count = 0.0
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                raw = tl.load(base + cols, mask=cols < V, other=-float("inf"))
                above = (_filter_key(raw, inv_tau) > drawn_key) & (cols < V)
                if USE_P:
                    mass += tl.sum(tl.where(above, tl.exp(raw.to(tl.float32) * inv_tau - lse), 0.0), 0)
                if USE_K:
                    count += tl.sum(above.to(tl.float32), 0)
            if USE_P:
                accept = accept & (mass <= top_p)
            if USE_K:
                accept = accept & (count < top_k)
        token = tl.where(accept, best_idx, token)
        done = accept.to(tl.int32)
        r += 1
    tl.store(tokens_ptr + row, token.to(tl.int64))
    tl.store(accepted_ptr + row, done)


def rejection_sample(
    phi: torch.Tensor,
    lse_tau: torch.Tensor,
    seed: torch.Tensor,
    temperature: float,
    top_p: float,
    top_k: int,
    skip: torch.Tensor | None = None,
    rounds: int = 4,
    block_v: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (N,) int64, accepted (N,) int32); rows with accepted == 0 need the
    threshold path (about (1 - kept mass)^rounds of them). Rows where ``skip`` (N,)
    int32 is nonzero are not read: token 0, accepted 1."""
    n, vocab = phi.shape
    tokens = torch.empty(n, device=phi.device, dtype=torch.int64)
    accepted = torch.empty(n, device=phi.device, dtype=torch.int32)
    _rejection_sample_kernel[(n,)](
        phi, lse_tau, seed, tokens, accepted, accepted if skip is None else skip, phi.stride(0), vocab,
        1.0 / temperature, float(top_p), int(top_k), USE_P=top_p < 1.0, USE_K=0 < top_k < vocab, ROUNDS=rounds,
        BLOCK_V=min(block_v, triton.next_power_of_2(vocab)), SKIP=skip is not None,
    )  # fmt: skip
    return tokens, accepted
