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
each pass histograms the weight of the tokens that match the prefix found so far, over
(row, vocabulary chunk) programs (``launch.vocab_chunks``), and a per-row kernel sums
the chunks in a fixed order and picks the digit where the cumulative weight, counted
from the top, crosses t. Deterministic, exact up to fp32 summation of the masses, no
data-dependent loops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from entrgi_kernels.launch import FP_FUSION, INTERPRET
from entrgi_kernels.row_stats import SoftmaxNorm, _load_norm, _row_is_active, _tempered_probs, row_geometry

DIGIT_BITS = 4
# Tile width of the histogram passes (their (BLOCK_V, 16) accumulators bound it); small
# under the interpreter so that CPU tests run several chunks.
HISTOGRAM_BLOCK_V = 32 if INTERPRET else 256


@triton.jit
def _ordered_key(x):
    """fp32, bf16 or fp16 -> int64 in [0, 2^bits) with the same order as the floats
    (-0 and +0 share a key). -0 is recognised by its bits, the sign bit alone: Triton
    3.9's interpreter finds bf16 -0 == 0 false."""
    if x.dtype == tl.float32:
        bits = x.to(tl.int32, bitcast=True)
        bits = tl.where(bits == -2147483648, tl.zeros_like(bits), bits)  # -0 -> +0
        key = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64) + 2147483648  # negatives: reverse order
    else:
        bits16 = x.to(tl.int16, bitcast=True)
        bits16 = tl.where(bits16 == -32768, tl.zeros_like(bits16), bits16)
        key = (bits16 ^ ((bits16 >> 15) & 0x7FFF)).to(tl.int64) + 32768
    return key


@triton.jit
def _filter_value(raw, inv_tau):
    """An fp32 value in the order of ``_filter_key`` (ties included): comparing two of
    these compares their keys, at one float compare instead of int64 ones."""
    if raw.dtype == tl.float32:
        value = raw * inv_tau
    else:
        value = raw.to(tl.float32)  # exact
    return value


@triton.jit
def _filter_key(raw, inv_tau):
    """The key the kept-set threshold compares. 16-bit logits use their own bits: x / tau
    in fp32 keeps distinct bf16/fp16 values distinct and in order, and 16-bit keys need
    half the radix passes. fp32 logits use x / tau as the reference does (the product
    can tie values that differ by an ulp)."""
    if raw.dtype == tl.float32:
        key = _ordered_key(_filter_value(raw, inv_tau))
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


@triton.jit(do_not_specialize=["shift"])
def _digit_histogram_partial_kernel(
    phi_ptr,  # (N, V) logits, row stride `stride_phi`
    row_max_ptr,  # (N,) fp32: max(x)
    lse_shifted_ptr,  # (N,) fp32: logsumexp((x - max) / tau)
    prefix_ptr,  # (N, 2) int64: the top-p and top-k key prefixes found by the earlier passes
    hist_ptr,  # (N, S, 2, NUM_DIGITS) fp32 out: chunk weight per next digit, top-p then top-k
    skip_ptr,  # (N,) int32: rows != 0 are not read (SKIP)
    stride_phi,
    V,
    S,
    chunk,  # vocabulary entries per split, a multiple of BLOCK_V
    inv_tau,
    shift,  # bit position of the digit this pass reads
    USE_P: tl.constexpr,
    USE_K: tl.constexpr,
    SKIP: tl.constexpr,
    BLOCK_V: tl.constexpr,
    DIGIT_BITS: tl.constexpr,
):
    """One (row, chunk) of one radix pass: of the tokens whose key matches the prefix,
    the probability (top-p) and count (top-k) per value of the next digit. The
    (BLOCK_V, NUM_DIGITS) accumulators take element-wise adds in the loop and one
    cross-lane reduction at the end."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    if _row_is_active(skip_ptr, row, SKIP):
        NUM_DIGITS: tl.constexpr = 1 << DIGIT_BITS
        digits = tl.arange(0, NUM_DIGITS)
        base = phi_ptr + row * stride_phi
        row_max, log2_norm = _load_norm(row_max_ptr, lse_shifted_ptr, row, True)
        prefix_p = tl.load(prefix_ptr + row * 2)
        prefix_k = tl.load(prefix_ptr + row * 2 + 1)
        acc_p = tl.zeros((BLOCK_V, NUM_DIGITS), tl.float32)
        acc_k = tl.zeros((BLOCK_V, NUM_DIGITS), tl.float32)
        v_start = split * chunk
        for start in range(v_start, tl.minimum(v_start + chunk, V), BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_row = cols < V
            raw = tl.load(base + cols, mask=in_row, other=-float("inf"))
            key = _filter_key(raw, inv_tau)
            onehot = ((key >> shift) & (NUM_DIGITS - 1)).to(tl.int32)[:, None] == digits[None, :]
            high = key >> (shift + DIGIT_BITS)
            if USE_P:
                prob = _tempered_probs(raw.to(tl.float32), row_max, log2_norm, inv_tau)
                acc_p += tl.where(onehot & ((high == prefix_p) & in_row)[:, None], prob[:, None], 0.0)
            if USE_K:
                acc_k += tl.where(onehot & ((high == prefix_k) & in_row)[:, None], 1.0, 0.0)
        slot = hist_ptr + (row * S + split) * 2 * NUM_DIGITS + digits
        tl.store(slot, tl.sum(acc_p, 0))
        tl.store(slot + NUM_DIGITS, tl.sum(acc_k, 0))


@triton.jit
def _next_digit(hist_ptr, prefix_ptr, above_ptr, row, S, target, FILTER: tl.constexpr, DIGIT_BITS: tl.constexpr,
                BLOCK_S: tl.constexpr):  # fmt: skip
    """Extend one filter's prefix (FILTER 0: top-p, 1: top-k) by the digit where its
    cumulative weight crosses ``target``, summing the chunks in a fixed order."""
    NUM_DIGITS: tl.constexpr = 1 << DIGIT_BITS
    splits = tl.arange(0, BLOCK_S)
    slots = ((row * S + splits) * 2 + FILTER)[:, None] * NUM_DIGITS + tl.arange(0, NUM_DIGITS)[None, :]
    hist = tl.sum(tl.load(hist_ptr + slots, mask=(splits < S)[:, None], other=0.0), 0)
    digit, above = _choose_digit(hist, tl.load(above_ptr + row * 2 + FILTER), target, NUM_DIGITS)
    tl.store(above_ptr + row * 2 + FILTER, above)
    prefix = tl.load(prefix_ptr + row * 2 + FILTER)
    tl.store(prefix_ptr + row * 2 + FILTER, (prefix << DIGIT_BITS) | digit)


@triton.jit(do_not_specialize=["top_k"])  # top_k == 1 must stay a runtime int
def _choose_digits_kernel(
    hist_ptr,  # (N, S, 2, NUM_DIGITS) fp32: the pass's chunk histograms
    prefix_ptr,  # (N, 2) int64 in / out: top-p and top-k prefixes, one digit longer on exit
    above_ptr,  # (N, 2) fp32 in / out: weight strictly above each prefix
    skip_ptr,  # (N,) int32: rows != 0 are left as they are (SKIP)
    S,
    top_p,  # mass target (USE_P)
    top_k,  # count target (USE_K)
    USE_P: tl.constexpr,
    USE_K: tl.constexpr,
    SKIP: tl.constexpr,
    DIGIT_BITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if _row_is_active(skip_ptr, row, SKIP):
        if USE_P:
            _next_digit(hist_ptr, prefix_ptr, above_ptr, row, S, top_p, 0, DIGIT_BITS, BLOCK_S)
        if USE_K:
            _next_digit(hist_ptr, prefix_ptr, above_ptr, row, S, top_k * 1.0 - 0.5, 1, DIGIT_BITS, BLOCK_S)


def keep_threshold_keys(
    phi: torch.Tensor,
    norm: SoftmaxNorm,
    temperature: float,
    top_p: float,
    top_k: int,
    skip: torch.Tensor | None = None,
    splits: int | None = None,
    block_v: int | None = None,
) -> torch.Tensor:
    """(N, V) logits -> (N,) int64 thresholds: token v is kept iff its ``_filter_key``
    is >= its row's threshold (top-p then top-k; 0 keeps everything). ``norm``:
    softmax(phi / temperature) (``row_stats(phi, temperature).tempered``). Rows where
    ``skip`` (N,) int32 is nonzero are not searched (threshold 0). Each radix pass is
    two launches: chunk histograms over (row, vocabulary chunk) programs, then the
    digit choice per row; 8 (16-bit logits) or 16 (fp32) launches, none host-synced."""
    n, vocab = phi.shape
    use_p, use_k = top_p < 1.0, 0 < top_k < vocab
    prefix = torch.zeros(n, 2, device=phi.device, dtype=torch.int64)
    if not (use_p or use_k):
        return prefix[:, 0]  # no filter: every key is >= 0
    block, splits, chunk = row_geometry(phi, splits, block_v or HISTOGRAM_BLOCK_V)
    hist = torch.empty(n, splits, 2, 1 << DIGIT_BITS, device=phi.device, dtype=torch.float32)
    above = torch.zeros(n, 2, device=phi.device, dtype=torch.float32)
    skip_arg = prefix if skip is None else skip
    flags = dict(USE_P=use_p, USE_K=use_k, SKIP=skip is not None, DIGIT_BITS=DIGIT_BITS)
    key_bits = 32 if phi.dtype == torch.float32 else 16
    for shift in range(key_bits - DIGIT_BITS, -1, -DIGIT_BITS):
        _digit_histogram_partial_kernel[(n, splits)](
            phi, *norm, prefix, hist, skip_arg, phi.stride(0), vocab, splits, chunk, 1.0 / temperature, shift,
            BLOCK_V=block, **flags, enable_fp_fusion=FP_FUSION,
        )  # fmt: skip
        _choose_digits_kernel[(n,)](
            hist, prefix, above, skip_arg, splits, float(top_p), int(top_k), BLOCK_S=triton.next_power_of_2(splits),
            **flags, enable_fp_fusion=FP_FUSION,
        )  # fmt: skip
    return prefix.amax(dim=1)
