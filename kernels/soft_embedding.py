"""Expected embedding soft = softmax(phi / tau) @ E and its backward, as tiled GEMMs.

Forward (M = rows, K = vocabulary, N = embedding width; the A operand is computed on
the fly, never stored):
    p    = exp2((x - max) * log2(e) / tau - lse_shifted * log2(e))   (row-stats pass)
    soft = sum over V tiles of p @ E[v_tile]                (tensor cores, fp32 accumulator)
The vocabulary is split into S chunks when the (row block, d block) tiles alone would
not fill the GPU (flash-decoding); each program writes an fp32 partial and a second
small kernel adds the S partials in a fixed order (deterministic, no atomics) and
applies the straight-through mix out = soft + w * (E[token] - soft).
The tensor cores round p to the table's dtype (bf16: 2^-9 relative). For the row's
largest p that error is not small against 1 - p, which is what the backward's
``E_v . g - soft . g`` cancels down to at the argmax of a confident row (a float64
emulation of this arithmetic at V = 152,064, bf16 table, tau = 0.7 gave that gradient
entry the wrong sign in 7 of the 47 rows where fp32 resolves 1 - p_max, all with p_max
in (0.998, 0.99999), and Adam steps on the sign). The combine adds the argmax's rounding
residual (p - round(p)) * E[argmax] back, so soft holds the unrounded top probability;
the other entries' errors stay 2^-9 p_v against O(1) differences.
Programs are numbered so that those sharing a V chunk run together: the phi tile and
the E tile each come from HBM about once and are re-read from L2.

Backward, with g = dL/d out and only the soft path differentiable:
    dphi_v = (1 / tau) p_v (E_v . g - soft . g)
one (row block, V tile) per program with E_v . g = g @ E[v_tile]^T streamed over d;
row blocks vary fastest so programs sharing an E tile run together. The dot rounds g
to the table's dtype (bf16/fp16) as the tensor cores need, and soft . g reads that same
rounded g, so the two terms cancel consistently.
Under the interpreter the dots run in fp32 on operands first cast to the table's
dtype, as on the GPU (the interpreter's cast truncates where the GPU rounds to
nearest), so CPU tests exercise the same cancellations.
No (N, V) tensor is created besides phi and dphi; with an Adam step fused into the
backward (the guidance loop's case) not even dphi: each tile of dphi updates phi and
the Adam moments in place the moment it is computed. With an ``AdamReplay`` the
moments are not stored either: a tile's whole Adam trajectory is recomputed in
registers from the rows before the first step and each step's (N, D) g and per-row
norms, one E . g_s GEMM per past step.

The table may be in another vocabulary (the reward model's own embedding matrix):
with ``table_rows`` (V,) each E tile is gathered row by row through it, so no (V, D)
copy in the logits' vocabulary is needed.

Inactive rows (e.g. committed positions of a denoising canvas) are skipped through a
row list: ``order`` (N,) int32 holds the active rows first and ``count`` (1,) int32
how many there are, both on the device (no host sync, fixed launch grids). Tiles of
list positions >= count read nothing; inactive rows get soft = out = 0 and dphi = 0.
When V and D fill whole tiles (V = 152,064 and d = 1024..4096 do at the GPU tiles) the
GEMM loops load without masks: every row index in a tile is a real row (a row past
the list reads row 0), and what such a row computes is never stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from entrgi_kernels.adam import AdamReplay, AdamUpdate, adam_math, adam_update
from entrgi_kernels.launch import FP_FUSION, INTERPRET, fewest_waves_splits, programs_to_fill, vocab_chunks
from entrgi_kernels.row_stats import SoftmaxNorm, _load_norm, _log2_norm, _scalar_mask, _tempered_probs


@triton.jit
def _list_rows(order_ptr, count_ptr, first, positions, N, ROW_LIST: tl.constexpr):
    """Rows at row-list ``positions`` (a block starting at ``first``): (rows, row_ok,
    live). row_ok marks active rows; live is False when the whole block is inactive.
    Every entry of rows is a row of phi (row 0 past the list's end), so a tile's loads
    need no row mask: what an inactive row computes is never stored."""
    if ROW_LIST:
        count = tl.load(count_ptr)
        rows = tl.load(order_ptr + positions, mask=positions < N, other=0)
        row_ok = positions < count
        live = first < count
    else:
        row_ok = positions < N
        rows = tl.where(row_ok, positions, 0)
        live = first < N
    return rows, row_ok, live


@triton.jit
def _table_row(table_rows_ptr, tokens, ok, GATHER: tl.constexpr):
    """int64 table row of each vocabulary entry: ``table_rows[tokens]`` (GATHER) or the
    token itself."""
    if GATHER:
        rows = tl.load(table_rows_ptr + tokens, mask=ok, other=0).to(tl.int64)
    else:
        rows = tokens.to(tl.int64)
    return rows


@triton.jit
def _soft_partial_kernel(
    phi_ptr,  # (N, V) logits, row stride `stride_phi`
    table_ptr,  # (V_t, D) embedding table, row stride `stride_table`
    table_rows_ptr,  # (V,) int: table row of each vocabulary entry (GATHER)
    row_max_ptr,  # (N,) fp32: max of each row of phi
    lse_shifted_ptr,  # (N,) fp32: logsumexp((x - max) / tau)
    partial_ptr,  # (S, N, D) fp32 out: per-chunk sums of p @ E, by row-list position
    order_ptr,  # (N,) int32 row list, active rows first (ROW_LIST)
    count_ptr,  # (1,) int32 number of active rows (ROW_LIST)
    N,
    V,
    D,
    stride_phi,
    stride_table,
    inv_tau,
    chunk,  # vocabulary entries per split, a multiple of BLOCK_V
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
    ROW_LIST: tl.constexpr,
    GATHER: tl.constexpr,
    EVEN: tl.constexpr,
):
    d_blocks = tl.cdiv(D, BLOCK_D)
    tile = tl.program_id(0)
    split = tl.program_id(1)
    first = (tile // d_blocks) * BLOCK_N
    positions = first + tl.arange(0, BLOCK_N)
    rows, row_ok, live = _list_rows(order_ptr, count_ptr, first, positions, N, ROW_LIST)
    dims = (tile % d_blocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    rows64 = rows.to(tl.int64)
    row_max, log2_norm = _load_norm(row_max_ptr, lse_shifted_ptr, rows64, row_ok)
    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    v_start = split * chunk
    v_end = tl.where(live, tl.minimum(v_start + chunk, V), v_start)
    # pointers advance by a tile (sm_90, triton 3.6: 321 loop instructions, against 341
    # rebuilding them from the row and column indices each iteration)
    cols = v_start + tl.arange(0, BLOCK_V)
    x_ptrs = phi_ptr + rows64[:, None] * stride_phi + cols[None, :]
    e_ptrs = table_ptr + cols.to(tl.int64)[:, None] * stride_table + dims[None, :]  # a table in phi's vocabulary
    for _ in range(v_start, v_end, BLOCK_V):
        col_ok = cols < V  # compiled away where unused (EVEN, no gather)
        if GATHER:  # each entry's table row looked up afresh
            table_rows = _table_row(table_rows_ptr, cols, col_ok, GATHER)
            e_ptrs = table_ptr + table_rows[:, None] * stride_table + dims[None, :]
        if EVEN:
            x = tl.load(x_ptrs).to(tl.float32)
            e = tl.load(e_ptrs)
        else:
            x = tl.load(x_ptrs, mask=col_ok[None, :], other=-float("inf")).to(tl.float32)
            e = tl.load(e_ptrs, mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        p = _tempered_probs(x, row_max[:, None], log2_norm[:, None], inv_tau)
        if DOT_FP32:
            acc += tl.dot(p.to(e.dtype).to(tl.float32), e.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(p.to(e.dtype), e)
        cols += BLOCK_V
        x_ptrs += BLOCK_V
        if not GATHER:
            e_ptrs += BLOCK_V * stride_table
    offsets = (split * N + positions.to(tl.int64))[:, None] * D + dims[None, :]
    tl.store(partial_ptr + offsets, acc, mask=row_ok[:, None] & dim_ok[None, :])


@triton.jit
def _straight_through_kernel(
    partial_ptr,  # (S, N, D) fp32
    table_ptr,  # (V_t, D) embedding table
    table_rows_ptr,  # (V,) int: table row of each vocabulary entry (GATHER)
    tokens_ptr,  # (N,) int64 hard tokens
    argmax_ptr,  # (N,) int64 first argmax of each row of phi
    lse_shifted_ptr,  # (N,) fp32: logsumexp((x - max) / tau)
    weight_ptr,  # (N,) fp32 straight-through weight w
    soft_ptr,  # (N, D) fp32 out: soft (saved for backward)
    out_ptr,  # (N, D) out, table dtype: soft + w (E[token] - soft)
    order_ptr,  # (N,) int32 row list (ROW_LIST)
    count_ptr,  # (1,) int32 number of active rows (ROW_LIST)
    N,
    D,
    S,
    stride_table,
    BLOCK_D: tl.constexpr,
    ROW_LIST: tl.constexpr,
    GATHER: tl.constexpr,
):
    position = tl.program_id(0)
    row, active, _ = _list_rows(order_ptr, count_ptr, position, position, N, ROW_LIST)
    row, active = row.to(tl.int64), _scalar_mask(active)
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    soft = tl.zeros((BLOCK_D,), tl.float32)
    for split in range(tl.where(active, S, 0)):
        soft += tl.load(partial_ptr + (split * N + position) * D + dims, mask=dim_ok, other=0.0)
    # the partials' dot read the argmax's p = exp2(-log2_norm) rounded to the table's dtype
    p_top = tl.exp2(-_log2_norm(lse_shifted_ptr, row, active))
    residual = p_top - p_top.to(table_ptr.dtype.element_ty).to(tl.float32)
    top = _table_row(table_rows_ptr, tl.load(argmax_ptr + row), active, GATHER)
    soft += residual * tl.load(table_ptr + top * stride_table + dims, mask=dim_ok & active, other=0.0).to(tl.float32)
    token = _table_row(table_rows_ptr, tl.load(tokens_ptr + row), active, GATHER)
    w = tl.load(weight_ptr + row)
    hard = tl.load(table_ptr + token * stride_table + dims, mask=dim_ok & active, other=0.0).to(tl.float32)
    out = tl.where(active, soft + w * (hard - soft), 0.0)
    tl.store(soft_ptr + row * D + dims, soft, mask=dim_ok)
    tl.store(out_ptr + row * D + dims, out.to(out_ptr.dtype.element_ty), mask=dim_ok)


@triton.jit
def _grad_times_table(
    grad_ptr, table_ptr, table_rows, rows64, row_ok, col_ok, d_end, D, stride_table,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr, EVEN: tl.constexpr,
):  # fmt: skip
    """(BLOCK_N, BLOCK_V) fp32 tile of E[table_rows] . g per (row, column), streamed over
    the first ``d_end`` of D (0: a zero tile, nothing read). ``grad_ptr``: contiguous (N, D);
    ``rows64`` and ``table_rows`` index real rows. EVEN (D a multiple of BLOCK_D, every
    column in V): loads without masks."""
    eg = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for start in range(0, d_end, BLOCK_D):
        dims = start + tl.arange(0, BLOCK_D)
        g_ptrs = grad_ptr + rows64[:, None] * D + dims[None, :]
        e_ptrs = table_ptr + table_rows[None, :] * stride_table + dims[:, None]  # (D tile, V tile): E transposed
        if EVEN:
            g = tl.load(g_ptrs)
            e_t = tl.load(e_ptrs)
        else:
            dim_ok = dims < D
            g = tl.load(g_ptrs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
            e_t = tl.load(e_ptrs, mask=dim_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_FP32:
            eg += tl.dot(g, e_t.to(tl.float32), input_precision="ieee")
        else:
            eg += tl.dot(g, e_t)
    return eg


@triton.jit
def _soft_grad(x, eg, row_max_ptr, lse_shifted_ptr, soft_dot_grad_ptr, rows64, row_ok, inv_tau):
    """dphi = (1 / tau) p (E . g - soft . g) of a tile: ``x`` its fp32 logits, ``eg`` its
    E . g (:func:`_grad_times_table`), the rows' norms and soft . g read at ``rows64``."""
    row_max, log2_norm = _load_norm(row_max_ptr, lse_shifted_ptr, rows64, row_ok)
    sg = tl.load(soft_dot_grad_ptr + rows64, mask=row_ok, other=0.0)
    p = _tempered_probs(x, row_max[:, None], log2_norm[:, None], inv_tau)
    return p * (eg - sg[:, None]) * inv_tau


@triton.jit
def _stepping_rows(skip_ptr, rows64, row_ok, SKIP: tl.constexpr):
    """The rows of ``row_ok`` that take the Adam step: those not marked in skip (SKIP)."""
    moving = row_ok
    if SKIP:
        moving = moving & (tl.load(skip_ptr + rows64, mask=row_ok, other=1) == 0)
    return moving


@triton.jit
def _soft_embedding_bwd_kernel(
    phi_ptr,  # (N, V) logits
    table_ptr,  # (V_t, D) embedding table
    table_rows_ptr,  # (V,) int: table row of each vocabulary entry (GATHER)
    grad_ptr,  # (N, D) incoming gradient g rounded to the table's dtype, contiguous; fp32 storage if DOT_FP32
    row_max_ptr,  # (N,) fp32: max of each row of phi
    lse_shifted_ptr,  # (N,) fp32: logsumexp((x - max) / tau)
    soft_dot_grad_ptr,  # (N,) fp32: soft . g (the same rounded g)
    dphi_ptr,  # (N, V) out, phi's dtype, row stride `stride_dphi` (not ADAM)
    order_ptr,  # (N,) int32 row list (ROW_LIST)
    count_ptr,  # (1,) int32 number of active rows (ROW_LIST)
    exp_avg_ptr,  # (N, V) fp32 or bf16 Adam first moment, in place (ADAM)
    exp_avg_sq_ptr,  # (N, V) fp32 or bf16 Adam second moment, in place (ADAM)
    skip_ptr,  # (N,) int32: rows != 0 take no Adam step (ADAM and SKIP)
    N,
    V,
    D,
    stride_phi,
    stride_table,
    stride_dphi,
    inv_tau,
    lr_corrected,
    weight1,  # 1 - beta1
    beta2,
    weight2,  # 1 - beta2
    inv_bias2_sqrt,
    eps,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
    ROW_LIST: tl.constexpr,
    ADAM: tl.constexpr,
    SKIP: tl.constexpr,
    GATHER: tl.constexpr,
    EVEN: tl.constexpr,
):
    first = tl.program_id(0) * BLOCK_N
    positions = first + tl.arange(0, BLOCK_N)
    rows, row_ok, live = _list_rows(order_ptr, count_ptr, first, positions, N, ROW_LIST)
    in_list = positions < N  # inactive rows in the list still get dphi = 0 written
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    rows64 = rows.to(tl.int64)
    table_rows = _table_row(table_rows_ptr, cols, col_ok, GATHER)
    eg = _grad_times_table(grad_ptr, table_ptr, table_rows, rows64, row_ok, col_ok, tl.where(live, D, 0), D,
                           stride_table, BLOCK_N, BLOCK_V, BLOCK_D, DOT_FP32, EVEN)  # fmt: skip
    x = tl.load(
        phi_ptr + rows64[:, None] * stride_phi + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
        other=-float("inf"),
    ).to(tl.float32)  # fmt: skip
    dphi = _soft_grad(x, eg, row_max_ptr, lse_shifted_ptr, soft_dot_grad_ptr, rows64, row_ok, inv_tau)
    if ADAM:  # phi (contiguous fp32) takes its Adam step here; dphi is never stored
        moving = _stepping_rows(skip_ptr, rows64, row_ok, SKIP)
        adam_update(phi_ptr, exp_avg_ptr, exp_avg_sq_ptr, rows64[:, None] * V + cols[None, :],
                    moving[:, None] & col_ok[None, :], x, dphi, lr_corrected, weight1, beta2, weight2, inv_bias2_sqrt,
                    eps)  # fmt: skip
    else:
        tl.store(
            dphi_ptr + rows64[:, None] * stride_dphi + cols[None, :],
            dphi.to(dphi_ptr.dtype.element_ty), mask=in_list[:, None] & col_ok[None, :],
        )  # fmt: skip


@triton.jit
def _adam_replay_kernel(
    phi_ptr,  # (N, V) fp32 out: the rows after step `steps` (moving rows only), contiguous
    anchor_ptr,  # (N, V) the rows before step 1, any float dtype, contiguous
    table_ptr,  # (V_t, D) embedding table
    table_rows_ptr,  # (V,) int: table row of each vocabulary entry (GATHER)
    grads_ptr,  # (S, N, D) g of each step, the dot's operand dtype
    stats_ptr,  # (3, S, N) fp32: row_max, lse_shifted of phi_s, soft_s . g_s
    scalars_ptr,  # (S, 2) fp32: lr / (1 - beta1^t), 1 / sqrt(1 - beta2^t)
    order_ptr,  # (N,) int32 row list (ROW_LIST)
    count_ptr,  # (1,) int32 number of active rows (ROW_LIST)
    skip_ptr,  # (N,) int32: rows != 0 take no step (SKIP)
    N,
    V,
    D,
    steps,  # number of steps to replay (>= 1)
    max_steps,  # S
    stride_table,
    inv_tau,
    weight1,  # 1 - beta1
    beta2,
    weight2,  # 1 - beta2
    eps,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
    ROW_LIST: tl.constexpr,
    SKIP: tl.constexpr,
    GATHER: tl.constexpr,
    EVEN: tl.constexpr,
):
    """Adam steps 1..steps of a (row block, V tile) replayed in registers from the
    anchor: the same per-step arithmetic as _soft_embedding_bwd_kernel with ADAM."""
    first = tl.program_id(0) * BLOCK_N
    positions = first + tl.arange(0, BLOCK_N)
    rows, row_ok, live = _list_rows(order_ptr, count_ptr, first, positions, N, ROW_LIST)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    rows64 = rows.to(tl.int64)
    moving = _stepping_rows(skip_ptr, rows64, row_ok, SKIP)
    offsets = rows64[:, None] * V + cols[None, :]
    ok = moving[:, None] & col_ok[None, :]
    table_rows = _table_row(table_rows_ptr, cols, col_ok, GATHER)
    x = tl.load(anchor_ptr + offsets, mask=ok, other=-float("inf")).to(tl.float32)
    m = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    v = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for step in range(0, tl.where(live, steps, 0)):
        grads = grads_ptr + (step * N).to(tl.int64) * D
        eg = _grad_times_table(grads, table_ptr, table_rows, rows64, moving, col_ok, D, D, stride_table,
                               BLOCK_N, BLOCK_V, BLOCK_D, DOT_FP32, EVEN)  # fmt: skip
        stats = stats_ptr + step * N
        dphi = _soft_grad(x, eg, stats, stats + max_steps * N, stats + 2 * max_steps * N, rows64, moving, inv_tau)
        lr_corrected = tl.load(scalars_ptr + 2 * step)
        inv_bias2_sqrt = tl.load(scalars_ptr + 2 * step + 1)
        x, m, v = adam_math(x, dphi, m, v, lr_corrected, weight1, beta2, weight2, inv_bias2_sqrt, eps)
    tl.store(phi_ptr + offsets, x, mask=ok)


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch options of one GEMM-shaped kernel."""

    block_n: int
    block_v: int
    block_d: int
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        # tl.dot needs every matrix dimension >= 16 on GPUs (the interpreter takes less)
        for name in ("block_n", "block_v", "block_d"):
            size = getattr(self, name)
            if size < 16 or size & (size - 1):
                raise ValueError(f"TileConfig.{name} must be a power of two >= 16, got {size}")


# FORWARD_GPU and BACKWARD_GPU were chosen by the sweep in bench/ on an H100 (bf16 phi,
# dphi stored; see bench/RESULTS.md). An fp32 phi or the fused Adam step keeps more of
# the tile live than BACKWARD_GPU's 4 warps hold in 255 registers each (ptxas for
# sm_90: 0.2 to 4 KB of spill stores per thread), so those backwards run half the tile
# over 8 warps, spill-free. bench/kernel_resources.py compiles every kernel variant for
# sm_90 and reports registers and spills. The interpreter runs one program at a time:
# small tiles keep CPU tests fast.
FORWARD_GPU = TileConfig(block_n=128, block_v=64, block_d=256, num_warps=8, num_stages=3)
BACKWARD_GPU = TileConfig(block_n=128, block_v=128, block_d=64, num_warps=4, num_stages=3)
BACKWARD_GPU_HALF_TILE = TileConfig(block_n=64, block_v=128, block_d=64, num_warps=8, num_stages=3)
INTERPRETER = TileConfig(block_n=16, block_v=64, block_d=64, num_warps=1, num_stages=1)


def _fit(config: TileConfig, d: int) -> TileConfig:
    block_d = min(config.block_d, max(16, triton.next_power_of_2(d)))
    return TileConfig(config.block_n, config.block_v, block_d, config.num_warps, config.num_stages)


def backward_config(phi: torch.Tensor, adam: AdamUpdate | AdamReplay | None) -> TileConfig:
    """The backward's default tiles for ``phi``'s dtype, with or without an Adam step
    fused (before fitting block_d to the table's width)."""
    if INTERPRET:
        return INTERPRETER
    return BACKWARD_GPU_HALF_TILE if adam is not None or phi.dtype == torch.float32 else BACKWARD_GPU


def _even(vocab: int, d: int, config: TileConfig) -> bool:
    """Whether V and D fill whole tiles: the GEMM loops then load without masks (the bf16
    forward's loop, pointers rebuilt each iteration: 432 instructions per thread masked,
    341 unmasked; sm_90, triton 3.6)."""
    return vocab % config.block_v == 0 and d % config.block_d == 0


def _dot_fp32(table: torch.Tensor) -> bool:
    """The interpreter computes bf16/fp16 dots incorrectly: fp32 operands there."""
    return INTERPRET or table.dtype == torch.float32


def _gather_arg(table_rows: torch.Tensor | None, table: torch.Tensor) -> torch.Tensor:
    """The kernels' table_rows pointer (the table itself, unread, without a gather)."""
    return table if table_rows is None else table_rows


def _row_list_args(row_list, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    if row_list is None:
        unused = torch.empty(1, device=device, dtype=torch.int32)
        return unused, unused
    order, count = row_list
    if order.shape != (n,) or order.dtype != torch.int32 or count.shape != (1,) or count.dtype != torch.int32:
        raise ValueError("row_list must be (order (N,) int32, count (1,) int32)")
    return order, count


def soft_embedding_forward(
    phi, table, norm: SoftmaxNorm, argmax, weights, tokens, temperature, row_list=None,
    config: TileConfig | None = None, table_rows: torch.Tensor | None = None, splits: int | None = None,
):  # fmt: skip
    """Returns soft (N, D) fp32 and out (N, D) in the table's dtype. ``norm`` and
    ``argmax`` (N,) are ``row_stats(phi, temperature)``'s (``.tempered``, ``.argmax``). ``row_list``
    (order, count) restricts the work to the active rows (others: zeros).
    ``table_rows`` (V,) int32/int64: vocabulary entry v reads ``table[table_rows[v]]``
    (a table in another vocabulary, gathered in the kernel instead of copied).
    ``splits``: programs per (row block, d block) tile along V. Default: up to two per
    SM, in whole waves of one program per SM (an SM holds one forward program: see
    the compile report in bench/RESULTS.md)."""
    n, vocab = phi.shape
    d = table.shape[1]
    cfg = _fit(config or (INTERPRETER if INTERPRET else FORWARD_GPU), d)
    tiles = triton.cdiv(n, cfg.block_n) * triton.cdiv(d, cfg.block_d)
    most = triton.cdiv(programs_to_fill(phi.device, 2), max(tiles, 1))
    if splits is None:
        splits = fewest_waves_splits(tiles, most, programs_to_fill(phi.device, 1))
    splits, chunk = vocab_chunks(vocab, cfg.block_v, most, splits)
    partial = torch.empty(splits, n, d, device=phi.device, dtype=torch.float32)
    order, count = _row_list_args(row_list, n, phi.device)
    _soft_partial_kernel[(tiles, splits)](
        phi, table, _gather_arg(table_rows, table), *norm, partial, order, count, n, vocab, d, phi.stride(0),
        table.stride(0), 1.0 / temperature, chunk, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
        DOT_FP32=_dot_fp32(table), ROW_LIST=row_list is not None, GATHER=table_rows is not None,
        EVEN=_even(vocab, d, cfg), num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    soft = torch.empty(n, d, device=phi.device, dtype=torch.float32)
    out = torch.empty(n, d, device=phi.device, dtype=table.dtype)
    block_d = min(1024, triton.next_power_of_2(d))
    _straight_through_kernel[(n, triton.cdiv(d, block_d))](
        partial, table, _gather_arg(table_rows, table), tokens, argmax, norm.lse_shifted, weights, soft, out, order,
        count, n, d, splits, table.stride(0), BLOCK_D=block_d, ROW_LIST=row_list is not None,
        GATHER=table_rows is not None, enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    return soft, out


def soft_embedding_backward(
    phi, table, grad, norm: SoftmaxNorm, soft, temperature, row_list=None,
    adam: AdamUpdate | AdamReplay | None = None, config: TileConfig | None = None,
    table_rows: torch.Tensor | None = None,
):  # fmt: skip
    """dphi (N, V) in phi's dtype for the incoming gradient ``grad`` (N, D); rows
    outside ``row_list`` get dphi = 0 without reading phi or the table. ``norm``,
    ``table_rows`` as in :func:`soft_embedding_forward`.

    With ``adam`` the kernel applies that Adam step to phi (contiguous fp32) in place
    instead, from the dphi tile in registers, and returns None: dphi is never stored.
    An :class:`AdamReplay` records this step's factors and recomputes every step so far
    from its anchor (no moments read or written). Rows outside ``row_list`` and rows in
    ``adam.skip`` are not touched."""
    n, vocab = phi.shape
    d = table.shape[1]
    cfg = _fit(config or backward_config(phi, adam), d)
    # g rounded once to the dot's operand dtype; soft . g reads the same rounded g
    grad_operand = grad.to(table.dtype)
    soft_dot_grad = (soft * grad_operand).sum(-1, dtype=torch.float32)
    grad_operand = (grad_operand.float() if _dot_fp32(table) else grad_operand).contiguous()
    if isinstance(adam, AdamReplay):
        adam.check(phi)
        adam.record(grad_operand, *norm, soft_dot_grad, table, table_rows, temperature)
        _replay_adam(phi, table, adam, temperature, row_list, cfg, table_rows)
        return None
    if adam is None:
        dphi = torch.empty_like(phi)
        exp_avg = exp_avg_sq = skip = dphi
        scalars = (0.0,) * 6
    else:
        adam.check(phi)
        dphi, exp_avg, exp_avg_sq = phi, adam.exp_avg, adam.exp_avg_sq
        skip = phi if adam.skip is None else adam.skip
        scalars = adam.scalars()
    order, count = _row_list_args(row_list, n, phi.device)
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(vocab, cfg.block_v))
    _soft_embedding_bwd_kernel[grid](
        phi, table, _gather_arg(table_rows, table), grad_operand, *norm, soft_dot_grad, dphi, order, count,
        exp_avg, exp_avg_sq, skip, n, vocab, d, phi.stride(0), table.stride(0), dphi.stride(0), 1.0 / temperature,
        *scalars,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, DOT_FP32=_dot_fp32(table),
        ROW_LIST=row_list is not None, ADAM=adam is not None, SKIP=adam is not None and adam.skip is not None,
        GATHER=table_rows is not None, EVEN=_even(vocab, d, cfg), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    return None if adam is not None else dphi


def _replay_adam(phi, table, replay: AdamReplay, temperature, row_list, cfg: TileConfig, table_rows) -> None:
    """Launch the replay of ``replay``'s recorded steps onto phi (see :class:`AdamReplay`)."""
    n, vocab = phi.shape
    d = table.shape[1]
    order, count = _row_list_args(row_list, n, phi.device)
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(vocab, cfg.block_v))
    _adam_replay_kernel[grid](
        phi, replay.anchor, table, _gather_arg(table_rows, table), replay.grads, replay.stats, replay.scalars, order,
        count, phi if replay.skip is None else replay.skip, n, vocab, d, replay.steps, replay.max_steps,
        table.stride(0), 1.0 / temperature, 1 - replay.beta1, replay.beta2,
        1 - replay.beta2, replay.eps,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, DOT_FP32=_dot_fp32(table),
        ROW_LIST=row_list is not None, SKIP=replay.skip is not None, GATHER=table_rows is not None,
        EVEN=_even(vocab, d, cfg), num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
