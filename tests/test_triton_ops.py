"""The Triton backend against the PyTorch reference (interpreter on CPU, native on GPU).

Errors are measured against a float64 ground truth: the fused result must be within
the same-dtype PyTorch reference's error plus a small tolerance.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from entrgi import guided_embedding, sample_step  # noqa: E402
from entrgi.ops.reference import keep_threshold  # noqa: E402
from helpers import assert_law, filtered_law, restated_forward, restated_grad  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SLACK = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
# dphi sums d products of size |g||E| before the cancellation (E g - soft . g); the tensor-core
# dot also rounds g to the table dtype: |error| grows like sqrt(d) u |g| |E| p / tau.
GRAD_SLACK = {torch.float32: 5e-5, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def _filter_keys(raw: torch.Tensor, tau: float) -> torch.Tensor:
    """The kernels' kept-set keys restated: order-preserving integers of x / tau (fp32)
    or of the 16-bit logits themselves, with -0 == +0."""
    x = raw * torch.tensor(1.0 / tau) if raw.dtype == torch.float32 else raw  # the kernel's x / tau
    x = torch.where(x == 0, torch.zeros_like(x), x)
    width = 32 if x.dtype == torch.float32 else 16
    bits = x.view(torch.int32 if width == 32 else torch.int16).long()
    return (bits ^ ((bits >> (width - 1)) & (2 ** (width - 1) - 1))) + 2 ** (width - 1)


def _inputs(rows, vocab, d, dtype, neg_inf=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    phi = (torch.randn(rows, vocab, generator=g) * 2).to(dtype)
    if neg_inf:
        phi[:, 1::7] = -math.inf
    table = torch.randn(vocab, d, generator=g).to(dtype)
    return phi.to(DEVICE), table.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,vocab,d", [(1, 37, 8), (19, 101, 24), (33, 70, 130), (5, 333, 40)])
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
        lse, _, _ = row_stats(x, tau)
        keys = keep_threshold_keys(x, lse, tau, top_p, top_k)
        scaled = x.float() * torch.tensor(1.0 / tau)  # the kernel's arithmetic (x / tau can differ by an ulp)
        expected = scaled >= keep_threshold(scaled, top_p, top_k)[:, None]
        assert torch.equal(_filter_keys(x, tau) >= keys[:, None], expected)


# (1.0, 0.15, 0) keeps little mass: most rows exhaust the rejection rounds and take the
# threshold path, so both samplers are held to the law.
@pytest.mark.parametrize("tau,top_p,top_k", [(0.7, 0.8, 0), (1.3, 0.9, 4), (1.0, 0.15, 0), (1.0, 1.0, 0)])
def test_sampling_law(tau, top_p, top_k):
    vocab = 10
    phi = torch.randn(vocab, generator=torch.Generator().manual_seed(5)) * 1.5
    phi[3] = -math.inf
    draws = 20_000 if DEVICE == "cuda" else 1500  # the interpreter runs one program per row
    rows = phi.expand(draws, vocab).contiguous().to(DEVICE)
    out = guided_embedding(rows, torch.randn(vocab, 16, device=DEVICE), temperature=tau, top_p=top_p, top_k=top_k,
                           mode="aps", backend="triton", generator=torch.Generator(DEVICE).manual_seed(9))  # fmt: skip
    assert_law(out.tokens.cpu(), filtered_law(phi, tau, top_p, top_k))


def test_seed_reproducibility_and_fresh_draws():
    phi, table = _inputs(64, 50, 16, torch.float32)
    draw = lambda gen: guided_embedding(phi, table, backend="triton", generator=gen).tokens  # noqa: E731
    first = draw(torch.Generator(DEVICE).manual_seed(4))
    assert torch.equal(first, draw(torch.Generator(DEVICE).manual_seed(4)))
    generator = torch.Generator(DEVICE).manual_seed(4)
    draw(generator)
    assert not torch.equal(first, draw(generator))


@pytest.mark.parametrize("alg", ["entropy", "maskgit_plus", "topk_margin", "origin"])
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
