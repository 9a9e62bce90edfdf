"""The Triton backend against the PyTorch reference (interpreter on CPU, native on GPU).

Errors are measured against a float64 ground truth: the fused result must be within
the same-dtype PyTorch reference's error plus a small tolerance.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from entrgi import guided_embedding, sample_step  # noqa: E402
from entrgi.ops import entropy_confidence  # noqa: E402
from entrgi.ops.reference import keep_threshold  # noqa: E402
from entrgi_kernels.sampling import _exponential  # noqa: E402
from helpers import assert_law, filter_keys, filtered_law, restated_forward, restated_grad, sum_p_log_p  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SLACK = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
# dphi sums d products of size |g||E| before the cancellation (E g - soft . g); the tensor-core
# dot also rounds g to the table dtype: |error| grows like sqrt(d) u |g| |E| p / tau.
GRAD_SLACK = {torch.float32: 5e-5, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def _inputs(rows, vocab, d, dtype, neg_inf=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    phi = (torch.randn(rows, vocab, generator=g) * 2).to(dtype)
    if neg_inf:
        phi[:, 1::7] = -math.inf
    table = torch.randn(vocab, d, generator=g).to(dtype)
    return phi.to(DEVICE), table.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,vocab,d", [(1, 37, 8), (19, 101, 24), (33, 70, 130), (5, 333, 40), (9, 128, 32)])
@pytest.mark.parametrize("mode", ["entrgi", "aps", "expectation"])
def test_forward_and_gradient_match_float64(dtype, rows, vocab, d, mode):
    tau = 0.7
    phi, table = _inputs(rows, vocab, d, dtype)
    g = torch.randn(rows, d, device=DEVICE)
    results = {}
    for backend in ("triton", "torch"):
        leaf = phi.clone().requires_grad_(True)
        out = guided_embedding(leaf, table, temperature=tau, top_p=0.9, top_k=20, mode=mode, backend=backend,
                               generator=torch.Generator(DEVICE).manual_seed(3))  # fmt: skip
        (out.embeds.float() * g).sum().backward()
        results[backend] = (out, leaf.grad)
    fused, fused_grad = results["triton"]
    torch_out, torch_grad = results["torch"]
    soft, w, _ = restated_forward(phi.cpu(), table.cpu(), tau)
    weights = {"entrgi": w, "aps": torch.ones_like(w), "expectation": torch.zeros_like(w)}[mode]
    truth = soft + weights[:, None] * (table.cpu().double()[fused.tokens.cpu()] - soft)
    ref_truth = soft + weights[:, None] * (table.cpu().double()[torch_out.tokens.cpu()] - soft)
    ref_err = (torch_out.embeds.cpu().double() - ref_truth).abs().max().item()
    assert (fused.embeds.cpu().double() - truth).abs().max().item() <= ref_err + SLACK[dtype] * 4
    torch.testing.assert_close(fused.weights.cpu().double(), weights, atol=1e-5, rtol=0)
    assert torch.equal(fused.argmax, torch_out.argmax)
    grad_truth = restated_grad(phi.cpu(), table.cpu(), tau, g.cpu())
    ref_grad_err = (torch_grad.cpu().double() - grad_truth).abs().max().item()
    assert (fused_grad.cpu().double() - grad_truth).abs().max().item() <= ref_grad_err + GRAD_SLACK[dtype]
    torch.testing.assert_close(fused_grad.float().sum(-1).cpu(), torch.zeros(rows), atol=SLACK[dtype] * 5, rtol=0)


def test_a_column_slice_of_a_wider_table_is_read_with_its_row_stride():
    """A table view with a row stride wider than d (a column slice of a wider table)
    gives the contiguous copy's values and gradients bit for bit."""
    phi, wide = _inputs(9, 70, 2 * 24, torch.bfloat16)
    view = wide[:, 24:]
    assert not view.is_contiguous()
    g = torch.randn(9, 24, device=DEVICE)
    results = []
    for table in (view, view.contiguous()):
        leaf = phi.clone().requires_grad_(True)
        out = guided_embedding(leaf, table, temperature=0.7, top_p=0.9, mode="entrgi", backend="triton",
                               generator=torch.Generator(DEVICE).manual_seed(5))  # fmt: skip
        (out.embeds.float() * g).sum().backward()
        results.append((out.embeds, out.tokens, leaf.grad))
    assert all(torch.equal(a, b) for a, b in zip(*results))


def _confident_rows(rows, vocab, tau, offset, seed):
    """Rows whose top probability runs from ~0.2 to ~1 - 1e-5 at temperature ``tau``, all
    logits shifted by ``offset`` (softmax ignores it; |x / tau| grows with it)."""
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(rows, vocab, generator=g)
    phi[torch.arange(rows), torch.randint(0, vocab, (rows,), generator=g)] += torch.linspace(3, 12, rows)
    return phi * (tau / 0.7) + offset


@pytest.mark.parametrize("table_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tau,offset", [(0.7, 0.0), (0.7, 30.0), (0.03, 30.0)])
def test_gradient_at_the_argmax_of_confident_rows(table_dtype, tau, offset):
    """At a confident row's argmax, E_a . g - soft . g cancels down to (1 - p_a) times
    O(|g| |E|): smaller than the forward's rounding of p_a to the dot's dtype (2^-9) and
    than ulp(max / tau) in an unshifted p_a. The fused backward keeps that entry's sign
    and size (Adam steps on its sign), like the reference backend."""
    rows, vocab, d = 24, 97, 32
    phi = _confident_rows(rows, vocab, tau, offset, seed=4).to(DEVICE)
    table = torch.randn(vocab, d, generator=torch.Generator().manual_seed(5)).to(table_dtype).to(DEVICE)
    g = torch.randn(rows, d, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    leaf = phi.clone().requires_grad_(True)
    out = guided_embedding(leaf, table, temperature=tau, mode="expectation", backend="triton")
    (out.embeds.float() * g).sum().backward()
    rounded_g = g.to(table_dtype).cpu()  # what both backends' dots read
    truth = restated_grad(phi.cpu(), table.cpu(), tau, rounded_g)
    top = phi.cpu().argmax(-1)
    p_top = torch.softmax(phi.cpu().double() / tau, -1).gather(-1, top[:, None]).squeeze(-1)
    resolvable = 1 - p_top > 1e-4  # fp32 resolves (1 - p) there
    assert resolvable.sum() >= rows // 2
    at_top = leaf.grad.cpu().double().gather(-1, top[:, None]).squeeze(-1)[resolvable]
    want = truth.gather(-1, top[:, None]).squeeze(-1)[resolvable]
    assert torch.equal(at_top.sign(), want.sign())
    # what is left: the other entries' p rounded in the forward's dot, 2^-9 (1 - p_a) relative
    # (2^-8 under the interpreter, whose casts truncate): about 3% at worst here
    torch.testing.assert_close(at_top, want, rtol=0.1, atol=0)


def test_kept_law_confidence_at_large_scaled_logits():
    """Kept-law probabilities are read relative to the kept maximum. At |x / tau| ~ 2e3,
    x / tau itself carries ulp(2e3) = 1.2e-4, which moves p_top by ~1.2e-4 (1 - p_top) in
    any fp32 arithmetic; an absolute logsumexp would move it by 1.2e-4 p_top."""
    from entrgi.ops.reference import step_confidence_reference

    phi = _confident_rows(16, 61, 0.03, 60.0, seed=9).to(DEVICE)
    for alg in ("maskgit_plus", "topk_margin"):
        only_top = sample_step(phi, temperature=0.03, top_k=1, alg=alg, backend="triton")
        assert torch.equal(only_top.confidence, torch.ones_like(only_top.confidence))  # the kept law is one-hot
        fused = sample_step(phi, temperature=0.03, top_p=0.999, alg=alg, backend="triton",
                            generator=torch.Generator(DEVICE).manual_seed(2))  # fmt: skip
        expected = step_confidence_reference(phi, phi, fused.tokens, 0.03, 0.999, 0, alg)
        confident = (fused.tokens == phi.argmax(-1)) & (expected > 0.99)
        assert confident.sum() >= 4
        torch.testing.assert_close(fused.confidence[confident], expected[confident], atol=3e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("top_p,top_k", [(0.9, 0), (0.5, 0), (0.99, 13), (1.0, 5), (0.2, 3), (0.95, 1), (1.0, 0)])
def test_threshold_keeps_exactly_the_reference_set(top_p, top_k, dtype):
    from entrgi_kernels.row_stats import row_stats
    from entrgi_kernels.threshold import keep_threshold_keys

    g = torch.Generator().manual_seed(11)
    x = torch.randn(64, 211, generator=g) * 3
    x[:8, ::4] = -math.inf
    x[8:16] = torch.randint(-3, 3, (8, 211), generator=g).float()  # heavy ties
    x[16] = -math.inf
    x[16, 5] = 1.0  # one finite entry
    x[17, :40], x[17, 40:80] = 0.0, -0.0  # signed zeros tie
    x = x.to(dtype).to(DEVICE)
    for tau in (0.7, 1.0):
        keys = keep_threshold_keys(x, row_stats(x, tau).tempered, tau, top_p, top_k)
        scaled = x.float() * torch.tensor(1.0 / tau)  # the kernel's arithmetic (x / tau can differ by an ulp)
        expected = scaled >= keep_threshold(scaled, top_p, top_k)[:, None]
        assert torch.equal(filter_keys(x, tau) >= keys[:, None], expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_signed_zeros_at_the_top_k_boundary_are_both_drawn(dtype):
    """-0 and +0 are one logit: at the top-k boundary both are kept and drawn alike.
    The kept-set test above compares keys that equate them already, so only draws show
    a kernel key that orders -0 below +0 (the commit's threshold sampler would then
    never draw -0's token)."""
    x = torch.tensor([-0.0, 0.0, -3.0, -2.5, -4.0, -math.inf])
    rows = x.expand(300, 6).contiguous().to(dtype).to(DEVICE)
    tokens = sample_step(rows, temperature=1.0, top_p=1.0, top_k=1, alg="maskgit_plus", backend="triton",
                         generator=torch.Generator(DEVICE).manual_seed(3)).tokens  # fmt: skip
    assert_law(tokens.cpu(), filtered_law(x, 1.0, 1.0, 1))


# (1.0, 0.15, 0) keeps little mass: most rows reject all four draws and take the
# threshold path, so both samplers are held to the law. sample_step with a kept-law
# confidence (maskgit_plus) draws through the threshold alone.
LAW_CASES = [(0.7, 0.8, 0), (1.3, 0.9, 4), (1.0, 0.15, 0), (1.0, 1.0, 0)]


def _law_rows():
    vocab = 10
    phi = torch.randn(vocab, generator=torch.Generator().manual_seed(5)) * 1.5
    phi[3] = -math.inf
    draws = 20_000 if DEVICE == "cuda" else 1500  # the interpreter runs one program per row
    return phi, phi.expand(draws, vocab).contiguous().to(DEVICE)


@triton.jit
def _noise_kernel(u_ptr, out_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(out_ptr + offsets, _exponential(tl.load(u_ptr + offsets)))


def test_exponential_noise_is_finite_and_positive_over_the_uniforms_range():
    """tl.rand returns 0 to 1 - 2^-23: the noise E = -log u stays in (0, inf), so no
    token arrives at time 0 (a certain win) nor at inf (never drawn) by noise alone."""
    u = torch.tensor([0.0, 2**-31, 1e-9, 1e-6, 0.01, 0.3, 0.5, 0.7, 0.9, 0.99, 0.999, 0.9999, 1 - 2**-22,
                      1 - 2**-23, 0.25, 0.75], device=DEVICE)  # fmt: skip
    noise = torch.empty_like(u)
    _noise_kernel[(1,)](u, noise, BLOCK=16)
    torch.testing.assert_close(noise.double(), -u.double().clamp_min(4.7e-10).log(), rtol=1e-6, atol=0)
    assert (noise > 0).all() and noise.isfinite().all()


@pytest.mark.parametrize("tau,top_p,top_k", LAW_CASES)
def test_sampling_law(tau, top_p, top_k):
    phi, rows = _law_rows()
    out = guided_embedding(rows, torch.randn(10, 16, device=DEVICE), temperature=tau, top_p=top_p, top_k=top_k,
                           mode="aps", backend="triton", generator=torch.Generator(DEVICE).manual_seed(9))  # fmt: skip
    assert_law(out.tokens.cpu(), filtered_law(phi, tau, top_p, top_k))


@pytest.mark.parametrize("tau,top_p,top_k", LAW_CASES[1:2])
def test_step_sampling_law_through_the_threshold(tau, top_p, top_k):
    phi, rows = _law_rows()
    tokens = sample_step(rows, temperature=tau, top_p=top_p, top_k=top_k, alg="maskgit_plus", backend="triton",
                         generator=torch.Generator(DEVICE).manual_seed(9)).tokens  # fmt: skip
    assert_law(tokens.cpu(), filtered_law(phi, tau, top_p, top_k))


@pytest.mark.parametrize("alg", ["entropy", "origin"])
def test_step_draws_like_the_guidance_op(alg):
    """Without a kept-law confidence the commit draws through the guidance op's
    rejection sampler (whose law is tested above): same seed, same tokens."""
    phi, table = _inputs(40, 30, 8, torch.float32, seed=8)
    kwargs = dict(temperature=0.8, top_p=0.7, top_k=12, backend="triton")
    step = sample_step(phi, alg=alg, generator=torch.Generator(DEVICE).manual_seed(2), **kwargs)
    guided = guided_embedding(phi, table, generator=torch.Generator(DEVICE).manual_seed(2), **kwargs)
    assert torch.equal(step.tokens, guided.tokens)


def test_seed_reproducibility_and_fresh_draws():
    phi, table = _inputs(64, 50, 16, torch.float32)
    draw = lambda gen: guided_embedding(phi, table, backend="triton", generator=gen).tokens  # noqa: E731
    first = draw(torch.Generator(DEVICE).manual_seed(4))
    assert torch.equal(first, draw(torch.Generator(DEVICE).manual_seed(4)))
    generator = torch.Generator(DEVICE).manual_seed(4)
    draw(generator)
    assert not torch.equal(first, draw(generator))


@pytest.mark.parametrize("alg", ["entropy", "maskgit_plus", "topk_margin", "origin", "low_confidence"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_step_confidence_matches_reference(alg, temperature):
    phi, _ = _inputs(12, 53, 16, torch.float32)
    phi_init = phi * 0.5 + 0.3
    fused = sample_step(phi, phi_init, temperature=temperature, top_p=0.9, top_k=10, alg=alg, backend="triton")
    from entrgi.ops.reference import step_confidence_reference

    expected = step_confidence_reference(phi, phi_init, fused.tokens, temperature, 0.9, 10, alg)
    torch.testing.assert_close(fused.confidence, expected, atol=1e-5, rtol=1e-5)
    if temperature == 0.0:
        assert torch.equal(fused.tokens, phi.argmax(-1))
    else:
        keep = phi / temperature >= keep_threshold(phi / temperature, 0.9, 10)[:, None]
        assert keep.gather(-1, fused.tokens[:, None]).all()


def test_temperature_zero_and_leading_dims():
    phi, table = _inputs(6, 40, 16, torch.float32)
    out = guided_embedding(phi.view(2, 3, 40), table, temperature=0.0, backend="triton")
    assert out.embeds.shape == (2, 3, 16)
    assert torch.equal(out.tokens.view(-1), phi.argmax(-1))
    torch.testing.assert_close(out.embeds.view(6, 16), table[phi.argmax(-1)])


@pytest.mark.parametrize("lead", [(0,), (2, 0)])
@pytest.mark.parametrize("temperature", [0.7, 0.0])
def test_no_rows_give_empty_results_like_the_reference(lead, temperature):
    """The kernels' launch geometry divides the GPU among the rows: none must not divide by zero."""
    phi = torch.randn(*lead, 37, device=DEVICE)
    table = torch.randn(37, 8, device=DEVICE)
    results = {}
    for backend in ("triton", "torch"):
        leaf = phi.clone().requires_grad_(True)
        out = guided_embedding(leaf, table, temperature=temperature, top_p=0.9, backend=backend)
        if temperature > 0:
            out.embeds.sum().backward()
        step = sample_step(phi, phi, temperature=temperature, top_k=3, alg="entropy", backend=backend)
        confidence = entropy_confidence(phi, backend=backend)
        results[backend] = [*out, leaf.grad, *step, confidence]
    for fused, reference in zip(results["triton"], results["torch"]):
        assert (fused is None) == (reference is None)
        if fused is not None:
            assert fused.shape == reference.shape and fused.dtype == reference.dtype


ACTIVE_PATTERNS = {
    "scattered": lambda n, g: torch.rand(n, generator=g) < 0.4,
    "all": lambda n, g: torch.ones(n, dtype=torch.bool),
    "none": lambda n, g: torch.zeros(n, dtype=torch.bool),
    "tail": lambda n, g: torch.arange(n) >= n - 3,
}


@pytest.mark.parametrize("pattern", sorted(ACTIVE_PATTERNS))
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("mode", ["entrgi", "expectation"])
def test_inactive_rows_are_skipped_and_zero(pattern, backend, mode):
    """Active rows equal the unmasked call (same draws: the noise is keyed by row);
    inactive rows are zero and pass no gradient."""
    phi, table = _inputs(37, 128, 32, torch.float32, seed=2)  # whole tiles: loads without masks
    active = ACTIVE_PATTERNS[pattern](37, torch.Generator().manual_seed(1)).to(DEVICE)
    g = torch.randn(37, 32, device=DEVICE)
    results = []
    for mask in (None, active):
        leaf = phi.clone().requires_grad_(True)
        out = guided_embedding(leaf, table, temperature=0.8, top_p=0.9, top_k=30, mode=mode, backend=backend,
                               generator=torch.Generator(DEVICE).manual_seed(3), active=mask)  # fmt: skip
        (out.embeds.float() * g).sum().backward()
        results.append((out, leaf.grad))
    (full, full_grad), (masked, masked_grad) = results
    for name in ("embeds", "tokens", "weights", "argmax"):
        got, want = getattr(masked, name), getattr(full, name)
        torch.testing.assert_close(got[active], want[active], atol=1e-6, rtol=0, msg=name)
        assert not got[~active].any(), f"{name} of inactive rows must be 0"
    torch.testing.assert_close(masked_grad[active], full_grad[active], atol=1e-6, rtol=0)
    assert not masked_grad[~active].any()


@pytest.mark.parametrize("alg", ["entropy", "maskgit_plus", "origin"])
def test_sample_step_inactive_rows(alg):
    phi, _ = _inputs(21, 64, 8, torch.bfloat16, seed=4)
    phi_init = (phi.float() * 0.5).to(phi.dtype)
    active = (torch.rand(21, generator=torch.Generator().manual_seed(0)) < 0.5).to(DEVICE)
    kwargs = dict(temperature=0.9, top_p=0.9, alg=alg, backend="triton")
    full = sample_step(phi, phi_init, generator=torch.Generator(DEVICE).manual_seed(5), **kwargs)
    masked = sample_step(phi, phi_init, generator=torch.Generator(DEVICE).manual_seed(5), active=active, **kwargs)
    assert torch.equal(masked.tokens[active], full.tokens[active])
    torch.testing.assert_close(masked.confidence[active], full.confidence[active])
    assert not masked.tokens[~active].any()
    assert torch.isneginf(masked.confidence[~active]).all()


def test_sample_step_confidence_of_phi_itself():
    """Without phi_init the entropy confidence reads phi (one row-stats pass)."""
    phi, _ = _inputs(9, 41, 8, torch.float32, seed=6)
    fused = sample_step(phi, temperature=0.6, alg="entropy", backend="triton")
    from entrgi.ops.reference import step_confidence_reference

    expected = step_confidence_reference(phi, phi, fused.tokens, 0.6, 1.0, 0, "entropy")
    torch.testing.assert_close(fused.confidence, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tau", [0.01, 0.7])
def test_entropy_and_weights_at_large_scaled_logits(tau):
    """Row statistics keep their first moments relative to the running maximum: at
    |x / tau| ~ 6e3, E_p[x / tau] - lse taken as two sums of that size loses ~1e-3."""
    phi = _confident_rows(16, 61, tau, 60.0, seed=3).to(DEVICE)
    x = phi.cpu().double()
    got = entropy_confidence(phi, temperature=tau, backend="triton").cpu().double()
    torch.testing.assert_close(got, sum_p_log_p(torch.softmax(x / tau, -1)), atol=2e-5, rtol=0)
    weights = guided_embedding(phi, torch.randn(61, 8, device=DEVICE), temperature=tau, backend="triton").weights
    torch.testing.assert_close(
        weights.cpu().double(), -sum_p_log_p(torch.softmax(x, -1)) / math.log(61), atol=2e-6, rtol=0
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.0, 0.6, 1.3])
def test_entropy_confidence_matches_the_reference(dtype, temperature):
    phi, _ = _inputs(2 * 7, 45, 8, dtype, seed=8)
    phi = phi.view(2, 7, 45)
    active = (torch.rand(2, 7, generator=torch.Generator().manual_seed(1)) < 0.6).to(DEVICE)
    want = entropy_confidence(phi, temperature=temperature, backend="torch", active=active)
    got = entropy_confidence(phi, temperature=temperature, backend="triton", active=active)
    assert got.shape == (2, 7) and torch.isneginf(got[~active]).all()
    torch.testing.assert_close(got[active], want[active], atol=1e-5, rtol=1e-5)
    assert want[active].lt(0).all()  # sum p log p of a spread-out row is negative


def _adam_steps(phi, table, grads, backend, active, moving, fused_into_backward, moment_dtype=torch.float32,
                replay_from=None):  # fmt: skip
    """Adam steps on phi (R, V) fp32 through the op's backward (loss = sum embeds * g),
    one per gradient in ``grads``."""
    from entrgi.optim import LogitAdam

    leaf = phi.clone().requires_grad_(True)
    optimizer = LogitAdam(leaf, lr=0.3, active=moving, backend=backend, moment_dtype=moment_dtype,
                          replay_from=replay_from, max_steps=len(grads))  # fmt: skip
    for g in grads:
        kwargs = dict(temperature=0.8, top_p=0.9, backend=backend, active=active)
        if fused_into_backward:
            out = guided_embedding(leaf, table, optimizer=optimizer, **kwargs)
            torch.autograd.backward((out.embeds.float() * g).sum(), inputs=[leaf])
            assert leaf.grad is None
        else:
            out = guided_embedding(leaf, table, **kwargs)
            (grad,) = torch.autograd.grad((out.embeds.float() * g).sum(), leaf)
            optimizer.step(grad)
    return leaf.detach()


def _adam_case(rows: int, d: int, seed: int):
    """Three incoming gradients (rows, d), the op's active rows and the subset that moves."""
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(rows, d, generator=g).to(DEVICE) for _ in range(3)]
    active = (torch.rand(rows, generator=g) < 0.7).to(DEVICE)
    moving = active & (torch.rand(rows, generator=g) < 0.7).to(DEVICE)
    return grads, active, moving


@pytest.mark.parametrize("moment_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,vocab,d", [(7, 101, 24), (20, 70, 130), (9, 128, 32)])
def test_adam_fused_into_the_backward_matches_a_separate_step(table_dtype, rows, vocab, d, moment_dtype):
    """The Triton backward kernel's in-place Adam step equals dphi followed by Adam,
    and both equal the reference backend; frozen and skipped rows stay put."""
    phi, table = _inputs(rows, vocab, d, torch.float32, seed=9)
    table = table.to(table_dtype)
    grads, active, moving = _adam_case(rows, d, seed=2)
    steps = functools.partial(_adam_steps, phi, table, grads, active=active, moving=moving, moment_dtype=moment_dtype)
    fused = steps("triton", fused_into_backward=True)
    separate = steps("triton", fused_into_backward=False)
    reference = steps("torch", fused_into_backward=True)
    torch.testing.assert_close(fused, separate, atol=1e-6, rtol=1e-6, equal_nan=True)
    tol = 1e-4 if table_dtype == torch.float32 else 3e-2  # the tensor-core dot rounds g to bf16
    if moment_dtype == torch.bfloat16:  # dphi's last bit may round a moment to the other bf16 neighbour:
        tol = max(tol, len(grads) * 0.3 * 2**-8)  # a 2^-8 change of one step of lr = 0.3, each step
    torch.testing.assert_close(fused, reference, atol=tol, rtol=tol, equal_nan=True)
    assert torch.equal(fused[~moving], phi[~moving])
    assert (fused[moving] != phi[moving]).any(-1).all()


@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,vocab,d", [(7, 101, 24), (20, 70, 130), (9, 128, 32)])
@pytest.mark.parametrize("anchor_dtype", [torch.float32, torch.bfloat16])
def test_replayed_adam_equals_stored_moments(table_dtype, rows, vocab, d, anchor_dtype):
    """Adam recomputed from the initial logits (no moments stored) gives the rows that
    float32 moments give: bit for bit under the interpreter (same arithmetic in the same
    order). With a float32 table, also the reference backend's (with bf16 the stored
    path's agreement with the reference is the fused-Adam test's)."""
    phi, table = _inputs(rows, vocab, d, torch.float32, seed=11)
    anchor = phi.to(anchor_dtype)
    phi, table = anchor.float(), table.to(table_dtype)  # the float32 rows are the anchor's values
    grads, active, moving = _adam_case(rows, d, seed=3)
    steps = functools.partial(_adam_steps, phi, table, grads, active=active, moving=moving, fused_into_backward=True)
    replayed = steps("triton", replay_from=anchor)
    stored = steps("triton")
    if DEVICE == "cpu":
        assert torch.equal(replayed, stored)
    torch.testing.assert_close(replayed, stored, atol=1e-6, rtol=1e-6)
    if table_dtype == torch.float32:
        torch.testing.assert_close(replayed, steps("torch", replay_from=anchor), atol=1e-4, rtol=1e-4)
    assert torch.equal(replayed[~moving], phi[~moving])
    assert (replayed[moving] != phi[moving]).any(-1).all()


def test_adam_replay_refuses_what_it_cannot_replay():
    from entrgi.optim import LogitAdam

    phi, table = _inputs(4, 50, 8, torch.float32, seed=12)
    anchor = phi.clone()
    leaf = phi.clone().requires_grad_(True)
    optimizer = LogitAdam(leaf, lr=0.1, backend="triton", replay_from=anchor, max_steps=2)
    assert optimizer.exp_avg is None and optimizer.exp_avg_sq is None  # no moments stored

    def step(tau=0.8, table=table):
        out = guided_embedding(leaf, table, temperature=tau, backend="triton", optimizer=optimizer)
        torch.autograd.backward(out.embeds.sum(), inputs=[leaf])

    step()
    with pytest.raises(ValueError, match="same table at the same temperature"):
        step(tau=0.5)
    with pytest.raises(ValueError, match="same table at the same temperature"):
        step(table=table.clone())
    step()
    with pytest.raises(RuntimeError, match="max_steps=2 steps; all are taken"):
        step()
    with pytest.raises(RuntimeError, match="steps only inside guided_embedding's backward"):
        optimizer.step(torch.zeros_like(phi))


def test_optimizer_argument_is_validated():
    from entrgi.optim import LogitAdam

    phi, table = _inputs(3, 40, 8, torch.float32, seed=10)
    leaf = phi.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="over phi itself"):
        guided_embedding(leaf, table, optimizer=LogitAdam(phi.clone(), lr=0.1))
    with pytest.raises(ValueError, match="require grad"):
        guided_embedding(phi, table, optimizer=LogitAdam(phi, lr=0.1))
    with pytest.raises(ValueError, match="temperature 0"):
        guided_embedding(leaf, table, temperature=0.0, optimizer=LogitAdam(leaf, lr=0.1))


def test_row_list_orders_active_rows_first():
    from entrgi.ops.triton_backend import row_list

    active = torch.tensor([False, True, True, False, True, False])
    order, count = row_list(active)
    assert order.tolist() == [1, 2, 4, 0, 3, 5] and count.tolist() == [3]
    assert order.dtype == count.dtype == torch.int32


def test_active_mask_is_validated():
    phi, table = _inputs(4, 20, 8, torch.float32)
    with pytest.raises(ValueError, match="active shape"):
        guided_embedding(phi, table, active=torch.ones(3, dtype=torch.bool, device=DEVICE))
    with pytest.raises(TypeError, match="bool"):
        sample_step(phi, active=torch.ones(4, device=DEVICE))


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("fused_adam", [False, True])
@pytest.mark.parametrize("vocab,d", [(90, 24), (128, 32)])  # the second fills whole tiles
def test_table_rows_read_the_reward_table_in_place(backend, fused_adam, vocab, d):
    """A (V_t, d) table read through table_rows (V,) gives exactly what the copied
    (V, d) table gives: embeddings, draws, gradients or Adam steps, greedy rows."""
    from entrgi.optim import LogitAdam

    phi, _ = _inputs(13, vocab, d, torch.float32, seed=12)
    g = torch.Generator().manual_seed(3)
    reward_table = torch.randn(70, d, generator=g).to(torch.bfloat16).to(DEVICE)
    table_rows = torch.randint(0, 70, (vocab,), generator=g).to(DEVICE)  # repeated and unread rows
    active = (torch.rand(13, generator=g) < 0.7).to(DEVICE)
    grad = torch.randn(13, d, generator=g).to(DEVICE)
    results = []
    for table, rows in ((reward_table[table_rows], None), (reward_table, table_rows.to(torch.int32))):
        leaf = phi.clone().requires_grad_(True)
        optimizer = LogitAdam(leaf, lr=0.3, active=active, backend=backend) if fused_adam else None
        out = guided_embedding(leaf, table, temperature=0.8, top_p=0.9, backend=backend, active=active,
                               generator=torch.Generator(DEVICE).manual_seed(1), optimizer=optimizer,
                               table_rows=rows)  # fmt: skip
        torch.autograd.backward((out.embeds.float() * grad).sum(), inputs=[leaf])
        greedy = guided_embedding(phi, table, temperature=0.0, backend=backend, table_rows=rows).embeds
        results.append((out, leaf.detach() if fused_adam else leaf.grad, greedy))
    (copied, copied_phi, copied_greedy), (gathered, gathered_phi, gathered_greedy) = results
    for name in copied._fields:
        assert torch.equal(getattr(gathered, name), getattr(copied, name)), name
    assert torch.equal(gathered_phi, copied_phi) and gathered_phi.ne(phi).any()
    assert torch.equal(gathered_greedy, copied_greedy)


def test_table_rows_are_validated():
    phi, table = _inputs(3, 40, 8, torch.float32, seed=13)
    rows = torch.arange(40, device=DEVICE)
    with pytest.raises(ValueError, match=r"table_rows must have shape \(V,\) = \(40,\)"):
        guided_embedding(phi, table, table_rows=rows[:30])
    with pytest.raises(TypeError, match="int32/int64"):
        guided_embedding(phi, table, table_rows=rows.float())
    with pytest.raises(ValueError, match=r"table_rows values must lie in \[0, 20\), got \[0, 39\]"):
        guided_embedding(phi, table[:20], table_rows=rows)
    with pytest.raises(ValueError, match="vocabulary size mismatch"):
        guided_embedding(phi, table[:20])
