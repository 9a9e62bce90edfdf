"""The PyTorch backend of the ops against independent float64 restatements."""

from __future__ import annotations

import math

import pytest
import torch

from entrgi import guided_embedding, sample_step
from entrgi.ops.reference import keep_threshold
from entrgi.optim import LogitAdam
from helpers import assert_law, filtered_law, restated_forward, restated_grad

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _inputs(rows=5, vocab=37, d=6, dtype=torch.float32, with_neg_inf=False):
    phi = (torch.randn(rows, vocab) * 2).to(dtype)
    if with_neg_inf:
        phi[:, ::3] = -math.inf
    table = torch.randn(vocab, d)
    return phi, table


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_neg_inf", [False, True])
@pytest.mark.parametrize("tau", [0.7, 1.0, 1.6])
def test_forward_values_and_weights(dtype, with_neg_inf, tau):
    phi, table = _inputs(dtype=dtype, with_neg_inf=with_neg_inf)
    soft, w, _ = restated_forward(phi, table, tau)
    out = guided_embedding(phi, table, temperature=tau, mode="expectation", backend="torch")
    assert out.embeds.shape == (5, 6) and out.embeds.dtype == table.dtype
    torch.testing.assert_close(out.embeds.double(), soft, atol=TOL[dtype] * 10, rtol=0)
    assert torch.equal(out.weights, torch.zeros(5))
    entr = guided_embedding(phi, table, temperature=tau, backend="torch")
    torch.testing.assert_close(entr.weights.double(), w, atol=1e-5, rtol=0)
    hard = table[entr.tokens].double()
    torch.testing.assert_close(entr.embeds.double(), soft + w[:, None] * (hard - soft), atol=1e-4, rtol=0)
    assert torch.equal(entr.argmax, phi.float().argmax(-1))


@pytest.mark.parametrize("mode", ["entrgi", "aps", "expectation"])
@pytest.mark.parametrize("tau", [0.5, 1.3])
def test_gradient_flows_only_through_soft(mode, tau):
    phi, table = _inputs(with_neg_inf=True)
    phi.requires_grad_(True)
    g = torch.randn(5, 6)
    out = guided_embedding(phi, table, temperature=tau, top_p=0.9, mode=mode, backend="torch")
    (out.embeds * g).sum().backward()
    expected = restated_grad(phi.detach(), table, tau, g)
    torch.testing.assert_close(phi.grad.double(), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(phi.grad.sum(-1), torch.zeros(5), atol=1e-5, rtol=0)


def test_leading_dims_are_kept():
    phi, table = torch.randn(2, 3, 11), torch.randn(11, 4)
    out = guided_embedding(phi, table, backend="torch")
    assert out.embeds.shape == (2, 3, 4)
    assert out.tokens.shape == out.weights.shape == out.argmax.shape == (2, 3)
    assert out.tokens.dtype == torch.int64 and out.weights.dtype == torch.float32


@pytest.mark.parametrize(
    "tau,top_p,top_k", [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.0, 0.5, 0), (0.7, 1.0, 3), (1.2, 0.8, 2), (0.7, 0.3, 5)]
)
def test_sampling_law_matches_exact_filtered_distribution(tau, top_p, top_k):
    vocab = 9
    phi = torch.randn(vocab) * 1.5
    phi[4] = -math.inf
    table = torch.randn(vocab, 3)
    generator = torch.Generator().manual_seed(7)
    draws = 40_000
    out = guided_embedding(phi.expand(draws, vocab), table, temperature=tau, top_p=top_p, top_k=top_k,
                           mode="aps", generator=generator, backend="torch")  # fmt: skip
    assert_law(out.tokens, filtered_law(phi, tau, top_p, top_k))


def test_step_sampling_law_and_greedy():
    phi = torch.randn(12) * 2
    generator = torch.Generator().manual_seed(3)
    drawn = sample_step(phi.expand(30_000, 12), temperature=0.8, top_p=0.85, top_k=6, alg="maskgit_plus",
                        generator=generator, backend="torch")  # fmt: skip
    law = filtered_law(phi, 0.8, 0.85, 6)
    assert_law(drawn.tokens, law)
    torch.testing.assert_close(drawn.confidence.double(), law[drawn.tokens], atol=1e-6, rtol=0)
    greedy = sample_step(phi.expand(3, 12), temperature=0.0, backend="torch")
    assert torch.equal(greedy.tokens, phi.argmax().expand(3))


def test_keep_threshold_matches_the_published_sort_filter_without_ties():
    for _ in range(50):
        scaled = torch.randn(4, 64) * 3
        for top_p, top_k in [(0.9, 0), (0.5, 10), (1.0, 7), (0.99, 50)]:
            theta = keep_threshold(scaled, top_p, top_k)
            for row in range(4):
                law = filtered_law(scaled[row], 1.0, top_p, top_k)
                assert torch.equal(scaled[row] >= theta[row], law > 0)


def test_ties_at_the_boundary_are_all_kept():
    scaled = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0]])
    assert (scaled >= keep_threshold(scaled, 1.0, 2)).sum() == 4  # top-k: ties at the k-th value stay
    probs = torch.softmax(scaled[0], -1)
    theta = keep_threshold(scaled, probs[0].item() + 1e-4, 0)  # top-p reaches into the tied group
    assert (scaled >= theta).sum() == 4


@pytest.mark.parametrize("alg", ["entropy", "maskgit_plus", "topk_margin", "origin", "low_confidence"])
def test_step_confidence_restated(alg):
    phi, phi_init = torch.randn(6, 10), torch.randn(6, 10)
    drawn = sample_step(phi, phi_init, temperature=0.9, top_p=0.9, alg=alg, backend="torch")
    if alg == "entropy":
        p = torch.softmax(phi_init.double() / 0.9, -1)
        expected = (p * p.log()).sum(-1)
    elif alg == "origin":
        expected = torch.zeros(6, dtype=torch.float64)
    elif alg == "low_confidence":  # temperature 1, unfiltered
        expected = torch.softmax(phi.double(), -1).gather(-1, drawn.tokens[:, None])[:, 0]
    else:
        laws = torch.stack([filtered_law(row, 0.9, 0.9, 0) for row in phi])
        if alg == "maskgit_plus":
            expected = laws.gather(-1, drawn.tokens[:, None])[:, 0]
        else:
            top2 = laws.topk(2, -1).values
            expected = top2[:, 0] - top2[:, 1]
    torch.testing.assert_close(drawn.confidence.double(), expected, atol=1e-5, rtol=0)


def test_seed_reproducibility_and_fresh_draws():
    phi, table = torch.randn(64, 50), torch.randn(50, 4)
    first = guided_embedding(phi, table, generator=torch.Generator().manual_seed(5), backend="torch").tokens
    again = guided_embedding(phi, table, generator=torch.Generator().manual_seed(5), backend="torch").tokens
    generator = torch.Generator().manual_seed(5)
    guided_embedding(phi, table, generator=generator, backend="torch")
    later = guided_embedding(phi, table, generator=generator, backend="torch").tokens
    assert torch.equal(first, again)
    assert not torch.equal(first, later)


def test_temperature_zero_is_greedy_without_gradient():
    phi, table = torch.randn(4, 9, requires_grad=True), torch.randn(9, 3)
    out = guided_embedding(phi, table, temperature=0.0, backend="torch")
    assert torch.equal(out.tokens, phi.argmax(-1))
    torch.testing.assert_close(out.embeds, table[phi.argmax(-1)])
    assert not out.embeds.requires_grad


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"temperature": -0.1}, r"temperature must be 0 \(greedy\) or finite and >= 2.94e-39 \(1/temperature "),
        ({"temperature": 2e-39}, r"temperature must be 0 \(greedy\) or finite and >= 2.94e-39 .* got 2e-39"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -1}, "top_k must be an int >= 0"),
        ({"mode": "magic"}, "unknown mode 'magic'"),
        ({"backend": "cuda"}, "unknown backend 'cuda'"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        guided_embedding(torch.randn(2, 5), torch.randn(5, 3), **kwargs)


def test_bad_tensors_raise():
    table = torch.randn(5, 3)
    with pytest.raises(ValueError, match="vocabulary size mismatch: phi has V=6 but embed_table has 5 rows"):
        guided_embedding(torch.randn(2, 6), table)
    with pytest.raises(TypeError, match="phi must be float32, bfloat16 or float16, got torch.int64"):
        guided_embedding(torch.ones(2, 5, dtype=torch.long), table)
    with pytest.raises(ValueError, match=r"embed_table must have shape \(V, d\) with d >= 1, got \(5,\)"):
        guided_embedding(torch.randn(2, 5), torch.randn(5))
    with pytest.raises(ValueError, match=r"embed_table must have shape \(V, d\) with d >= 1, got \(5, 0\)"):
        guided_embedding(torch.randn(2, 5), torch.randn(5, 0))
    large = torch.tensor([[1.0, 2, 3, 4, 5], [40.0, 0, 0, 0, 0]])
    overflow = r"phi / temperature overflows float32 \(1 of 2 rows, the first at index \(1,\)\): at temperature 1e-37"
    with pytest.raises(ValueError, match=overflow + " a row's largest logit must be below 34 in magnitude"):
        guided_embedding(large, table, temperature=1e-37)
    with pytest.raises(ValueError, match=overflow.replace("phi", "phi_init")):
        sample_step(torch.randn(2, 5), large, temperature=1e-37)
    assert guided_embedding(large, table, temperature=1e-37, check_values=False).embeds.isnan().any()
    with pytest.raises(TypeError, match="temperature must be a Python number, got Tensor"):
        guided_embedding(torch.randn(2, 5), table, temperature=torch.tensor(0.7))
    with pytest.raises(TypeError, match="top_p must be a Python number, got str"):
        sample_step(torch.randn(2, 5), top_p="0.9")
    nan_phi = torch.randn(2, 5)
    nan_phi[1, 2] = math.nan
    with pytest.raises(ValueError, match=r"phi contains NaN: 1 of 2 rows, the first at index \(1,\)"):
        guided_embedding(nan_phi, table)
    no_mass = torch.randn(2, 3, 5)
    no_mass[1, 1:] = -math.inf
    with pytest.raises(ValueError, match=r"no finite logit \(all -inf; 2 of 6 rows, the first at index \(1, 1\)\)"):
        guided_embedding(no_mass, table)
    inf_phi = torch.randn(2, 5)
    inf_phi[0, 4] = math.inf
    with pytest.raises(ValueError, match=r"phi contains \+inf \(1 of 2 rows, the first at index \(0,\)\): logits must"):
        guided_embedding(inf_phi, table)
    with pytest.raises(ValueError, match=r"phi_init contains \+inf \(1 of 2 rows"):
        sample_step(torch.randn(2, 5), inf_phi)
    with pytest.raises(ValueError, match="phi_init contains NaN"):
        sample_step(torch.randn(2, 5), nan_phi)
    with pytest.raises(ValueError, match="unknown alg 'best'"):
        sample_step(torch.randn(2, 5), alg="best")
    inf_table = table.clone()
    inf_table[3, 1] = math.inf
    with pytest.raises(
        ValueError, match=r"embed_table \(5, 3\) contains NaN or inf: 1 of 5 rows, the first at index \(3,\)"
    ):
        guided_embedding(torch.randn(2, 5), inf_table)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        guided_embedding(torch.randn(2, 5), table, generator=0)


def test_bad_companions_of_phi_raise():
    """Tensors and options that go with phi: on its device, of its rows, over phi itself."""
    phi, table = torch.randn(2, 2, 5), torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"phi must have shape \(\.\.\., V\) with V >= 2, got \(2, 1\)"):
        guided_embedding(torch.randn(2, 1), table[:1])
    with pytest.raises(ValueError, match="phi is on cpu but embed_table is on meta"):
        guided_embedding(phi, table.to("meta"))
    rows = torch.tensor([0, 1, 2, 3, 19])
    with pytest.raises(ValueError, match="phi is on cpu but table_rows is on meta"):
        guided_embedding(phi, torch.randn(20, 3), table_rows=rows.to("meta"))
    rows[2] = -1
    with pytest.raises(ValueError, match=r"table_rows values must lie in \[0, 20\), got \[-1, 19\]"):
        guided_embedding(phi, torch.randn(20, 3), table_rows=rows)
    with pytest.raises(ValueError, match="generator is on cpu but phi is on meta"):
        guided_embedding(phi.to("meta"), table.to("meta"), generator=torch.Generator(), check_values=False)
    with pytest.raises(ValueError, match=r"active shape \(4,\) != phi's leading shape \(2, 2\)"):
        guided_embedding(phi, table, active=torch.ones(4, dtype=torch.bool))
    leaf = phi.clone().requires_grad_(True)
    with pytest.raises(ValueError, match=r"optimizer must be a LogitAdam over phi itself \(shape \(2, 2, 5\)\)"):
        guided_embedding(leaf, table, optimizer=LogitAdam(phi.clone(), lr=0.1))
    with pytest.raises(ValueError, match="optimizer= with temperature 0: the greedy embedding has no gradient"):
        guided_embedding(leaf, table, temperature=0.0, optimizer=LogitAdam(leaf, lr=0.1))


def test_triton_backend_off_cuda_needs_the_interpreter(monkeypatch):
    from entrgi_kernels import launch

    monkeypatch.setattr(launch, "can_launch", lambda device: device.type == "cuda")  # as off the interpreter
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors, got cpu"):
        guided_embedding(torch.randn(2, 5), torch.randn(5, 3), backend="triton")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors, got cpu"):
        sample_step(torch.randn(2, 5), backend="triton")
