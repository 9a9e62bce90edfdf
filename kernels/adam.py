"""Adam on the logits in one pass: reads param, grad and both moments once, writes
param and moments once (torch's unfused update makes about twice the passes).

The same update also runs inside the soft-embedding backward (``soft_embedding``),
where the gradient is never stored: :func:`adam_math` is the shared arithmetic,
:class:`AdamUpdate` one step's stored moments and scalars, and :class:`AdamReplay`
the history from which that backward recomputes the moments instead of storing them.

Rows marked in ``skip`` are not touched: a committed position's logits have zero
gradient and zero moments, so Adam would leave them unchanged anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from entrgi_kernels.launch import FP_FUSION
from entrgi_kernels.rounding import round_to
from entrgi_kernels.row_stats import _row_is_active


MOMENT_DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class AdamUpdate:
    """Step ``step`` (>= 1) of ``torch.optim.Adam`` (no weight decay) on contiguous
    (N, V) fp32 rows: the moments (fp32, or bf16 to halve their memory at the cost of
    rounding them each step), updated in place, and the scalars. Rows where ``skip``
    (N,) int32 is nonzero are not touched."""

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: int
    lr: float
    beta1: float
    beta2: float
    eps: float
    skip: torch.Tensor | None = None

    def scalars(self) -> tuple[float, float, float, float, float, float]:
        """(lr / (1 - beta1^t), 1 - beta1, beta2, 1 - beta2, 1 / sqrt(1 - beta2^t), eps),
        the kernels' order."""
        bias1, bias2 = 1 - self.beta1**self.step, 1 - self.beta2**self.step
        return self.lr / bias1, 1 - self.beta1, self.beta2, 1 - self.beta2, 1.0 / bias2**0.5, self.eps

    def check(self, param: torch.Tensor) -> None:
        if not param.is_contiguous() or param.dtype != torch.float32:
            raise ValueError(f"the Adam param must be a contiguous float32 tensor, got {param.dtype}")
        for name, t in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
            if t.shape != param.shape or not t.is_contiguous() or t.dtype not in MOMENT_DTYPES:
                raise ValueError(
                    f"{name} must be contiguous float32 or bfloat16 with shape {tuple(param.shape)}, "
                    f"got {t.dtype} {tuple(t.shape)}"
                )
        if self.step < 1:
            raise ValueError(f"Adam step counts start at 1, got {self.step}")


class AdamReplay:
    """Steps of ``torch.optim.Adam`` (no weight decay) on contiguous (N, V) fp32 rows
    whose gradients are the soft-embedding backward's
    ``dphi_s = (1 / tau) p_s (E g_s - soft_s . g_s)``, without storing the moments.

    Each step recomputes the rows' whole trajectory, tile by tile in registers, from
    ``anchor`` (N, V) (the rows before step 1, any float dtype: e.g. the denoiser's
    bf16 logits that the fp32 rows were cast from) and every step's per-row factors:
    g_s (N, D) in the dot's operand dtype and three (N,) fp32 scalars (the SoftmaxNorm
    of phi_s and soft_s . g_s), a few MB for ``max_steps`` steps instead of two (N, V)
    moments. The arithmetic and its order are the stored-fp32-moment update's, so the
    rows come out the same. Step t costs t GEMMs of the backward's size instead of one
    and reads the anchor instead of reading and writing both moments.

    ``record`` stores a step's factors (the backward launcher calls it); the history
    is allocated on the first step, when N, D and the operand dtype are known. Rows
    where ``skip`` (N,) int32 is nonzero are not touched."""

    def __init__(self, anchor: torch.Tensor, max_steps: int, lr: float, beta1: float, beta2: float, eps: float,
                 skip: torch.Tensor | None = None):  # fmt: skip
        if anchor.dim() != 2 or not anchor.is_contiguous() or not anchor.is_floating_point():
            raise ValueError(f"anchor must be contiguous (N, V) floats, got {anchor.dtype} {tuple(anchor.shape)}")
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps must be an int >= 1, got {max_steps!r}")
        self.anchor, self.max_steps, self.skip = anchor, max_steps, skip
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        # per step: lr / (1 - beta1^t), 1 / sqrt(1 - beta2^t), in float64 then rounded once,
        # as AdamUpdate.scalars() reaches its kernels (device ops: capturable)
        t = torch.arange(1, max_steps + 1, dtype=torch.float64, device=anchor.device)
        self.scalars = torch.stack([lr / (1 - beta1**t), 1 / (1 - beta2**t).sqrt()], dim=1).float()
        self.steps = 0
        self.grads = self.stats = None  # (S, N, D) g_s; (3, S, N) row_max, lse_shifted, soft . g
        self._table = None

    def check(self, param: torch.Tensor) -> None:
        if not param.is_contiguous() or param.dtype != torch.float32 or param.shape != self.anchor.shape:
            raise ValueError(
                f"the Adam param must be a contiguous float32 tensor of the anchor's shape "
                f"{tuple(self.anchor.shape)}, got {param.dtype} {tuple(param.shape)}"
            )

    def record(self, grad_operand, row_max, lse_shifted, soft_dot_grad, table, table_rows, temperature) -> None:
        """Store the next step's factors. Every step must read the same ``table`` (and
        ``table_rows``) at the same ``temperature``: the replay reads them for all past steps."""
        if self.steps == self.max_steps:
            raise RuntimeError(f"this Adam replay holds max_steps={self.max_steps} steps; all are taken")
        rows_key = None if table_rows is None else (table_rows.data_ptr(), table_rows.shape)
        key = (table.data_ptr(), tuple(table.shape), table.stride(), rows_key, temperature)
        if self.grads is None:
            self.grads = grad_operand.new_empty(self.max_steps, *grad_operand.shape)
            self.stats = torch.empty(3, self.max_steps, grad_operand.shape[0], device=grad_operand.device)
            self._table = key
        elif key != self._table:
            raise ValueError("every step of an Adam replay must read the same table at the same temperature")
        self.grads[self.steps].copy_(grad_operand)
        for slot, values in zip(self.stats, (row_max, lse_shifted, soft_dot_grad)):
            slot[self.steps].copy_(values)
        self.steps += 1


@triton.jit
def adam_math(p, g, m, v, lr_corrected, weight1, beta2, weight2, inv_bias2_sqrt, eps):
    """One Adam step in fp32 registers: (param, gradient, moments) -> (param, moments).
    Every kernel that steps Adam spells it here, so their results agree bit for bit.
    ``weight1`` = 1 - beta1 and ``weight2`` = 1 - beta2 come rounded once from float64,
    as torch passes them: 1 - float32(0.999) is 1.3e-5 off 0.001, which moved a 4-step
    Adam at lr 0.5 by 1.4e-5 from torch's."""
    m = m + weight1 * (g - m)  # torch's lerp
    v = beta2 * v + weight2 * g * g
    p = p - lr_corrected * m / (tl.sqrt(v) * inv_bias2_sqrt + eps)
    return p, m, v


@triton.jit
def adam_update(
    param_ptr, exp_avg_ptr, exp_avg_sq_ptr, offsets, ok, p, g, lr_corrected, weight1, beta2, weight2, inv_bias2_sqrt,
    eps,
):  # fmt: skip
    """One Adam step on a tile: ``p`` (fp32 param values) and ``g`` (fp32 gradient) at
    ``offsets`` (where ``ok``); loads the moments and stores param and moments there.
    The update is computed in fp32; bf16 moments are rounded once, when stored."""
    m = tl.load(exp_avg_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    v = tl.load(exp_avg_sq_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    p, m, v = adam_math(p, g, m, v, lr_corrected, weight1, beta2, weight2, inv_bias2_sqrt, eps)
    tl.store(exp_avg_ptr + offsets, round_to(m, exp_avg_ptr.dtype.element_ty), mask=ok)
    tl.store(exp_avg_sq_ptr + offsets, round_to(v, exp_avg_sq_ptr.dtype.element_ty), mask=ok)
    tl.store(param_ptr + offsets, p, mask=ok)


@triton.jit
def _adam_kernel(
    param_ptr,  # (N, V) fp32, updated in place
    grad_ptr,  # (N, V) gradient, any float dtype
    exp_avg_ptr,  # (N, V) fp32 or bf16 first moment, in place
    exp_avg_sq_ptr,  # (N, V) fp32 or bf16 second moment, in place
    skip_ptr,  # (N,) int32: rows != 0 are left untouched (SKIP)
    V,
    lr_corrected,  # lr / (1 - beta1^t)
    weight1,  # 1 - beta1
    beta2,
    weight2,  # 1 - beta2
    inv_bias2_sqrt,  # 1 / sqrt(1 - beta2^t)
    eps,
    BLOCK_V: tl.constexpr,
    SKIP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    ok = (cols < V) & _row_is_active(skip_ptr, row, SKIP)
    offsets = row * V + cols
    g = tl.load(grad_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    p = tl.load(param_ptr + offsets, mask=ok, other=0.0)
    adam_update(param_ptr, exp_avg_ptr, exp_avg_sq_ptr, offsets, ok, p, g, lr_corrected, weight1, beta2,
                weight2, inv_bias2_sqrt, eps)  # fmt: skip


def adam_step(param: torch.Tensor, grad: torch.Tensor, update: AdamUpdate, block_v: int = 1024) -> None:
    """Apply ``update`` to contiguous (N, V) fp32 ``param`` with gradient ``grad``, in place."""
    update.check(param)
    if grad.shape != param.shape or not grad.is_contiguous():
        raise ValueError(f"grad must be contiguous with shape {tuple(param.shape)}")
    n, vocab = param.shape
    block = min(block_v, triton.next_power_of_2(vocab))
    skip = update.skip
    _adam_kernel[(n, triton.cdiv(vocab, block))](
        param, grad, update.exp_avg, update.exp_avg_sq, update.exp_avg if skip is None else skip, vocab,
        *update.scalars(), BLOCK_V=block, SKIP=skip is not None, enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
