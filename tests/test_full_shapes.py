"""The Triton op at the paper's vocabulary (V = 152,064) against the PyTorch backend, on
CUDA only: many chunks per row, split-V combines (row statistics, draws, the keep
threshold), bf16 tensor-core dots and the fused Adam backward at real sizes (the
interpreter tests use small shapes)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

VOCAB, WIDTH = 152_064, 1024


def _phi(rows: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator("cuda").manual_seed(seed)
    phi = torch.randn(rows, VOCAB, generator=g, device="cuda") * 3
    phi[:, 7::11] = -torch.inf
    return phi.to(dtype)


def _table(seed: int = 1) -> torch.Tensor:
    g = torch.Generator("cuda").manual_seed(seed)
    return torch.randn(VOCAB, WIDTH, generator=g, device="cuda").to(torch.bfloat16)


def _close(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    """Max abs error within ``rel`` of the reference's largest magnitude."""
    error, scale = (got.float() - want.float()).abs().max().item(), want.float().abs().max().item()
    assert error <= rel * scale, f"max error {error:.3g} > {rel} x {scale:.3g}"


@pytest.mark.parametrize("rows", [1, 128, 512])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_row_statistics_and_draws_at_full_vocabulary(rows, dtype):
    from entrgi_kernels.row_stats import row_stats
    from entrgi_kernels.sampling import rejection_sample

    phi = _phi(rows, dtype)
    stats = row_stats(phi, 0.7, tiles=True)
    x = phi.double()
    probs = torch.softmax(x, -1)
    entropy = -torch.where(probs > 0, probs * probs.log(), torch.zeros_like(probs)).sum(-1) / math.log(VOCAB)
    lse_tau = stats.row_max.double() / 0.7 + stats.lse_tau_shifted.double()
    torch.testing.assert_close(lse_tau, torch.logsumexp(x / 0.7, -1), atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(stats.entropy.double(), entropy, atol=1e-4, rtol=0)
    assert torch.equal(stats.argmax, phi.argmax(-1))
    assert torch.equal(row_stats(phi, 0.7, splits=1).argmax, stats.argmax)
    seed = torch.tensor([77], device="cuda")
    split = rejection_sample(phi, stats, seed, 0.7, 0.95, 0)
    whole = rejection_sample(phi, row_stats(phi, 0.7, splits=1, tiles=True), seed, 0.7, 0.95, 0, splits=1)
    assert torch.equal(split[0], whole[0]) and torch.equal(split[1], whole[1])
    assert split[1].float().mean() > 0.9  # four draws each kept with probability >= 0.95


@pytest.mark.parametrize("rows", [128, 512])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kept_set_and_kept_law_draw_at_full_vocabulary(rows, dtype):
    from entrgi.ops.reference import keep_threshold
    from entrgi_kernels.row_stats import row_stats
    from entrgi_kernels.sampling import sample_filtered
    from entrgi_kernels.threshold import keep_threshold_keys
    from helpers import filter_keys

    phi = _phi(rows, dtype, seed=3)
    norm = row_stats(phi, 0.7).tempered
    scaled = phi.float() * torch.tensor(1.0 / 0.7)
    expected = scaled >= keep_threshold(scaled, 0.95, 50)[:, None]
    seed = torch.tensor([78], device="cuda")
    drawn = []
    for splits in (None, 1):
        keys = keep_threshold_keys(phi, norm, 0.7, 0.95, 50, splits=splits)
        assert torch.equal(filter_keys(phi, 0.7) >= keys[:, None], expected)
        drawn.append(sample_filtered(phi, keys, seed, 0.7, splits=splits))
    assert torch.equal(drawn[0]["tokens"], drawn[1]["tokens"])
    assert expected.gather(-1, drawn[0]["tokens"][:, None]).all()
    kept = torch.where(expected, scaled.double(), -torch.inf)
    lse_kept = drawn[0]["lse_kept_shifted"].double() + drawn[0]["top1"].double()
    torch.testing.assert_close(lse_kept, torch.logsumexp(kept, -1), atol=1e-4, rtol=1e-5)
    assert torch.equal(drawn[0]["top2"], drawn[1]["top2"])


@pytest.mark.parametrize("rows", [128, 512])
def test_guided_embedding_and_gradient_at_full_vocabulary(rows):
    from entrgi import guided_embedding

    phi, table = _phi(rows, torch.float32, seed=2), _table()
    grad = torch.randn(rows, WIDTH, device="cuda")
    results = {}
    for backend in ("triton", "torch"):
        leaf = phi.clone().requires_grad_(True)
        out = guided_embedding(leaf, table, temperature=0.7, top_p=0.95, mode="expectation", backend=backend)
        (out.embeds.float() * grad).sum().backward()
        results[backend] = (out, leaf.grad)
    (fused, fused_grad), (eager, eager_grad) = results["triton"], results["torch"]
    assert torch.equal(fused.argmax, eager.argmax)
    torch.testing.assert_close(fused.weights, eager.weights, atol=1e-4, rtol=0)
    _close(fused.embeds, eager.embeds, 2e-2)
    _close(fused_grad, eager_grad, 2e-2)


def test_fused_adam_backward_at_full_vocabulary():
    from entrgi import guided_embedding
    from entrgi.optim import LogitAdam

    phi, table = _phi(256, torch.float32, seed=3), _table()
    grad = torch.randn(256, WIDTH, device="cuda")
    stepped = {}
    for fused in (True, False):
        leaf = phi.clone().requires_grad_(True)
        optimizer = LogitAdam(leaf, lr=0.5, backend="triton")
        out = guided_embedding(leaf, table, temperature=0.7, top_p=0.95, backend="triton",
                               generator=torch.Generator("cuda").manual_seed(4),
                               optimizer=optimizer if fused else None)  # fmt: skip
        loss = (out.embeds.float() * grad).sum()
        if fused:
            torch.autograd.backward(loss, inputs=[leaf])
        else:
            optimizer.step(torch.autograd.grad(loss, leaf)[0])
        stepped[fused] = leaf.detach()
    torch.testing.assert_close(stepped[True], stepped[False], atol=1e-5, rtol=1e-5)
    assert stepped[True].ne(phi).any()


def test_replayed_adam_at_full_vocabulary():
    """Three Adam steps recomputed from bf16 initial logits equal stored float32 moments'."""
    from entrgi import guided_embedding
    from entrgi.optim import LogitAdam

    initial, table = _phi(256, torch.bfloat16, seed=5), _table()
    grads = torch.randn(3, 256, WIDTH, device="cuda")
    stepped = {}
    for replay in (True, False):
        leaf = initial.float().requires_grad_(True)
        optimizer = LogitAdam(leaf, lr=0.5, backend="triton", replay_from=initial if replay else None, max_steps=3)
        generator = torch.Generator("cuda").manual_seed(6)
        for grad in grads:
            out = guided_embedding(leaf, table, temperature=0.7, top_p=0.95, backend="triton", generator=generator,
                                   optimizer=optimizer)  # fmt: skip
            torch.autograd.backward((out.embeds.float() * grad).sum(), inputs=[leaf])
        stepped[replay] = leaf.detach()
    torch.testing.assert_close(stepped[True], stepped[False], atol=1e-5, rtol=1e-5)
    assert stepped[True].ne(initial.float()).any()
