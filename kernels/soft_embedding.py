"""Expected embedding soft = softmax(phi / tau) @ E and its backward, tile by tile.

Forward, per block of BLOCK_N rows and BLOCK_D embedding columns, streaming V:
    p    = exp(x / tau - lse_tau)                 (lse_tau from the row-stats pass)
    soft += p @ E[v_tile, d_tile]                 (tensor cores, fp32 accumulator)
    out  = soft + w * (E[token] - soft)           (the straight-through mix)
Backward, with g = dL/d out and only the soft path differentiable:
    dphi_v = (1 / tau) p_v (E_v . g - soft . g)
computed per (row block, V tile) with E_v . g = g @ E[v_tile]^T streamed over d.
No (N, V) tensor is created besides phi and dphi.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# The interpreter computes bf16/fp16 dots incorrectly: cast operands to fp32 there.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _soft_embedding_fwd_kernel(
    phi_ptr,  # (N, V) logits, row stride `stride_phi`
    table_ptr,  # (V, D) embedding table, row stride `stride_table`
    lse_tau_ptr,  # (N,) fp32
    weight_ptr,  # (N,) fp32 straight-through weight w
    tokens_ptr,  # (N,) int64 hard tokens
    soft_ptr,  # (N, D) fp32 out: soft (saved for backward)
    out_ptr,  # (N, D) out, table dtype: soft + w (E[token] - soft)
    N,
    V,
    D,
    stride_phi,
    stride_table,
    inv_tau,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < N
    dim_ok = dims < D
    rows64 = rows.to(tl.int64)
    lse = tl.load(lse_tau_ptr + rows, mask=row_ok, other=0.0)
    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        x = tl.load(
            phi_ptr + rows64[:, None] * stride_phi + cols[None, :],
            mask=row_ok[:, None] & col_ok[None, :], other=-float("inf"),
        ).to(tl.float32)  # fmt: skip
        p = tl.exp(x * inv_tau - lse[:, None])
        e = tl.load(
            table_ptr + cols.to(tl.int64)[:, None] * stride_table + dims[None, :],
            mask=col_ok[:, None] & dim_ok[None, :], other=0.0,
        )  # fmt: skip
        if DOT_FP32:
            acc += tl.dot(p, e.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(p.to(e.dtype), e)
    tokens = tl.load(tokens_ptr + rows, mask=row_ok, other=0)
    w = tl.load(weight_ptr + rows, mask=row_ok, other=0.0)
    hard = tl.load(
        table_ptr + tokens[:, None] * stride_table + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0
    ).to(tl.float32)
    out = acc + w[:, None] * (hard - acc)
    offsets = rows64[:, None] * D + dims[None, :]
    mask = row_ok[:, None] & dim_ok[None, :]
    tl.store(soft_ptr + offsets, acc, mask=mask)
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _soft_embedding_bwd_kernel(
    phi_ptr,  # (N, V) logits
    table_ptr,  # (V, D) embedding table
    grad_ptr,  # (N, D) fp32 incoming gradient g, contiguous
    lse_tau_ptr,  # (N,) fp32
    soft_dot_grad_ptr,  # (N,) fp32: soft . g
    dphi_ptr,  # (N, V) out, phi's dtype, row stride `stride_dphi`
    N,
    V,
    D,
    stride_phi,
    stride_table,
    stride_dphi,
    inv_tau,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < V
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    eg = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for start in range(0, D, BLOCK_D):
        dims = start + tl.arange(0, BLOCK_D)
        dim_ok = dims < D
        g = tl.load(grad_ptr + rows64[:, None] * D + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        e_t = tl.load(
            table_ptr + cols64[None, :] * stride_table + dims[:, None],
            mask=dim_ok[:, None] & col_ok[None, :], other=0.0,
        )  # fmt: skip  (D tile, V tile): E transposed
        if DOT_FP32:
            eg += tl.dot(g, e_t.to(tl.float32), input_precision="ieee")
        else:
            eg += tl.dot(g.to(e_t.dtype), e_t)
    x = tl.load(
        phi_ptr + rows64[:, None] * stride_phi + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
        other=-float("inf"),
    ).to(tl.float32)  # fmt: skip
    lse = tl.load(lse_tau_ptr + rows, mask=row_ok, other=0.0)
    sg = tl.load(soft_dot_grad_ptr + rows, mask=row_ok, other=0.0)
    p = tl.exp(x * inv_tau - lse[:, None])
    dphi = p * (eg - sg[:, None]) * inv_tau
    tl.store(
        dphi_ptr + rows64[:, None] * stride_dphi + cols[None, :],
        dphi.to(dphi_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :],
    )  # fmt: skip


def _blocks(d: int) -> tuple[int, int, int]:
    block_d = min(128, max(16, triton.next_power_of_2(d)))
    return 16, 64, block_d


def soft_embedding_forward(phi, table, lse_tau, weights, tokens, temperature):
    """Returns soft (N, D) fp32 and out (N, D) in the table's dtype."""
    n, vocab = phi.shape
    d = table.shape[1]
    soft = torch.empty(n, d, device=phi.device, dtype=torch.float32)
    out = torch.empty(n, d, device=phi.device, dtype=table.dtype)
    block_n, block_v, block_d = _blocks(d)
    grid = (triton.cdiv(n, block_n), triton.cdiv(d, block_d))
    _soft_embedding_fwd_kernel[grid](
        phi, table, lse_tau, weights, tokens, soft, out, n, vocab, d, phi.stride(0), table.stride(0),
        1.0 / temperature, BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d,
        DOT_FP32=_INTERPRET or table.dtype == torch.float32,
    )  # fmt: skip
    return soft, out


def soft_embedding_backward(phi, table, grad, lse_tau, soft, temperature):
    """dphi (N, V) in phi's dtype for the incoming gradient ``grad`` (N, D)."""
    n, vocab = phi.shape
    d = table.shape[1]
    grad = grad.float().contiguous()
    soft_dot_grad = (soft * grad).sum(-1)
    dphi = torch.empty_like(phi)
    block_n, block_v, block_d = _blocks(d)
    grid = (triton.cdiv(n, block_n), triton.cdiv(vocab, block_v))
    _soft_embedding_bwd_kernel[grid](
        phi, table, grad, lse_tau, soft_dot_grad, dphi, n, vocab, d, phi.stride(0), table.stride(0),
        dphi.stride(0), 1.0 / temperature, BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d,
        DOT_FP32=_INTERPRET or table.dtype == torch.float32,
    )  # fmt: skip
    return dphi
