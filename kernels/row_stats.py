"""Per-row softmax statistics in one streaming pass over the vocabulary.

For each row x of phi (length V) and inverse temperature 1/tau, with running maxima
rescaled on every new maximum (online softmax):
    lse_tau = logsumexp(x / tau)
    entropy = H(softmax(x)) / log V = (lse_1 - sum e^(x - lse_1) x) / log V
    argmax  = first index of the maximum of x (torch's tie rule)
-inf entries contribute nothing; 0 * (-inf) is guarded.
"""

from __future__ import annotations

import math

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
def _row_stats_kernel(
    phi_ptr,  # (N, V) logits, any float dtype, row stride `stride_phi`
    lse_tau_ptr,  # (N,) fp32 out: logsumexp(x / tau)
    entropy_ptr,  # (N,) fp32 out: normalised entropy at temperature 1
    argmax_ptr,  # (N,) int64 out
    stride_phi,
    V,
    inv_tau,
    inv_log_v,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = phi_ptr + row * stride_phi
    m1 = -float("inf")
    s1 = 0.0
    t1 = 0.0
    mt = -float("inf")
    st = 0.0
    best = -float("inf")
    best_idx = 0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        m1, s1, t1 = _online_exp_moments(m1, s1, t1, x)  # temperature 1
        # temperature tau
        xt = x * inv_tau
        mt_new = tl.maximum(mt, tl.max(xt, 0))
        safet = tl.where(mt_new == -float("inf"), 0.0, mt_new)
        st = st * tl.exp(mt - safet) + tl.sum(tl.exp(xt - safet), 0)
        mt = mt_new
        # argmax, first index on ties
        tile_best = tl.max(x, 0)
        tile_idx = tl.min(tl.where(x == tile_best, cols, V), 0)
        better = tile_best > best
        best_idx = tl.where(better, tile_idx, best_idx)
        best = tl.where(better, tile_best, best)
    lse1 = m1 + tl.log(s1)
    tl.store(lse_tau_ptr + row, mt + tl.log(st))
    tl.store(entropy_ptr + row, (lse1 - t1 / s1) * inv_log_v)
    tl.store(argmax_ptr + row, best_idx.to(tl.int64))


def row_stats(phi: torch.Tensor, temperature: float, block_v: int = 1024):
    """phi (N, V) -> lse_tau (N,) fp32, entropy (N,) fp32, argmax (N,) int64.

    ``temperature`` must be > 0 (greedy callers need only the argmax)."""
    n, vocab = phi.shape
    lse_tau = torch.empty(n, device=phi.device, dtype=torch.float32)
    entropy = torch.empty_like(lse_tau)
    argmax = torch.empty(n, device=phi.device, dtype=torch.int64)
    block = min(block_v, triton.next_power_of_2(vocab))
    _row_stats_kernel[(n,)](
        phi, lse_tau, entropy, argmax, phi.stride(0), vocab, 1.0 / temperature, 1.0 / math.log(vocab),
        BLOCK_V=block,
    )  # fmt: skip
    return lse_tau, entropy, argmax
