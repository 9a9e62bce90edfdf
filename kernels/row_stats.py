"""Per-row softmax statistics in one streaming pass over the vocabulary.

For each row x of phi (length V) and inverse temperature 1/tau, with running maxima
rescaled on every new maximum (online softmax):
    lse_tau  = logsumexp(x / tau)
    entropy  = H(softmax(x)) / log V = (lse_1 - sum e^(x - lse_1) x) / log V
    plogp_tau = sum p log p of softmax(x / tau) = E_p[x / tau] - lse_tau
    argmax   = first index of the maximum of x (torch's tie rule)
-inf entries contribute nothing; 0 * (-inf) is guarded. Rows marked in ``skip`` are
not read; their outputs are 0.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl


@triton.jit
def _online_exp_moments(m, s, t, x):
    """Fold a tile x into running (max m, sum e^(x-m) s, sum e^(x-m) x t), rescaling on a
    new maximum; -inf entries add nothing. lse = m + log s, E_p[x] = t / s."""
    m_new = tl.maximum(m, tl.max(x, 0))
    safe = tl.where(m_new == -float("inf"), 0.0, m_new)
    scale = tl.exp(m - safe)
    e = tl.exp(x - safe)
    s = s * scale + tl.sum(e, 0)
    t = t * scale + tl.sum(tl.where(e > 0, e * x, 0.0), 0)
    return m_new, s, t


@triton.jit
def _row_is_active(skip_ptr, row, SKIP: tl.constexpr):
    """Whether ``row`` is to be processed: always without SKIP, else skip_ptr[row] == 0."""
    active = tl.full((), 1, tl.int1)
    if SKIP:
        active = tl.load(skip_ptr + row) == 0
    return active


@triton.jit
def _row_stats_kernel(
    phi_ptr,  # (N, V) logits, any float dtype, row stride `stride_phi`
    lse_tau_ptr,  # (N,) fp32 out: logsumexp(x / tau)
    entropy_ptr,  # (N,) fp32 out: normalised entropy at temperature 1
    plogp_tau_ptr,  # (N,) fp32 out: sum p log p of softmax(x / tau)
    argmax_ptr,  # (N,) int64 out
    skip_ptr,  # (N,) int32: rows != 0 are not read, their outputs 0 (SKIP)
    stride_phi,
    V,
    inv_tau,
    inv_log_v,
    BLOCK_V: tl.constexpr,
    SKIP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = phi_ptr + row * stride_phi
    active = _row_is_active(skip_ptr, row, SKIP)
    m1 = -float("inf")
    s1 = 0.0
    t1 = 0.0
    mt = -float("inf")
    st = 0.0
    tt = 0.0
    best = -float("inf")
    best_idx = 0
    for start in range(0, tl.where(active, V, 0), BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        m1, s1, t1 = _online_exp_moments(m1, s1, t1, x)
        mt, st, tt = _online_exp_moments(mt, st, tt, x * inv_tau)
        # argmax, first index on ties
        tile_best = tl.max(x, 0)
        tile_idx = tl.min(tl.where(x == tile_best, cols, V), 0)
        better = tile_best > best
        best_idx = tl.where(better, tile_idx, best_idx)
        best = tl.where(better, tile_best, best)
    lse1 = m1 + tl.log(s1)
    lse_tau = mt + tl.log(st)
    tl.store(lse_tau_ptr + row, tl.where(active, lse_tau, 0.0))
    tl.store(entropy_ptr + row, tl.where(active, (lse1 - t1 / s1) * inv_log_v, 0.0))
    tl.store(plogp_tau_ptr + row, tl.where(active, tt / st - lse_tau, 0.0))
    tl.store(argmax_ptr + row, tl.where(active, best_idx, 0).to(tl.int64))


class RowStats(NamedTuple):
    """Per-row statistics, (N,) each: lse_tau, entropy (normalised, tau = 1) and
    plogp_tau (fp32), argmax (int64)."""

    lse_tau: torch.Tensor
    entropy: torch.Tensor
    plogp_tau: torch.Tensor
    argmax: torch.Tensor


def row_stats(phi: torch.Tensor, temperature: float, skip: torch.Tensor | None = None, block_v: int = 1024):
    """phi (N, V) -> :class:`RowStats`. ``temperature`` must be > 0 (greedy callers need
    only the argmax). Rows where ``skip`` (N,) int32 is nonzero are not read (outputs 0)."""
    n, vocab = phi.shape
    lse_tau = torch.empty(n, device=phi.device, dtype=torch.float32)
    entropy = torch.empty_like(lse_tau)
    plogp_tau = torch.empty_like(lse_tau)
    argmax = torch.empty(n, device=phi.device, dtype=torch.int64)
    block = min(block_v, triton.next_power_of_2(vocab))
    _row_stats_kernel[(n,)](
        phi, lse_tau, entropy, plogp_tau, argmax, lse_tau if skip is None else skip, phi.stride(0), vocab,
        1.0 / temperature, 1.0 / math.log(vocab), BLOCK_V=block, SKIP=skip is not None,
    )  # fmt: skip
    return RowStats(lse_tau, entropy, plogp_tau, argmax)
