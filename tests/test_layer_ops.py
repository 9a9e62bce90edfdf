"""RMSNorm and the SwiGLU gate (``entrgi.ops.layer_ops``): the Triton backend against
the torch one (the stock code's ATen ops) and a float64 ground truth, forward and
gradient, across dtypes and widths off the tile; interpreter on CPU, native on GPU."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from entrgi.ops.layer_ops import (  # noqa: E402
    _norm_rows, add_rms_norm, add_rms_norm_writable, merged_silu_gate, normed_rotary_embedding, rms_norm,
    rms_norm_with_residual, rotary_embedding, silu_gate,
)  # fmt: skip

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# The backends round alike where the stock code rounds; between roundings they compute in
# float32 in other orders (a row's sum, exp): a 16-bit result lands on the same value or the
# next, a float32 one a few units off.
ULPS = {torch.bfloat16: 1, torch.float16: 1, torch.float32: 8}


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def _leaf(shape, dtype, generator, scale=1.0):
    return (torch.randn(shape, generator=generator) * scale).to(dtype).to(DEVICE).requires_grad_(True)


def _values_and_grads(fn, inputs, grad):
    out = fn(*inputs)
    return out, torch.autograd.grad(out, inputs, grad)


def _rms_norm_64(x, weight, eps):
    x64 = x.double()
    return weight.double() * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)


def _assert_within_ulps(got, want, ulps):
    """|got - want| <= ulps units of the dtype's eps, relative to each value."""
    assert got.dtype == want.dtype and got.shape == want.shape
    bound = ulps * _eps(want.dtype) * want.abs().double() + torch.finfo(want.dtype).tiny
    excess = (got.double() - want.double()).abs() - bound
    assert excess.max() <= 0, f"{excess.max().item()} over {ulps} ulps"


def _assert_mostly_equal(got, want):
    """Rounded where the stock code rounds, a 16-bit result differs only where the
    float32 value before the rounding sat within its few-ulp difference of a tie."""
    if want.dtype != torch.float32:
        assert (got == want).double().mean() >= 0.99


def _max_relative(got, truth):
    return ((got.double() - truth).abs().max() / truth.abs().max()).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 7), (3, 5, 96), (2, 3, 4, 130), (9, 1000)])
def test_rms_norm_matches_the_stock_arithmetic(dtype, shape):
    generator = torch.Generator().manual_seed(shape[-1])
    x = _leaf(shape, dtype, generator, scale=3.0)
    weight = (torch.rand(shape[-1], generator=generator) + 0.5).to(dtype).to(DEVICE)
    grad = torch.randn(shape, generator=generator).to(dtype).to(DEVICE)
    want, (want_grad,) = _values_and_grads(lambda t: rms_norm(t, weight, 1e-6, backend="torch"), [x], grad)
    got, (got_grad,) = _values_and_grads(lambda t: rms_norm(t, weight, 1e-6, backend="triton"), [x], grad)
    _assert_within_ulps(got, want, ULPS[dtype])
    _assert_mostly_equal(got, want)
    truth = _rms_norm_64(x, weight, 1e-6)
    assert _max_relative(got, truth) <= 2 * _eps(dtype)
    x64 = x.detach().double().requires_grad_(True)
    (truth_grad,) = torch.autograd.grad(_rms_norm_64(x64, weight, 1e-6), [x64], grad.double())
    # the backward sums (grad * weight) . x over the row, then cancels it against grad * weight
    torch_error = _max_relative(want_grad, truth_grad)
    assert _max_relative(got_grad, truth_grad) <= torch_error + 4 * _eps(dtype)
    assert truth_grad.abs().max() > 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 7), (3, 5, 96), (9, 1000)])
def test_residual_adds_inside_the_norm_match_the_stock_arithmetic(dtype, shape):
    """A pre-norm layer's residual adds run inside the norm kernels: ``add_rms_norm``
    normalises residual + branch and writes the sum; ``rms_norm_with_residual`` hands x
    back. The backward adds the sum's (residual's) own gradient to the norm's. Against
    the torch backend (stock add, then norm) and float64."""
    generator = torch.Generator().manual_seed(shape[-1] + 1)
    residual, branch = _leaf(shape, dtype, generator, scale=3.0), _leaf(shape, dtype, generator)
    weight = (torch.rand(shape[-1], generator=generator) + 0.5).to(dtype).to(DEVICE)
    grads = [torch.randn(shape, generator=generator).to(dtype).to(DEVICE) for _ in range(2)]

    def run(backend):
        normed, total = add_rms_norm(residual, branch, weight, 1e-6, backend)
        add_grads = torch.autograd.grad([normed, total], [residual, branch], grads)
        first, passed = rms_norm_with_residual(residual, weight, 1e-6, backend)
        assert passed is residual or torch.equal(passed, residual)
        (first_grad,) = torch.autograd.grad([first, passed], [residual], grads)
        return [normed, total, first], [*add_grads, first_grad]

    (want, want_grads), (got, got_grads) = run("torch"), run("triton")
    assert torch.equal(got[1], want[1])  # the sum rounds as the stock add rounds it
    for got_t, want_t in zip(got, want):
        _assert_within_ulps(got_t, want_t, ULPS[dtype])
        _assert_mostly_equal(got_t, want_t)
    assert torch.equal(got_grads[0], got_grads[1])  # both addends get the sum's gradient
    r64, b64 = (t.detach().double().requires_grad_(True) for t in (residual, branch))
    truths = [
        torch.autograd.grad([_rms_norm_64(r64 + b64, weight, 1e-6), r64 + b64], [r64], [g.double() for g in grads])[0],
        torch.autograd.grad([_rms_norm_64(r64, weight, 1e-6), r64], [r64], [g.double() for g in grads])[0],
    ]
    for got_t, want_t, truth in zip(got_grads[1:], want_grads[1:], truths):
        assert _max_relative(got_t, truth) <= _max_relative(want_t, truth) + 4 * _eps(dtype)
    assert _max_relative(got[0], _rms_norm_64(r64.detach() + b64.detach(), weight, 1e-6)) <= 4 * _eps(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 7), (3, 5, 96), (9, 130)])
def test_a_gemm_accumulates_into_the_writable_sum_without_corrupting_the_backward(dtype, shape):
    """``add_rms_norm_writable`` hands back the sum as a fresh (rows, width) tensor that a
    layer's down projection accumulates into in place (``addmm_``): the same normed row
    and sum as ``add_rms_norm``, and gradients as if the GEMM's output had been added to
    a separate sum (the backward keeps its own copy, which the in-place GEMM leaves
    alone); under no gradient the kernel writes one sum and no copy."""
    generator = torch.Generator().manual_seed(shape[-1] + 2)
    residual, branch = _leaf(shape, dtype, generator, scale=3.0), _leaf(shape, dtype, generator)
    weight = (torch.rand(shape[-1], generator=generator) + 0.5).to(dtype).to(DEVICE)
    inner = _leaf((*shape[:-1], 11), dtype, generator)
    projection = (torch.randn(shape[-1], 11, generator=generator) / 4).to(dtype).to(DEVICE)
    grads = [torch.randn(shape, generator=generator).to(dtype).to(DEVICE) for _ in range(2)]
    width = shape[-1]

    def accumulated(backend):
        normed, total = add_rms_norm_writable(residual, branch, weight, 1e-6, backend)
        assert total.shape == (residual.numel() // width, width) and total.is_contiguous()
        out = total.addmm_(inner.reshape(-1, 11), projection.t()).view(shape)
        return [normed, out], torch.autograd.grad([normed, out], [residual, branch, inner], grads)

    def separate(backend):
        normed, total = add_rms_norm(residual, branch, weight, 1e-6, backend)
        out = total + (inner.reshape(-1, 11) @ projection.t()).view(shape)
        return [normed, out], torch.autograd.grad([normed, out], [residual, branch, inner], grads)

    for backend in ("torch", "triton"):
        (got, got_grads), (want, want_grads) = accumulated(backend), separate(backend)
        assert torch.equal(got[0], want[0])
        # the GEMM rounds its product and the sum once, the separate add twice
        torch.testing.assert_close(
            got[1], want[1], rtol=2 * _eps(dtype), atol=2 * _eps(dtype) * want[1].abs().max().item()
        )
        for got_grad, want_grad in zip(got_grads, want_grads):
            assert torch.equal(got_grad, want_grad)
    with torch.no_grad():
        normed, total = add_rms_norm_writable(residual, branch, weight, 1e-6, "triton")
        want_normed, want_total = add_rms_norm(residual, branch, weight, 1e-6, "triton")
    assert torch.equal(normed, want_normed) and torch.equal(total, want_total.reshape(-1, width))


def test_the_norm_kernel_names_a_sum_copy_it_cannot_write():
    from entrgi_kernels.rms_norm import rms_norm_forward

    x, weight = torch.randn(2, 3, 8, device=DEVICE), torch.ones(8, device=DEVICE)
    with pytest.raises(ValueError, match=r"contiguous \(6, 8\) torch.float32 tensor, with a branch; got \(6, 4\)"):
        rms_norm_forward(x, weight, 1e-6, torch.randn(6, 8, device=DEVICE), torch.empty(6, 4, device=DEVICE))
    with pytest.raises(ValueError, match=r"got \(6, 8\) torch.float32 and no branch"):
        rms_norm_forward(x, weight, 1e-6, None, torch.empty(6, 8, device=DEVICE))


def test_add_rms_norm_names_mismatched_addends():
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"one shape, dtype and device, got \(2, 8\) torch.float32 .* \(2, 4\)"):
        add_rms_norm(x, x[:, :4], torch.ones(8, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="add_rms_norm gives no gradient to weight, but weight requires one"):
        add_rms_norm(x, x, torch.ones(8, device=DEVICE, requires_grad=True), 1e-6)
    with pytest.raises(ValueError, match=r"add_rms_norm needs residual \(\.\.\., H\) and weight \(H,\)"):
        add_rms_norm(x, x, torch.ones(7, device=DEVICE), 1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_reads_per_head_rows_where_they_lie(dtype):
    """A per-head norm of the query slice of a stacked (B, S, q + k + v) projection
    output: the kernel reads the strided rows in place and gives what it gives on a
    contiguous copy, values and gradient (into the stacked tensor, zero outside the slice)."""
    generator = torch.Generator().manual_seed(7)
    batch, length, heads, dim = 2, 5, 3, 16
    stacked = _leaf((batch, length, (heads + 2) * dim), dtype, generator, scale=2.0)
    weight = (torch.rand(dim, generator=generator) + 0.5).to(dtype).to(DEVICE)
    grad = torch.randn(batch, length, heads, dim, generator=generator).to(dtype).to(DEVICE)
    query = stacked[..., : heads * dim].view(batch, length, heads, dim)
    assert _norm_rows(query).data_ptr() == query.data_ptr()  # a view: no copy
    got = rms_norm(query, weight, 1e-6, backend="triton")
    (got_grad,) = torch.autograd.grad(got, [stacked], grad)
    copy = query.detach().contiguous().requires_grad_(True)
    want, (want_grad,) = _values_and_grads(lambda t: rms_norm(t, weight, 1e-6, backend="triton"), [copy], grad)
    assert torch.equal(got, want) and got.is_contiguous()
    assert torch.equal(got_grad[..., : heads * dim], want_grad.view(batch, length, -1))
    assert not got_grad[..., heads * dim :].any() and want_grad.abs().max() > 0
    transposed = query.transpose(1, 2)  # (B, H, S, D) rows do not merge into (outer, inner): copied
    assert _norm_rows(transposed).data_ptr() != transposed.data_ptr()
    torch.testing.assert_close(rms_norm(transposed, weight, 1e-6, backend="triton"), want.transpose(1, 2))


def test_rms_norm_in_the_weights_dtype_when_it_is_wider():
    generator = torch.Generator().manual_seed(1)
    x = _leaf((4, 33), torch.bfloat16, generator)
    weight = torch.randn(33, generator=generator).to(DEVICE)  # float32: the product is float32
    grad = torch.randn(4, 33, generator=generator).to(DEVICE)
    want, (want_grad,) = _values_and_grads(lambda t: rms_norm(t, weight, 1e-5, backend="torch"), [x], grad)
    got, (got_grad,) = _values_and_grads(lambda t: rms_norm(t, weight, 1e-5, backend="triton"), [x], grad)
    assert got.dtype == torch.float32 and got_grad.dtype == torch.bfloat16
    _assert_within_ulps(got, want, ulps=256)  # float32 values of bfloat16-rounded rows: within their rounding
    torch.testing.assert_close(got_grad, want_grad, rtol=2 * _eps(torch.bfloat16), atol=1e-2)


def test_rms_norm_of_a_zero_row_is_zero():
    x = torch.zeros(2, 40, device=DEVICE)
    x[1] = torch.randn(40)
    out = rms_norm(x, torch.ones(40, device=DEVICE), 1e-6, backend="triton")
    assert torch.equal(out[0], torch.zeros(40, device=DEVICE)) and out[1].abs().sum() > 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 5), (3, 7, 77), (4, 3000)])
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter computes e^100
def test_silu_gate_matches_the_stock_arithmetic(dtype, shape):
    generator = torch.Generator().manual_seed(shape[-1])
    gate, up = _leaf(shape, dtype, generator, scale=4.0), _leaf(shape, dtype, generator)
    with torch.no_grad():  # saturated and overflowing exponentials
        gate.view(-1)[:2] = torch.tensor([-100.0, 100.0], dtype=dtype)
    grad = torch.randn(shape, generator=generator).to(dtype).to(DEVICE)
    want, want_grads = _values_and_grads(lambda g, u: silu_gate(g, u, backend="torch"), [gate, up], grad)
    got, got_grads = _values_and_grads(lambda g, u: silu_gate(g, u, backend="triton"), [gate, up], grad)
    _assert_within_ulps(got, want, ULPS[dtype])
    _assert_mostly_equal(got, want)
    gate64, up64 = gate.detach().double().requires_grad_(True), up.detach().double().requires_grad_(True)
    truth = torch.nn.functional.silu(gate64) * up64
    assert _max_relative(got, truth) <= 2 * _eps(dtype)
    truth_grads = torch.autograd.grad(truth, [gate64, up64], grad.double())
    # silu's derivative cancels near gate = -1.28: measured at the scale of the whole tensor
    for got_grad, want_grad, truth_grad in zip(got_grads, want_grads, truth_grads):
        assert torch.isfinite(got_grad).all()
        assert _max_relative(got_grad, truth_grad) <= _max_relative(want_grad, truth_grad) + 2 * _eps(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2), (3, 7, 154), (2, 6000), (5, 6144)])  # widths 1, 77, 3000 (3 x 1,024), 3072
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
def test_merged_silu_gate_is_the_gate_of_its_two_halves_with_one_gradient(dtype, shape):
    """The (..., 2 I) output of stacked gate and up projections: the same values as
    silu_gate of its halves, each backend, and one (..., 2 I) gradient holding the two."""
    generator = torch.Generator().manual_seed(shape[-1])
    gate_up = _leaf(shape, dtype, generator, scale=3.0)
    with torch.no_grad():
        gate_up.view(-1)[:2] = torch.tensor([-100.0, 100.0], dtype=dtype)
    width = shape[-1] // 2
    grad = torch.randn(*shape[:-1], width, generator=generator).to(dtype).to(DEVICE)
    for backend in ("torch", "triton"):
        gate, up = (half.detach().requires_grad_(True) for half in gate_up.detach().split(width, -1))
        want, want_grads = _values_and_grads(lambda g, u: silu_gate(g, u, backend=backend), [gate, up], grad)
        got, (got_grad,) = _values_and_grads(lambda gu: merged_silu_gate(gu, backend=backend), [gate_up], grad)
        assert got.shape == want.shape and torch.equal(got, want)
        assert got_grad.shape == gate_up.shape and torch.equal(got_grad, torch.cat(want_grads, -1))
    with pytest.raises(ValueError, match=r"merged_silu_gate needs gate_up \(..., 2 I\), got \(2, 3\)"):
        merged_silu_gate(torch.randn(2, 3, device=DEVICE))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "batch, heads, kv_heads, length, dim, shared_positions", [(2, 4, 2, 7, 16, False), (1, 3, 1, 5, 64, True)]
)
@pytest.mark.parametrize("stacked", [False, True])
def test_rotary_embedding_matches_the_stock_arithmetic(
    dtype, batch, heads, kv_heads, length, dim, shared_positions, stacked
):  # fmt: skip
    generator = torch.Generator().manual_seed(dim)
    # as the models hand them over: the projections' (B, T, H, D) outputs transposed; stacked,
    # slices of one (B, T, q + k + v) output (not dense: the output cannot take their strides)
    if stacked:
        widths = [heads * dim, kv_heads * dim, kv_heads * dim]
        qkv = (torch.randn(batch, length, sum(widths), generator=generator) * 2).to(dtype).to(DEVICE)
        q, k, _ = qkv.requires_grad_(True).split(widths, -1)
        q, k = (t.view(batch, length, -1, dim).transpose(1, 2) for t in (q, k))
    else:
        q = (torch.randn(batch, length, heads, dim, generator=generator) * 2).to(dtype).to(DEVICE).transpose(1, 2)
        k = (torch.randn(batch, length, kv_heads, dim, generator=generator) * 2).to(dtype).to(DEVICE).transpose(1, 2)
        q, k = q.requires_grad_(True), k.requires_grad_(True)
    angles = torch.rand(1 if shared_positions else batch, length, dim // 2, generator=generator) * 6
    cos, sin = (f(torch.cat([angles, angles], -1)).to(dtype).to(DEVICE) for f in (torch.cos, torch.sin))
    grads = [torch.randn(t.shape, generator=generator).to(dtype).to(DEVICE) for t in (q, k)]

    def run(backend):
        outs = rotary_embedding(q, k, cos, sin, backend=backend)
        return outs, torch.autograd.grad(outs, [q, k], grads)

    want, want_grads = run("torch")
    got, got_grads = run("triton")
    # outputs dense in (B, H, T, D): grouped query heads fold into one sequence as a view;
    # gradients laid out as the models' (B, T, H, D) inputs: the transposes back copy nothing
    assert all(t.is_contiguous() for t in got) and all(t.transpose(1, 2).is_contiguous() for t in got_grads)
    for got_t, want_t in zip(got + got_grads, want + want_grads):
        # both products rounded before the sum, as the stock code does: equal in 16 bits
        _assert_within_ulps(got_t, want_t, ULPS[dtype])
        _assert_mostly_equal(got_t, want_t)
    q64, cos64, sin64 = q.detach().double(), cos.double().unsqueeze(1), sin.double().unsqueeze(1)
    rotated = torch.cat([-q64[..., dim // 2 :], q64[..., : dim // 2]], -1)
    assert _max_relative(got[0], q64 * cos64 + rotated * sin64) <= 2 * _eps(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rotary_embedding_with_float32_angles_rotates_in_float32(dtype):
    """cos and sin of float32 with 16-bit q and k: LLaDA's full-precision rope (q and k
    taken to float32, rotated, rounded back once), forward and gradient, both backends."""
    batch, heads, length, dim = 2, 3, 5, 32
    generator = torch.Generator().manual_seed(7)
    q, k = (_leaf((batch, length, heads, dim), dtype, generator, 2.0).transpose(1, 2) for _ in range(2))
    angles = torch.rand(1, length, dim // 2, generator=generator) * 6
    cos, sin = (f(torch.cat([angles, angles], -1)).to(DEVICE) for f in (torch.cos, torch.sin))
    grads = [torch.randn(t.shape, generator=generator).to(dtype).to(DEVICE) for t in (q, k)]

    def stock():  # LLaDA's RotaryEmbedding.forward with rope_full_precision
        wide = [x.float() for x in (q, k)]
        rotated = (x * cos[:, None] + torch.cat([-x[..., dim // 2 :], x[..., : dim // 2]], -1) * sin[:, None]
                   for x in wide)  # fmt: skip
        return tuple(x.type_as(q) for x in rotated)

    want, want_grads = _values_and_grads(lambda *_: stock(), [q, k], grads)
    for backend in ("torch", "triton"):
        got, got_grads = _values_and_grads(lambda a, b: rotary_embedding(a, b, cos, sin, backend=backend), [q, k],
                                           grads)  # fmt: skip
        for got_t, want_t in zip(got + got_grads, want + want_grads):
            # one rounding of a float32 value computed in the same order (a GPU may fuse the
            # sum's product into one fma, rounding once less: then a tie can round apart)
            _assert_within_ulps(got_t, want_t, 1)
            assert torch.equal(got_t, want_t) if backend == "torch" else (got_t == want_t).double().mean() >= 0.99
    # not what rounding each product to 16 bits (cos and sin of q's dtype) gives
    assert not torch.equal(want[0], rotary_embedding(q, k, cos.to(dtype), sin.to(dtype), backend="torch")[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, heads, kv_heads, length, dim", [(2, 4, 2, 7, 16), (1, 3, 1, 5, 64)])
def test_normed_rotary_embedding_is_the_head_norms_then_the_rotation(dtype, batch, heads, kv_heads, length, dim):
    """Qwen3's q_norm / k_norm and the rotation in one kernel each way: against the
    separate triton kernels (the same roundings; only a row sum's order may differ), the
    torch backend (the stock arithmetic) and float64, on slices of stacked q / k / v
    projections as the models hand them over."""
    generator = torch.Generator().manual_seed(dim + heads)
    widths = [heads * dim, kv_heads * dim, kv_heads * dim]
    qkv = (torch.randn(batch, length, sum(widths), generator=generator) * 3).to(dtype).to(DEVICE)
    q, k, _ = qkv.requires_grad_(True).split(widths, -1)
    q, k = (t.view(batch, length, -1, dim).transpose(1, 2) for t in (q, k))
    q_weight, k_weight = ((torch.rand(dim, generator=generator) + 0.5).to(dtype).to(DEVICE) for _ in range(2))
    angles = torch.rand(batch, length, dim // 2, generator=generator) * 6
    cos, sin = (f(torch.cat([angles, angles], -1)).to(dtype).to(DEVICE) for f in (torch.cos, torch.sin))
    grads = [torch.randn(t.shape, generator=generator).to(dtype).to(DEVICE) for t in (q, k)]

    def run(fn):
        outs = fn()
        return outs, torch.autograd.grad(outs, [q, k], grads)

    def separate():
        normed = (rms_norm(x, w, 1e-6, backend="triton") for x, w in ((q, q_weight), (k, k_weight)))
        return rotary_embedding(*normed, cos, sin, backend="triton")

    got, got_grads = run(lambda: normed_rotary_embedding(q, k, cos, sin, q_weight, k_weight, 1e-6, "triton"))
    assert all(t.is_contiguous() for t in got) and all(t.transpose(1, 2).is_contiguous() for t in got_grads)
    for want, want_grads in (run(separate), run(lambda: normed_rotary_embedding(
        q, k, cos, sin, q_weight, k_weight, 1e-6, "torch"))):  # fmt: skip
        # a float32 row sum in another order moves a rotated value by a few ulps of the row's
        # largest (the rotation cancels); 16-bit values are rounded alike and mostly equal
        for got_t, want_t, ulps in zip(got + got_grads, want + want_grads, (2, 2, 4, 4)):
            assert _max_relative(got_t, want_t.double()) <= ulps * _eps(dtype)
            _assert_mostly_equal(got_t, want_t)
    q64 = q.detach().double().requires_grad_(True)
    normed = _rms_norm_64(q64, q_weight, 1e-6)
    cos64, sin64 = cos.double().unsqueeze(1), sin.double().unsqueeze(1)
    truth = normed * cos64 + torch.cat([-normed[..., dim // 2 :], normed[..., : dim // 2]], -1) * sin64
    (truth_grad,) = torch.autograd.grad(truth, [q64], grads[0].double())
    assert _max_relative(got[0], truth) <= 4 * _eps(dtype)
    assert _max_relative(got_grads[0], truth_grad) <= 8 * _eps(dtype) and truth_grad.abs().max() > 0


def test_normed_rotary_embedding_names_bad_inputs():
    q, cos = torch.randn(1, 2, 3, 8, device=DEVICE), torch.randn(1, 3, 8, device=DEVICE)
    weight = torch.ones(8, device=DEVICE)
    with pytest.raises(
        ValueError, match=r"normed_rotary_embedding needs q \(B, H, T, D\).*got \(1, 2, 3, 8\), \(3, 8\)"
    ):
        normed_rotary_embedding(q, q[0, 0], cos, cos, weight, weight, 1e-6)
    with pytest.raises(
        ValueError, match=r"normed_rotary_embedding needs k \(\.\.\., H\) and k_weight \(H,\) with H >= 1, got "
        r"\(1, 2, 3, 8\) and \(4,\)"
    ):  # fmt: skip
        normed_rotary_embedding(q, q, cos, cos, weight, weight[:4], 1e-6)
    with pytest.raises(
        ValueError, match="norms' weights in q's dtype torch.float32, got torch.float32 and torch.bfloat16"
    ):
        normed_rotary_embedding(q, q, cos, cos, weight, weight.bfloat16(), 1e-6, backend="triton")
    with pytest.raises(ValueError, match="power-of-two head size, got D = 6"):
        normed_rotary_embedding(q[..., :6], q[..., :6], cos[..., :6], cos[..., :6], weight[:6], weight[:6], 1e-6,
                                backend="triton")  # fmt: skip


def test_empty_inputs_give_empty_outputs_and_gradients():
    x = torch.randn(0, 3, 16, device=DEVICE, requires_grad=True)
    gate = torch.randn(0, 8, device=DEVICE, requires_grad=True)
    outs = rms_norm(x, torch.ones(16, device=DEVICE), 1e-6, backend="triton"), silu_gate(gate, gate, backend="triton")
    torch.autograd.backward([out.sum() for out in outs])
    assert outs[0].shape == x.grad.shape == (0, 3, 16) and outs[1].shape == gate.grad.shape == (0, 8)
    q, cos = torch.randn(2, 3, 0, 16, device=DEVICE, requires_grad=True), torch.randn(2, 0, 16, device=DEVICE)
    rotated = normed_rotary_embedding(q, q, cos, cos, torch.ones(16, device=DEVICE), torch.ones(16, device=DEVICE),
                                      1e-6, backend="triton")  # fmt: skip
    torch.autograd.backward([out.sum() for out in rotated])
    assert rotated[0].shape == q.grad.shape == (2, 3, 0, 16)


def test_layer_ops_name_bad_inputs():
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(
        ValueError, match=r"rms_norm needs x \(\.\.\., H\) and weight \(H,\) with H >= 1, got \(2, 8\) and \(7,\)"
    ):
        rms_norm(x, torch.ones(7, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match=r"with H >= 1, got \(2, 0\) and \(0,\)"):
        rms_norm(x[:, :0], torch.ones(0, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="weight requires one"):
        rms_norm(x, torch.ones(8, device=DEVICE, requires_grad=True), 1e-6)
    with pytest.raises(ValueError, match="eps must be >= 0, got -1"):
        rms_norm(x, torch.ones(8, device=DEVICE), -1.0)
    with pytest.raises(TypeError, match="x must be float32, bfloat16 or float16, got torch.int64"):
        rms_norm(x.long(), torch.ones(8, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="width at most 16384, got 16385"):
        rms_norm(torch.randn(1, 16385, device=DEVICE), torch.ones(16385, device=DEVICE), 1e-6, backend="triton")
    with pytest.raises(ValueError, match=r"one shape, dtype and device, got \(2, 8\) torch.float32"):
        silu_gate(x, x[:, :4])
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        silu_gate(x, x, backend="cuda")
    q, cos = torch.randn(1, 2, 3, 8, device=DEVICE), torch.randn(1, 3, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"k \(B, H_kv, T, D\).*got \(1, 2, 3, 8\), \(1, 2, 4, 8\)"):
        rotary_embedding(q, torch.randn(1, 2, 4, 8, device=DEVICE), cos, cos)
    with pytest.raises(ValueError, match="power-of-two head size, got D = 6"):
        rotary_embedding(q[..., :6], q[..., :6], cos[..., :6], cos[..., :6], backend="triton")
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match="cos, sin of that dtype or float32, got torch.float32, torch.float32, "
                                             "torch.bfloat16, torch.bfloat16"):  # fmt: skip
            rotary_embedding(q, q, cos.bfloat16(), cos.bfloat16(), backend=backend)
        with pytest.raises(ValueError, match="q and k of one dtype"):
            rotary_embedding(q, q.half(), cos, cos, backend=backend)
