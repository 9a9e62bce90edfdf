"""RMSNorm, the SwiGLU gate and the rotary position embedding of a frozen transformer
layer, with the gradient to the activations only (guidance differentiates a reward
with respect to its inputs).

Both backends keep the same tensors for the backward, less than the stock module code
does: an RMSNorm keeps its input in its own dtype and 1 / rms per row (the stock code
keeps a float32 copy of the input too), the gate keeps ``gate`` and ``up`` and
recomputes ``silu(gate)``, the rotary embedding keeps only cos and sin.

``torch``: the ATen ops autograd applies to the stock code, in its order, so values
and gradients match it bit for bit. ``triton``: one kernel per forward and backward
(``kernels/rms_norm.py``, ``kernels/silu_gate.py``, ``kernels/rotary.py``), the same
roundings in the same places; only the order of an RMSNorm's row sum and the exp's
implementation differ (16-bit results equal or one unit in the last place apart). One
guidance call of a Qwen3-1.7B reward over 16 x 137 tokens moves 79.6 GB in 3,849
elementwise launches with the ``torch`` backend and 15.2 GB in 443 with ``triton``
(whose gate and up projections, and q, k and v projections, run as one GEMM each,
:func:`merged_silu_gate`; whose residual adds run inside the norms' kernels,
:func:`add_rms_norm`, :func:`rms_norm_with_residual`, and the down projection's GEMM,
:func:`add_rms_norm_writable`; whose head norms run inside the rotary kernel,
:func:`normed_rotary_embedding`; and whose attention runs folded, :mod:`entrgi.sdpa`),
against 14.0 GB for all its GEMMs (counted on the meta device by
``bench/layer_traffic.py``; not a timing). The triton RMSNorm reads rows where they
lie, (outer, inner) strided: a per-head norm of a slice of stacked projections copies
nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from entrgi.ops.layout import dense_rows, last_dim_contiguous
from entrgi.ops.validation import FLOAT_DTYPES, resolve_backend


class _TorchRMSNorm(torch.autograd.Function):
    """``weight * (x32 * rsqrt(mean(x32²) + eps)).to(x.dtype)`` with ``x32 = x.float()``,
    keeping x (not x32) and 1/rms."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        x32 = x.to(torch.float32)
        inv_rms = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, inv_rms)
        return weight * (x32 * inv_rms).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, inv_rms = ctx.saved_tensors
        x32 = x.to(torch.float32)
        grad_normed = (grad * weight).to(torch.float32)
        grad_inv_rms = (grad_normed * x32).sum(-1, keepdim=True)
        grad_mean_square = -0.5 * grad_inv_rms * inv_rms.pow(3)  # rsqrt's backward
        grad_square = grad_mean_square / x.shape[-1]  # mean's backward (broadcast below)
        grad_x32 = grad_normed * inv_rms + grad_square * (2 * x32)
        return grad_x32.to(x.dtype), None, None


def _norm_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` (..., W) as the (outer, inner, W) rows the norm kernels read, a view where
    one exists: (rows, 1, W) where the rows are evenly strided, (rows / H, H, W) where
    all but the last two dimensions merge (a per-head view into a projection's output,
    e.g. the query slice of stacked q / k / v projections); else a contiguous copy."""
    if x.stride(-1) == 1:
        for inner in (1, x.shape[-2] if x.dim() > 1 else 1):
            try:
                return x.view(-1, inner, x.shape[-1])
            except RuntimeError:  # the leading dimensions do not merge into one stride
                continue
    return x.contiguous().view(-1, 1, x.shape[-1])


class _TritonRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        from entrgi_kernels.rms_norm import rms_norm_forward

        rows = _norm_rows(x)
        y, inv_rms, _ = rms_norm_forward(rows, weight, eps)
        ctx.save_for_backward(rows, weight, inv_rms)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, grad):
        from entrgi_kernels.rms_norm import rms_norm_backward

        rows, weight, inv_rms = ctx.saved_tensors
        return rms_norm_backward(dense_rows(grad), rows, weight, inv_rms).view(grad.shape), None, None


class _TritonRMSNormWithResidual(_TritonRMSNorm):
    """(x) -> (rms_norm(x), x): x handed back as a pre-norm layer's residual, so that the
    backward kernel adds the residual path's gradient to the norm's (no add launched)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        return _TritonRMSNorm.forward(ctx, x, weight, eps), x

    @staticmethod
    def backward(ctx, grad, residual_grad):
        from entrgi_kernels.rms_norm import rms_norm_backward

        rows, weight, inv_rms = ctx.saved_tensors
        grad_x = rms_norm_backward(dense_rows(grad), rows, weight, inv_rms, dense_rows(residual_grad))
        return grad_x.view(grad.shape), None, None


def _add_rms_norm_saved(ctx, residual, branch, weight, eps, sum_copy=None):
    """The add-and-norm forward kernel (``sum_copy``: also writes the sum there), keeping
    what its backward reads: (normed, residual's shape; sum, (rows, width))."""
    from entrgi_kernels.rms_norm import rms_norm_forward

    y, inv_rms, total = rms_norm_forward(_norm_rows(residual), weight, eps, dense_rows(branch), sum_copy)
    ctx.save_for_backward(total.view(-1, 1, total.shape[-1]), weight, inv_rms)
    return y.view(residual.shape), total


class _TritonAddRMSNorm(torch.autograd.Function):
    """(residual, branch) -> (rms_norm(residual + branch), residual + branch) in one
    kernel; the backward adds the sum's own gradient (the next residual path's) to the
    norm's in one kernel, and hands the result to both inputs."""

    @staticmethod
    def forward(ctx, residual, branch, weight, eps):
        normed, total = _add_rms_norm_saved(ctx, residual, branch, weight, eps)
        return normed, total.view(residual.shape)

    @staticmethod
    def backward(ctx, grad, total_grad):
        from entrgi_kernels.rms_norm import rms_norm_backward

        rows, weight, inv_rms = ctx.saved_tensors
        grad_sum = rms_norm_backward(dense_rows(grad), rows, weight, inv_rms, dense_rows(total_grad)).view(grad.shape)
        return grad_sum, grad_sum, None, None


class _TritonAddRMSNormWritableSum(_TritonAddRMSNorm):
    """:class:`_TritonAddRMSNorm` whose sum output is a second copy, (rows, width), that
    the kernel writes beside the one the backward keeps: free to be modified in place
    (``copy``: False, under no gradient, returns the kept one, nothing being kept)."""

    @staticmethod
    def forward(ctx, residual, branch, weight, eps, copy):
        width = residual.shape[-1]
        shape = (residual.numel() // width, width)
        writable = torch.empty(shape, dtype=residual.dtype, device=residual.device) if copy else None
        normed, total = _add_rms_norm_saved(ctx, residual, branch, weight, eps, writable)
        return normed, total if writable is None else writable

    @staticmethod
    def backward(ctx, grad, total_grad):
        return *_TritonAddRMSNorm.backward(ctx, grad, total_grad), None


class _TorchSiluGate(torch.autograd.Function):
    """``silu(gate) * up``, keeping gate and up; silu(gate) is recomputed in the backward."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)


def _row_view(t: torch.Tensor) -> torch.Tensor:
    """A contiguous (..., W) tensor as (rows, W), a view."""
    return t.view(-1, t.shape[-1])


class _TritonSiluGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        from entrgi_kernels.silu_gate import silu_gate_forward

        ctx.save_for_backward(gate, up)
        return silu_gate_forward(_row_view(gate), _row_view(up)).view(gate.shape)

    @staticmethod
    def backward(ctx, grad):
        from entrgi_kernels.silu_gate import silu_gate_backward

        gate, up = ctx.saved_tensors
        grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
        silu_gate_backward(dense_rows(grad), *map(_row_view, (gate, up, grad_gate, grad_up)))
        return grad_gate, grad_up


class _TritonMergedSiluGate(torch.autograd.Function):
    """``silu(gate) * up`` of the halves of one (..., 2 I) tensor, whose gradient the
    backward kernel writes into one buffer (no concatenation before the GEMM)."""

    @staticmethod
    def forward(ctx, gate_up):
        from entrgi_kernels.silu_gate import silu_gate_forward

        ctx.save_for_backward(gate_up)
        rows, width = _row_view(gate_up), gate_up.shape[-1] // 2
        return silu_gate_forward(rows[:, :width], rows[:, width:]).view(*gate_up.shape[:-1], width)

    @staticmethod
    def backward(ctx, grad):
        from entrgi_kernels.silu_gate import silu_gate_backward

        (gate_up,) = ctx.saved_tensors
        rows, width = _row_view(gate_up), gate_up.shape[-1] // 2
        grad_gate_up = torch.empty_like(rows)
        silu_gate_backward(dense_rows(grad), rows[:, :width], rows[:, width:], grad_gate_up[:, :width],
                           grad_gate_up[:, width:])  # fmt: skip
        return grad_gate_up.view(gate_up.shape)


class _TritonRotary(torch.autograd.Function):
    """Rotary embedding of q and k; cos and sin get no gradient. Outputs are dense in
    (B, H, T, D), so that grouped query heads fold into one sequence per key / value
    head as a view (:class:`entrgi.sdpa.FoldedSdpa`); gradients are laid out in the
    inputs' memory order (the models' (B, T, H, D), transposed), so the transposes the
    models take back need no copy."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        from entrgi_kernels.rotary import rotary

        ctx.save_for_backward(cos, sin)
        ctx.orders = _memory_order(q), _memory_order(k)
        dense = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k))
        return rotary(q, k, cos, sin, *dense)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        from entrgi_kernels.rotary import rotary

        cos, sin = ctx.saved_tensors
        grad_q, grad_k = last_dim_contiguous(grad_q), last_dim_contiguous(grad_k)
        outs = (_empty_in_order(grad, order) for grad, order in zip((grad_q, grad_k), ctx.orders))
        return *rotary(grad_q, grad_k, cos, sin, *outs, backward=True), None, None


class _TritonNormedRotary(torch.autograd.Function):
    """:class:`_TritonRotary` of the per-head RMSNorms of q and k (one kernel each way);
    keeps q and k (views into the projections' output, which attention keeps anyway),
    cos, sin and 1 / rms per row."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, q_weight, k_weight, eps):
        from entrgi_kernels.rotary import HeadNorms, rotary

        inv_rms = (torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device) for x in (q, k))
        norms = HeadNorms(q_weight, k_weight, eps, *inv_rms)
        ctx.save_for_backward(q, k, cos, sin, q_weight, k_weight, norms.q_inv_rms, norms.k_inv_rms)
        ctx.eps, ctx.orders = eps, (_memory_order(q), _memory_order(k))
        dense = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k))
        return rotary(q, k, cos, sin, *dense, norms=norms)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        from entrgi_kernels.rotary import HeadNorms, rotary

        q, k, cos, sin, q_weight, k_weight, q_inv_rms, k_inv_rms = ctx.saved_tensors
        norms = HeadNorms(q_weight, k_weight, ctx.eps, q_inv_rms, k_inv_rms, q, k)
        grad_q, grad_k = last_dim_contiguous(grad_q), last_dim_contiguous(grad_k)
        outs = (_empty_in_order(grad, order) for grad, order in zip((grad_q, grad_k), ctx.orders))
        return *rotary(grad_q, grad_k, cos, sin, *outs, backward=True, norms=norms), None, None, None, None, None


def _memory_order(t: torch.Tensor) -> list[int]:
    """``t``'s dimensions from the outermost in memory to the innermost (the last)."""
    return sorted(range(t.dim() - 1), key=lambda d: -t.stride(d)) + [t.dim() - 1]


def _empty_in_order(like: torch.Tensor, order: list[int]) -> torch.Tensor:
    """An uninitialised dense tensor of ``like``'s shape and dtype whose dimensions lie in
    memory in ``order`` (outermost first)."""
    empty = torch.empty([like.shape[d] for d in order], dtype=like.dtype, device=like.device)
    return empty.permute([order.index(d) for d in range(like.dim())])


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    return torch.cat((-x[..., x.shape[-1] // 2 :], x[..., : x.shape[-1] // 2]), dim=-1)


def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def _check_alike(op: str, names: tuple[str, str], a: torch.Tensor, b: torch.Tensor) -> None:
    """Two float tensors of one shape, dtype and device, else an error naming ``op``."""
    for name, t in zip(names, (a, b)):
        _check_float(name, t)
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        raise ValueError(
            f"{op} needs {names[0]} and {names[1]} of one shape, dtype and device, got {tuple(a.shape)} {a.dtype} "
            f"{a.device} and {tuple(b.shape)} {b.dtype} {b.device}"
        )


def _check_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, op: str = "rms_norm", names: tuple[str, str] = ("x", "weight")
) -> None:
    """The input ``x`` (..., H >= 1) of an RMSNorm ``op`` and its frozen weight (H,)."""
    for name, t in zip(names, (x, weight)):
        _check_float(name, t)
    if weight.dim() != 1 or x.dim() < 1 or x.shape[-1] != weight.shape[0] or not weight.numel():
        raise ValueError(f"{op} needs {names[0]} (..., H) and {names[1]} (H,) with H >= 1, got {tuple(x.shape)} "
                         f"and {tuple(weight.shape)}")  # fmt: skip
    if weight.requires_grad:
        raise ValueError(f"{op} gives no gradient to {names[1]}, but {names[1]} requires one")
    if weight.device != x.device:
        raise ValueError(f"{names[0]} is on {x.device} but {names[1]} is on {weight.device}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "auto") -> torch.Tensor:
    """RMSNorm of ``x`` (..., H) with a frozen ``weight`` (H,), as Llama / Qwen /
    Mistral compute it: ``weight * (x32 * rsqrt(mean(x32²) + eps)).to(x.dtype)``, x32 =
    x in float32; the result in the promoted dtype of weight and x. Differentiable in
    ``x`` only (``weight`` must not require a gradient). ``backend``: ``auto`` (Triton
    on CUDA) | ``torch`` | ``triton``."""
    _check_norm(x, weight, eps)
    if resolve_backend(backend, x.device) == "triton":
        return _TritonRMSNorm.apply(x, weight.contiguous(), float(eps))
    return _TorchRMSNorm.apply(x, weight, eps)


def rms_norm_with_residual(
    x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(:func:`rms_norm` of ``x``, ``x``): a pre-norm layer's first norm and its residual.
    The same values as the two uses of x; with the triton backend the gradient the
    residual gets is added to the norm's inside the norm's backward kernel, not by a
    separate add. ``backend``: ``auto`` (Triton on CUDA) | ``torch`` | ``triton``."""
    _check_norm(x, weight, eps)
    if resolve_backend(backend, x.device) == "triton":
        return _TritonRMSNormWithResidual.apply(x, weight.contiguous(), float(eps))
    return _TorchRMSNorm.apply(x, weight, eps), x


def add_rms_norm(
    residual: torch.Tensor, branch: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(:func:`rms_norm` of ``residual + branch``, ``residual + branch``): a pre-norm
    layer's residual add and the norm after it, the sum rounded to the inputs' dtype as
    the stock add rounds it. With the triton backend both are one kernel forward, and the
    backward adds the sum's own gradient to the norm's in one kernel. ``backend``:
    ``auto`` (Triton on CUDA) | ``torch`` | ``triton``."""
    _check_alike("add_rms_norm", ("residual", "branch"), residual, branch)
    _check_norm(residual, weight, eps, "add_rms_norm", ("residual", "weight"))
    if resolve_backend(backend, residual.device) == "triton":
        return _TritonAddRMSNorm.apply(residual, branch, weight.contiguous(), float(eps))
    total = residual + branch
    return _TorchRMSNorm.apply(total, weight, eps), total


def add_rms_norm_writable(
    residual: torch.Tensor, branch: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`add_rms_norm` whose sum comes back as a fresh contiguous (rows, width) tensor
    that the caller may modify in place: a pre-norm layer's last residual add done by its
    MLP's down projection accumulating into it (``addmm_``), so that add is no launch. The
    backward keeps its own copy of the sum (triton: written by the same kernel; none under
    no gradient; torch: a clone)."""
    _check_alike("add_rms_norm_writable", ("residual", "branch"), residual, branch)
    _check_norm(residual, weight, eps, "add_rms_norm_writable", ("residual", "weight"))
    if resolve_backend(backend, residual.device) == "triton":
        copy = torch.is_grad_enabled() and (residual.requires_grad or branch.requires_grad)
        return _TritonAddRMSNormWritableSum.apply(residual, branch, weight.contiguous(), float(eps), copy)
    normed, total = add_rms_norm(residual, branch, weight, eps, backend)
    return normed, total.reshape(-1, total.shape[-1]).clone()


def silu_gate(gate: torch.Tensor, up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``silu(gate) * up`` (a SwiGLU MLP's activation) of two tensors of one shape,
    dtype and device, keeping only gate and up for the backward. ``backend``: ``auto``
    (Triton on CUDA) | ``torch`` | ``triton``."""
    _check_alike("silu_gate", ("gate", "up"), gate, up)
    if resolve_backend(backend, gate.device) == "triton":
        return _TritonSiluGate.apply(gate.contiguous(), up.contiguous())
    return _TorchSiluGate.apply(gate, up)


def merged_silu_gate(gate_up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``silu(gate) * up`` where ``gate_up`` (..., 2 I) holds gate then up: the output of
    a SwiGLU MLP's gate and up projections run as one GEMM (their weights stacked). The
    result is (..., I); the gradient comes back as one (..., 2 I) tensor, what that
    GEMM's backward reads. Keeps only ``gate_up``. ``backend``: ``auto`` (Triton on
    CUDA) | ``torch`` | ``triton``."""
    _check_float("gate_up", gate_up)
    if gate_up.dim() < 1 or gate_up.shape[-1] % 2:
        raise ValueError(f"merged_silu_gate needs gate_up (..., 2 I), got {tuple(gate_up.shape)}")
    if resolve_backend(backend, gate_up.device) == "triton":
        return _TritonMergedSiluGate.apply(gate_up.contiguous())
    return _TorchSiluGate.apply(*gate_up.chunk(2, dim=-1))


def fits_fused_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether the triton backend of :func:`rotary_embedding` takes these (shapes as it
    documents): a power-of-two head size, and dtypes it takes (shapes and dtypes only:
    no host sync)."""
    dim = q.shape[-1]
    shapes_fit = q.dim() == k.dim() == 4 and cos.dim() == sin.dim() == 3 and cos.shape[-1] == dim
    return shapes_fit and dim & (dim - 1) == 0 and _rotary_dtypes_fit(q, k, cos, sin)


def _rotary_dtypes_fit(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """q and k of one dtype, cos and sin of that dtype or float32."""
    return q.dtype == k.dtype and cos.dtype == sin.dtype and cos.dtype in (q.dtype, torch.float32)


def _check_rotary(op: str, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        _check_float(name, t)
    batch, _, length, dim = q.shape if q.dim() == 4 else (None, None, None, None)
    if (
        dim is None or k.dim() != 4 or k.shape[0] != batch or k.shape[2:] != (length, dim)
        or cos.shape != sin.shape or cos.dim() != 3 or cos.shape[0] not in (1, batch) or cos.shape[1:] != (length, dim)
    ):  # fmt: skip
        raise ValueError(
            f"{op} needs q (B, H, T, D), k (B, H_kv, T, D) and cos, sin (B or 1, T, D); got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(cos.shape)}, {tuple(sin.shape)}"
        )
    if not _rotary_dtypes_fit(q, k, cos, sin):
        raise ValueError(
            f"{op} needs q and k of one dtype and cos, sin of that dtype or float32, got {q.dtype}, {k.dtype}, "
            f"{cos.dtype}, {sin.dtype}"
        )
    if cos.requires_grad or sin.requires_grad:
        raise ValueError(f"{op} gives no gradient to cos and sin, but one requires it")
    if len({q.device, k.device, cos.device, sin.device}) != 1:
        raise ValueError(
            f"q, k, cos and sin must share a device, got {q.device}, {k.device}, {cos.device}, {sin.device}"
        )


def _check_fused_rotary(op: str, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if not fits_fused_rotary(q, k, cos, sin):
        raise ValueError(f"the triton {op} needs a power-of-two head size, got D = {q.shape[-1]}")


def rotary_embedding(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding of queries ``q`` (B, H, T, D) and keys ``k`` (B, H_kv,
    T, D) with ``cos`` / ``sin`` (B or 1, T, D) broadcast over the heads, as Llama / Qwen
    / Mistral compute it: ``x * cos + rotate_half(x) * sin``, in q's dtype. ``cos`` and
    ``sin`` of float32 with 16-bit q and k: the rotation runs in float32 and is rounded
    once to q's dtype (LLaDA's ``rope_full_precision``). Differentiable in q and k (cos
    and sin get no gradient). ``backend``: ``auto`` (Triton on CUDA) | ``torch`` |
    ``triton`` (head size D a power of two)."""
    _check_rotary("rotary_embedding", q, k, cos, sin)
    if resolve_backend(backend, q.device) == "triton":
        _check_fused_rotary("rotary_embedding", q, k, cos, sin)
        cos, sin = cos.contiguous(), sin.contiguous()
        return _TritonRotary.apply(last_dim_contiguous(q), last_dim_contiguous(k), cos, sin)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return tuple(_rotated(x, cos, sin) for x in (q, k))


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The stock arithmetic in cos's dtype (the casts are no-ops where it is x's)."""
    wide = x.to(cos.dtype)
    return (wide * cos + _rotate_half(wide) * sin).to(x.dtype)


def normed_rotary_embedding(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rotary_embedding` of the per-head RMSNorms (:func:`rms_norm`) of ``q`` and
    ``k`` (frozen weights (D,), one ``eps``), as Qwen3's attention computes them
    (``q_norm``, ``k_norm``, then the rotation). With the triton backend the norms and the rotation
    are one kernel each way (the normed rows are not stored; each row keeps 1 / rms), the
    same roundings as the three separate kernels; ``torch``: the stock arithmetic.
    ``backend``: ``auto`` (Triton on CUDA) | ``torch`` | ``triton``."""
    _check_rotary("normed_rotary_embedding", q, k, cos, sin)
    for names, x, weight in ((("q", "q_weight"), q, q_weight), (("k", "k_weight"), k, k_weight)):
        _check_norm(x, weight, eps, "normed_rotary_embedding", names)
    if resolve_backend(backend, q.device) == "torch":
        normed = (rms_norm(x, weight, eps, "torch") for x, weight in ((q, q_weight), (k, k_weight)))
        return rotary_embedding(*normed, cos, sin, "torch")
    _check_fused_rotary("normed_rotary_embedding", q, k, cos, sin)
    if q_weight.dtype != q.dtype or k_weight.dtype != q.dtype:
        raise ValueError(
            f"the triton normed_rotary_embedding needs the norms' weights in q's dtype {q.dtype}, got "
            f"{q_weight.dtype} and {k_weight.dtype}"
        )
    weights = q_weight.contiguous(), k_weight.contiguous()
    return _TritonNormedRotary.apply(
        last_dim_contiguous(q), last_dim_contiguous(k), cos.contiguous(), sin.contiguous(), *weights, float(eps)
    )
