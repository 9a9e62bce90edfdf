"""Gumbel-max sampling of the filtered law, and the step's commit confidences.

x ~ softmax(filter(phi / tau)) is drawn as argmax over kept tokens of
x_v / tau + G_v, with G_v = -log(-log u_v) and u_v from Philox keyed by
(seed + row, absolute token id): no noise tensor is stored, and the draw does not
depend on block sizes. The same pass gathers what the denoising step's confidence
needs: the filtered law's log-normaliser and its two largest logits, and (when
asked) sum p log p of softmax(phi_init / tau).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from entrgi_kernels.row_stats import _online_exp_moments
from entrgi_kernels.threshold import _filter_key

_MIN_UNIFORM = tl.constexpr(4.7e-10)


@triton.jit
def _sample_kernel(
    phi_ptr,  # (N, V) logits sampled from
    phi_init_ptr,  # (N, V) un-steered logits (read only when WITH_ENTROPY)
    key_ptr,  # (N,) int64 kept-set key thresholds
    seed_ptr,  # (1,) int64 Philox seed (a device tensor, so graphs can replay fresh draws)
    tokens_ptr,  # (N,) int64 out: sampled token
    lse_kept_ptr,  # (N,) fp32 out: logsumexp of x / tau over kept tokens
    top1_ptr,  # (N,) fp32 out: largest kept x / tau
    top2_ptr,  # (N,) fp32 out: second largest kept x / tau (-inf if none)
    neg_entropy_ptr,  # (N,) fp32 out: sum p log p of softmax(phi_init / tau)
    stride_phi,
    stride_init,
    V,
    inv_tau,
    BLOCK_V: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = phi_ptr + row * stride_phi
    threshold = tl.load(key_ptr + row)
    seed = tl.load(seed_ptr) + row
    best = -float("inf")
    best_idx = 0
    m = -float("inf")
    s = 0.0
    top1 = -float("inf")
    top2 = -float("inf")
    mi = -float("inf")
    si = 0.0
    ti = 0.0
    for start in range(0, V, BLOCK_V):
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
        if WITH_ENTROPY:
            xi = tl.load(phi_init_ptr + row * stride_init + cols, mask=in_row, other=-float("inf"))
            mi, si, ti = _online_exp_moments(mi, si, ti, xi.to(tl.float32) * inv_tau)
    tl.store(tokens_ptr + row, best_idx.to(tl.int64))
    tl.store(lse_kept_ptr + row, m + tl.log(s))
    tl.store(top1_ptr + row, top1)
    tl.store(top2_ptr + row, top2)
    if WITH_ENTROPY:
        # sum p log p = E_p[x] - lse
        tl.store(neg_entropy_ptr + row, ti / si - (mi + tl.log(si)))


def sample_filtered(
    phi: torch.Tensor,
    keys: torch.Tensor,
    seed: torch.Tensor,
    temperature: float,
    phi_init: torch.Tensor | None = None,
    block_v: int = 1024,
):
    """Draw one token per row from the kept set; returns tokens, lse_kept, top1, top2
    and (with ``phi_init``) sum p log p of softmax(phi_init / tau)."""
    n, vocab = phi.shape
    out = dict(
        tokens=torch.empty(n, device=phi.device, dtype=torch.int64),
        lse_kept=torch.empty(n, device=phi.device, dtype=torch.float32),
        top1=torch.empty(n, device=phi.device, dtype=torch.float32),
        top2=torch.empty(n, device=phi.device, dtype=torch.float32),
        neg_entropy=torch.empty(n, device=phi.device, dtype=torch.float32),
    )
    init = phi if phi_init is None else phi_init
    block = min(block_v, triton.next_power_of_2(vocab))
    _sample_kernel[(n,)](
        phi, init, keys, seed, out["tokens"], out["lse_kept"], out["top1"], out["top2"], out["neg_entropy"],
        phi.stride(0), init.stride(0), vocab, 1.0 / temperature,
        BLOCK_V=block, WITH_ENTROPY=phi_init is not None,
    )  # fmt: skip
    return out
