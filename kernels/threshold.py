"""Exact top-p / top-k kept-set thresholds without sorting the vocabulary.

Both filters of the published sampler keep a prefix of the descending order, so the
kept set is ``{v : key(x_v) >= K}`` where ``key`` is the order-preserving unsigned
image of the float. For a per-token weight (probability for top-p, 1 for top-k) and a
target t (top_p, or k - 1/2), K is the key at which the descending cumulative weight
first exceeds t:

    weight(key > K) <= t < weight(key >= K)

which is the published rule "drop a token once the mass strictly before it exceeds
top_p" (ties at K all kept), and for top-k "keep values >= the k-th largest".
K is found digit by digit, most significant first: passes of 4 bits over the row (4
for bf16/fp16 logits, whose own 16 bits order them; 8 for fp32, keyed on x / tau);
each pass histograms the weight of the tokens that match the prefix found so far and
picks the digit where the cumulative weight, counted from the top, crosses t.
Deterministic, exact up to fp32 summation of the masses, no data-dependent loops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from entrgi_kernels.row_stats import _row_is_active

DIGIT_BITS = 4


@triton.jit
def _ordered_key(x):
    """fp32, bf16 or fp16 -> int64 in [0, 2^bits) with the same order as the floats
    (-0 and +0 share a key)."""
    x = tl.where(x == 0, tl.zeros_like(x), x)
    if x.dtype == tl.float32:
        bits = x.to(tl.int32, bitcast=True)
        key = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64) + 2147483648  # negatives: reverse order
    else:
        bits16 = x.to(tl.int16, bitcast=True)
        key = (bits16 ^ ((bits16 >> 15) & 0x7FFF)).to(tl.int64) + 32768
    return key


@triton.jit
def _filter_key(raw, inv_tau):
    """The key the kept-set threshold compares. 16-bit logits use their own bits: x / tau
    in fp32 keeps distinct bf16/fp16 values distinct and in order, and 16-bit keys need
    half the radix passes. fp32 logits use x / tau as the reference does (the product
    can tie values that differ by an ulp)."""
    if raw.dtype == tl.float32:
        key = _ordered_key(raw * inv_tau)
    else:
        key = _ordered_key(raw)
    return key


@triton.jit
def _choose_digit(hist, above, target, NUM_DIGITS: tl.constexpr):
    """Largest digit b with above + sum(hist[b:]) > target (0 if none); returns the
    digit and the weight strictly above it."""
    digits = tl.arange(0, NUM_DIGITS)
    # suffix sums: weight of digits >= b
    suffix = tl.sum(tl.where(digits[None, :] >= digits[:, None], hist[None, :], 0.0), 1)
    crosses = (above + suffix) > target
    chosen = tl.max(tl.where(crosses, digits, 0), 0)
    above = above + tl.sum(tl.where(digits > chosen, hist, 0.0), 0)
    return chosen, above


@triton.jit(do_not_specialize=["top_k"])  # top_k == 1 must stay a runtime int
def _threshold_kernel(
    phi_ptr,  # (N, V) logits, row stride `stride_phi`
    lse_tau_ptr,  # (N,) fp32: logsumexp(x / tau)
    key_ptr,  # (N,) int64 out: keep token v iff _filter_key(x_v) >= key_ptr[row]
    skip_ptr,  # (N,) int32: rows != 0 are skipped, their key left unwritten (SKIP)
    stride_phi,
    V,
    inv_tau,
    top_p,  # mass target (USE_P)
    top_k,  # count target (USE_K)
    USE_P: tl.constexpr,
    USE_K: tl.constexpr,
    SKIP: tl.constexpr,
    BLOCK_V: tl.constexpr,
    KEY_BITS: tl.constexpr,
    DIGIT_BITS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = phi_ptr + row * stride_phi
    lse = tl.load(lse_tau_ptr + row)
    active = _row_is_active(skip_ptr, row, SKIP)
    v_end = tl.where(active, V, 0)
    k_target = top_k * 1.0 - 0.5
    NUM_DIGITS: tl.constexpr = 1 << DIGIT_BITS
    digits = tl.arange(0, NUM_DIGITS)
    prefix_p = tl.zeros((), tl.int64)
    prefix_k = tl.zeros((), tl.int64)
    above_p = 0.0
    above_k = 0.0
    for step in tl.static_range(KEY_BITS // DIGIT_BITS):
        shift = KEY_BITS - DIGIT_BITS * (step + 1)
        # (BLOCK_V, NUM_DIGITS) accumulators: element-wise adds in the loop, one
        # cross-thread reduction per pass
        acc_p = tl.zeros((BLOCK_V, NUM_DIGITS), tl.float32)
        acc_k = tl.zeros((BLOCK_V, NUM_DIGITS), tl.float32)
        for start in range(0, v_end, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_row = cols < V
            raw = tl.load(base + cols, mask=in_row, other=-float("inf"))
            key = _filter_key(raw, inv_tau)
            onehot = ((key >> shift) & (NUM_DIGITS - 1))[:, None] == digits[None, :]
            high = key >> (shift + DIGIT_BITS)
            if USE_P:
                prob = tl.exp(raw.to(tl.float32) * inv_tau - lse)
                acc_p += tl.where(onehot & ((high == prefix_p) & in_row)[:, None], prob[:, None], 0.0)
            if USE_K:
                acc_k += tl.where(onehot & ((high == prefix_k) & in_row)[:, None], 1.0, 0.0)
        if USE_P:
            digit_p, above_p = _choose_digit(tl.sum(acc_p, 0), above_p, top_p, NUM_DIGITS)
            prefix_p = (prefix_p << DIGIT_BITS) | digit_p
        if USE_K:
            digit_k, above_k = _choose_digit(tl.sum(acc_k, 0), above_k, k_target, NUM_DIGITS)
            prefix_k = (prefix_k << DIGIT_BITS) | digit_k
    tl.store(key_ptr + row, tl.maximum(prefix_p, prefix_k), mask=active)


def keep_threshold_keys(
    phi: torch.Tensor,
    lse_tau: torch.Tensor,
    temperature: float,
    top_p: float,
    top_k: int,
    skip: torch.Tensor | None = None,
    block_v: int = 256,
) -> torch.Tensor:
    """(N, V) logits -> (N,) int64 thresholds: token v is kept iff its ``_filter_key``
    is >= its row's threshold (top-p then top-k; 0 keeps everything). Rows where
    ``skip`` (N,) int32 is nonzero are not searched (their key is undefined)."""
    n, vocab = phi.shape
    use_p, use_k = top_p < 1.0, 0 < top_k < vocab
    if not (use_p or use_k):
        return torch.zeros(n, device=phi.device, dtype=torch.int64)  # no filter: every key is >= 0
    keys = torch.empty(n, device=phi.device, dtype=torch.int64)
    block = min(block_v, triton.next_power_of_2(vocab))
    _threshold_kernel[(n,)](
        phi, lse_tau, keys, keys if skip is None else skip, phi.stride(0), vocab, 1.0 / temperature, float(top_p),
        int(top_k), USE_P=use_p, USE_K=use_k, SKIP=skip is not None, BLOCK_V=block, KEY_BITS=32 if phi.dtype == torch.float32 else 16, DIGIT_BITS=DIGIT_BITS,
    )  # fmt: skip
    return keys
