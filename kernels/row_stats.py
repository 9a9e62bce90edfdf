"""Per-row softmax statistics in one streaming pass over the vocabulary.

For each row x of phi (length V) and inverse temperature 1/tau, with running maxima
rescaled on every new maximum (online softmax), over S chunks of V in parallel whose
partials a second kernel combines (``launch.vocab_chunks``):
    row_max  = max(x)
    lse_tau_shifted = logsumexp((x - row_max) / tau),  lse_1_shifted = logsumexp(x - row_max)
    entropy  = H(softmax(x)) / log V = (lse_1_shifted - E_p[x - row_max]) / log V
    plogp_tau = sum p log p of softmax(x / tau) = E_p[x - row_max] / tau - lse_tau_shifted
    argmax   = first index of the maximum of x (torch's tie rule)
-inf entries contribute nothing; 0 * (-inf) is guarded. Rows marked in ``skip`` are
not read; their outputs are 0.

Probabilities are read back as exp((x - row_max) / tau - lse_tau_shifted) (``SoftmaxNorm``),
never as exp(x / tau - logsumexp(x / tau)): the latter carries ulp(max / tau) into every
p (1.2e-4 at max / tau = 2000), which the soft-embedding backward's cancellation at a
confident row's argmax and the top-p masses near p cannot afford. Shifted, the top
token's exponent is exactly 0 - lse_shifted, and lse_shifted lies in [0, log V].
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from entrgi_kernels.launch import FP_FUSION, INTERPRET, programs_to_fill, vocab_chunks

# Tile width and warps of the per-row kernels; each split covers at least
# MIN_TILES_PER_SPLIT tiles. Small tiles under the interpreter make CPU tests run
# several splits.
ROW_BLOCK_V, ROW_WARPS = (32, 1) if INTERPRET else (2048, 8)
MIN_TILES_PER_SPLIT = 2 if INTERPRET else 8
_LOG2E = tl.constexpr(1.4426950408889634)  # exp(y) = exp2(y * log2(e))


@triton.jit
def _scalar_mask(condition):
    """A scalar condition, to be combined with block masks (``block_mask & flag``): the
    same value, spelled as a select because Triton 3.9's interpreter splats a scalar
    comparison as int32, which ``tl.load`` then refuses as a mask."""
    return tl.where(condition, True, False)


@triton.jit
def _row_is_active(skip_ptr, row, SKIP: tl.constexpr):
    """Whether ``row`` is to be processed: always without SKIP, else skip_ptr[row] == 0."""
    active = tl.full((), 1, tl.int1)
    if SKIP:
        active = _scalar_mask(tl.load(skip_ptr + row) == 0)
    return active


@triton.jit
def _log2_norm(lse_shifted_ptr, rows, mask):
    """The rows' shifted log-normaliser in log2 units, spelled once for every kernel (the
    soft-embedding combine must reproduce the partials' top probability bit for bit)."""
    return tl.load(lse_shifted_ptr + rows, mask=mask, other=0.0) * _LOG2E


@triton.jit
def _load_norm(row_max_ptr, lse_shifted_ptr, rows, mask):
    """(row_max, log2 normaliser) of ``rows``: the ``SoftmaxNorm`` that _tempered_probs reads."""
    return tl.load(row_max_ptr + rows, mask=mask, other=0.0), _log2_norm(lse_shifted_ptr, rows, mask)


@triton.jit
def _tempered_probs(x, row_max, log2_norm, inv_tau):
    """softmax(x / tau) = exp2((x - row_max) * log2(e) / tau - log2_norm) (operands
    broadcast by the caller). The row's maximum gets exactly exp2(-log2_norm)."""
    return tl.exp2((x - row_max) * (inv_tau * _LOG2E) - log2_norm)


@triton.jit
def _first_argmax(best, index, NONE):
    """Reduce per-lane (best value, its index) to the row's: the largest value, and the
    smallest index holding it (torch's tie rule); index 0 when every value is -inf."""
    top = tl.max(best, 0)
    first = tl.min(tl.where(best == top, index, NONE), 0)
    return top, tl.where(top == -float("inf"), 0, first)


@triton.jit
def _load_tile(base, start, end, BLOCK_V: tl.constexpr):
    """The row's entries [start, start + BLOCK_V) as stored, -inf from ``end`` on. The
    passes over phi load the next tile before they reduce this one: loaded at the top
    of the loop, each tile waited a full memory latency, which the block's other warps
    could not always cover (a per-tile maximum puts barriers in the loop)."""
    cols = start + tl.arange(0, BLOCK_V)
    return tl.load(base + cols, mask=cols < end, other=-float("inf"))


@triton.jit
def _row_stats_partial_kernel(
    phi_ptr,  # (N, V) logits, any float dtype, row stride `stride_phi`
    moments_ptr,  # (N, S, 5) fp32 out: per chunk m, sum e^(x-m), sum e^(x-m) (x-m), and the same two at tau
    best_ptr,  # (N, S) fp32 out: chunk maximum
    best_idx_ptr,  # (N, S) int32 out: first index of the chunk maximum
    skip_ptr,  # (N,) int32: rows != 0 are not read (SKIP)
    tile_max_ptr,  # (N, T) fp32 out: each tile's maximum (TILES)
    tile_sum_ptr,  # (N, T) fp32 out: each tile's sum of exp((x - tile max) / tau) (TILES)
    stride_phi,
    V,
    S,
    T,
    chunk,  # vocabulary entries per split, a multiple of BLOCK_V
    inv_tau,
    BLOCK_V: tl.constexpr,
    SKIP: tl.constexpr,
    TILES: tl.constexpr,
):
    """One (row, chunk): online softmax moments at temperatures 1 and tau sharing one
    running maximum m (max(x / tau) = max(x) / tau), and the argmax. The sums are kept
    per lane; the only cross-lane reductions in the loop are the tile maximum and, with
    TILES, the tile's mass at tau (taken against the tile's own maximum, so it does not
    depend on where a chunk starts). The first moments are kept relative to m
    (sum e (x - m)), so the entropies never subtract two numbers of size max / tau (at
    tau = 1e-3 that cost 4e-3). Only a tile that raises m (a handful per row) moves the
    sums to the new origin and looks for its first maximum: the other tiles spend no
    per-element work on either.
    Exponentials are exp2 of log2(e)-scaled arguments: PTX's ex2.approx.ftz, one
    instruction, where tl.exp's lowering adds a denormal fix-up of four per element.
    Terms below 2^-126 of the row's largest are flushed, in sums that are at least 1."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    if _row_is_active(skip_ptr, row, SKIP):
        base = phi_ptr + row * stride_phi
        scale_t = inv_tau * _LOG2E
        m = -float("inf")
        s1 = tl.zeros((BLOCK_V,), tl.float32)
        t1 = tl.zeros((BLOCK_V,), tl.float32)
        st = tl.zeros((BLOCK_V,), tl.float32)
        tt = tl.zeros((BLOCK_V,), tl.float32)
        v_start = split * chunk
        v_end = tl.minimum(v_start + chunk, V)
        argmax = v_start
        ahead = _load_tile(base, v_start, v_end, BLOCK_V)
        for start in range(v_start, v_end, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = ahead.to(tl.float32)
            ahead = _load_tile(base, start + BLOCK_V, v_end, BLOCK_V)
            tile_max = tl.max(x, 0)
            if tile_max > m:  # strict: an earlier tile keeps a tied maximum
                argmax = tl.min(tl.where(x == tile_max, cols, v_end), 0)
                moved = tl.where(m == -float("inf"), 0.0, m - tile_max)  # the old origin, seen from the new
                scale1 = tl.exp2(moved * _LOG2E)
                scalet = tl.exp2(moved * scale_t)
                t1 = (t1 + moved * s1) * scale1
                s1 = s1 * scale1
                tt = (tt + moved * st) * scalet
                st = st * scalet
                m = tile_max
            safe = tl.where(m == -float("inf"), 0.0, m)
            shifted = x - safe
            finite_shifted = tl.maximum(shifted, -3.0e38)  # where x = -inf, e = 0: 0 * (-inf) guarded
            e1 = tl.exp2(shifted * _LOG2E)
            if TILES:
                tile_ref = tl.where(tile_max == -float("inf"), safe, tile_max)  # no finite entry: e = 0
                et_tile = tl.exp2((x - tile_ref) * scale_t)
                tile = row * T + start // BLOCK_V
                tl.store(tile_max_ptr + tile, tile_max)
                tl.store(tile_sum_ptr + tile, tl.sum(et_tile, 0))
                et = et_tile * tl.exp2((tile_ref - safe) * scale_t)
            else:
                et = tl.exp2(shifted * scale_t)
            t1 += e1 * finite_shifted
            s1 += e1
            tt += et * finite_shifted
            st += et
        slot = row * S + split
        moments = moments_ptr + slot * 5
        tl.store(moments, m)
        tl.store(moments + 1, tl.sum(s1, 0))
        tl.store(moments + 2, tl.sum(t1, 0))
        tl.store(moments + 3, tl.sum(st, 0))
        tl.store(moments + 4, tl.sum(tt, 0))
        tl.store(best_ptr + slot, m)
        tl.store(best_idx_ptr + slot, argmax)


@triton.jit
def _row_stats_combine_kernel(
    moments_ptr,  # (N, S, 5) fp32 chunk moments (first moments relative to each chunk's m)
    best_ptr,  # (N, S) fp32 chunk maxima
    best_idx_ptr,  # (N, S) int32 their first indices
    row_max_ptr,  # (N,) fp32 out: max(x)
    lse_tau_shifted_ptr,  # (N,) fp32 out: logsumexp((x - max(x)) / tau)
    lse_1_shifted_ptr,  # (N,) fp32 out: logsumexp(x - max(x))
    entropy_ptr,  # (N,) fp32 out: normalised entropy at temperature 1
    plogp_tau_ptr,  # (N,) fp32 out: sum p log p of softmax(x / tau)
    argmax_ptr,  # (N,) int64 out
    skip_ptr,  # (N,) int32: rows != 0 get 0 outputs (SKIP)
    V,
    S,
    inv_tau,
    inv_log_v,
    BLOCK_S: tl.constexpr,
    SKIP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    active = _row_is_active(skip_ptr, row, SKIP)
    splits = tl.arange(0, BLOCK_S)
    ok = (splits < S) & active
    slots = row * S + splits
    m = tl.load(moments_ptr + slots * 5, mask=ok, other=-float("inf"))
    top = tl.max(m, 0)
    safe = tl.where(top == -float("inf"), 0.0, top)
    scale1 = tl.exp(m - safe)
    scalet = tl.exp((m - safe) * inv_tau)
    chunk_max = tl.where(m == -float("inf"), 0.0, m - safe)  # each chunk's origin, seen from the row's
    s1_c = tl.load(moments_ptr + slots * 5 + 1, mask=ok, other=0.0)
    st_c = tl.load(moments_ptr + slots * 5 + 3, mask=ok, other=0.0)
    s1 = tl.sum(scale1 * s1_c, 0)
    t1 = tl.sum(scale1 * (tl.load(moments_ptr + slots * 5 + 2, mask=ok, other=0.0) + chunk_max * s1_c), 0)
    st = tl.sum(scalet * st_c, 0)
    tt = tl.sum(scalet * (tl.load(moments_ptr + slots * 5 + 4, mask=ok, other=0.0) + chunk_max * st_c), 0)
    best = tl.load(best_ptr + slots, mask=ok, other=-float("inf"))
    _, argmax = _first_argmax(best, tl.load(best_idx_ptr + slots, mask=ok, other=V), V)
    lse1_shifted = tl.log(s1)
    lse_tau_shifted = tl.log(st)
    tl.store(row_max_ptr + row, tl.where(active, safe, 0.0))
    tl.store(lse_tau_shifted_ptr + row, tl.where(active, lse_tau_shifted, 0.0))
    tl.store(lse_1_shifted_ptr + row, tl.where(active, lse1_shifted, 0.0))
    tl.store(entropy_ptr + row, tl.where(active, (lse1_shifted - t1 / s1) * inv_log_v, 0.0))
    tl.store(plogp_tau_ptr + row, tl.where(active, tt / st * inv_tau - lse_tau_shifted, 0.0))
    tl.store(argmax_ptr + row, tl.where(active, argmax, 0).to(tl.int64))


class SoftmaxNorm(NamedTuple):
    """softmax(x / tau) of each row of x as exp((x - row_max) / tau - lse_shifted); (N,)
    fp32 each. What the kernels that read probabilities take."""

    row_max: torch.Tensor
    lse_shifted: torch.Tensor


class TileMasses(NamedTuple):
    """The tempered law's unnormalised mass per tile of ``width`` consecutive tokens,
    tile t covering [t * width, (t + 1) * width): sum over the tile of exp(x / tau) =
    ``sum`` * exp(``max`` / tau), with ``max`` the tile's maximum and ``sum`` =
    sum exp((x - max) / tau) in [1, width]; (N, T) fp32 each (a tile without a finite
    entry: max -inf, sum 0). What the draws of ``sampling.py`` pick a tile by."""

    max: torch.Tensor
    sum: torch.Tensor
    width: int


class RowStats(NamedTuple):
    """Per-row statistics, (N,) each: row_max, lse_tau_shifted, lse_1_shifted, entropy
    (normalised, tau = 1) and plogp_tau (fp32), argmax (int64); ``tiles``: the tempered
    mass per tile when asked for, else None."""

    row_max: torch.Tensor
    lse_tau_shifted: torch.Tensor
    lse_1_shifted: torch.Tensor
    entropy: torch.Tensor
    plogp_tau: torch.Tensor
    argmax: torch.Tensor
    tiles: TileMasses | None = None

    @property
    def tempered(self) -> SoftmaxNorm:
        """softmax(x / tau) at the temperature the stats were taken at."""
        return SoftmaxNorm(self.row_max, self.lse_tau_shifted)


def row_geometry(phi: torch.Tensor, splits: int | None, block_v: int | None) -> tuple[int, int, int]:
    """(tile width, splits, chunk) of a per-row kernel over phi (N, V): enough
    (row, chunk) programs to fill the GPU, each at least MIN_TILES_PER_SPLIT tiles."""
    n, vocab = phi.shape
    block = min(block_v or ROW_BLOCK_V, triton.next_power_of_2(vocab))
    fill = triton.cdiv(programs_to_fill(phi.device, 8), max(n, 1))
    return block, *vocab_chunks(vocab, block * MIN_TILES_PER_SPLIT, fill, splits)


def row_stats(
    phi: torch.Tensor,
    temperature: float,
    skip: torch.Tensor | None = None,
    splits: int | None = None,
    block_v: int | None = None,
    tiles: bool = False,
) -> RowStats:
    """phi (N, V) -> :class:`RowStats`. ``temperature`` must be > 0 (greedy callers need
    only the argmax). Rows where ``skip`` (N,) int32 is nonzero are not read (outputs 0,
    their tile masses unwritten). The vocabulary is split over ``splits`` programs per
    row (default: enough to fill the GPU); ``tiles``: also the tempered mass of every
    tile (:class:`TileMasses`, tiles as wide as this pass's, ``block_v``)."""
    n, vocab = phi.shape
    block, splits, chunk = row_geometry(phi, splits, block_v)
    moments = torch.empty(n, splits, 5, device=phi.device, dtype=torch.float32)
    best = torch.empty(n, splits, device=phi.device, dtype=torch.float32)
    best_idx = torch.empty(n, splits, device=phi.device, dtype=torch.int32)
    count = triton.cdiv(vocab, block)
    tile_max, tile_sum = torch.empty(2, n, count, device=phi.device, dtype=torch.float32) if tiles else (best, best)
    skip_arg = moments if skip is None else skip
    _row_stats_partial_kernel[(n, splits)](
        phi, moments, best, best_idx, skip_arg, tile_max, tile_sum, phi.stride(0), vocab, splits, count, chunk,
        1.0 / temperature, BLOCK_V=block, SKIP=skip is not None, TILES=tiles, num_warps=ROW_WARPS,
        enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    row_max, lse_tau_shifted, lse_1_shifted, entropy, plogp_tau = torch.empty(
        5, n, device=phi.device, dtype=torch.float32
    )
    argmax = torch.empty(n, device=phi.device, dtype=torch.int64)
    _row_stats_combine_kernel[(n,)](
        moments, best, best_idx, row_max, lse_tau_shifted, lse_1_shifted, entropy, plogp_tau, argmax, skip_arg, vocab,
        splits, 1.0 / temperature, 1.0 / math.log(vocab), BLOCK_S=triton.next_power_of_2(splits), SKIP=skip is not None,
        enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    masses = TileMasses(tile_max, tile_sum, block) if tiles else None
    return RowStats(row_max, lse_tau_shifted, lse_1_shifted, entropy, plogp_tau, argmax, masses)
