"""Seeded random configurations of the Triton ops against float64 and the reference.

The per-feature tests pin one axis at a time; these draw every axis at once (dtype of
phi and of the table, V and d off the block sizes, tau down to 1e-3, top-p / top-k at
their edges, -inf patterns, ties, peaked rows, a gathered table, inactive rows), the
combinations where earlier bugs hid: with probabilities read as exp(x / tau - lse),
seeds 0, 11, 16 and 22 fail (tau = 1e-3 and large logits: gradient entries tens off
where the truth is ~0).
"""

from __future__ import annotations

import math
import random

import pytest
import torch

pytest.importorskip("triton")

from entrgi import guided_embedding, sample_step  # noqa: E402
from entrgi.ops.reference import keep_threshold, step_confidence_reference  # noqa: E402
from helpers import restated_forward, restated_grad  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# relative rounding of one cast to phi's dtype (the interpreter truncates: a full ulp)
CAST_ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def _logits(rng: random.Random, gen: torch.Generator, rows: int, vocab: int) -> torch.Tensor:
    shape = rng.choice(["normal", "ties", "peaked", "flat", "wide"])
    if shape == "ties":
        x = torch.randint(-3, 4, (rows, vocab), generator=gen).float() * 0.5
    elif shape == "flat":
        x = 0.25 + 1e-3 * torch.randn(rows, vocab, generator=gen)
    else:
        x = torch.randn(rows, vocab, generator=gen) * {"normal": 2.0, "peaked": 1.0, "wide": 30.0}[shape]
        if shape == "peaked":
            x[torch.arange(rows), torch.randint(0, vocab, (rows,), generator=gen)] += 20
    if rng.random() < 0.4:
        x = x.masked_fill(torch.rand(rows, vocab, generator=gen) < rng.choice([0.1, 0.5, 0.9]), -math.inf)
        x[torch.arange(rows), torch.randint(0, vocab, (rows,), generator=gen)] = 0.0  # one finite entry at least
    return x


def _config(seed: int) -> dict:
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    rows, vocab, d = rng.choice([1, 3, 8, 17]), rng.choice([3, 31, 100, 257, 1000]), rng.choice([4, 33, 64])
    dtype, table_dtype = rng.choice(DTYPES), rng.choice((torch.float32, torch.bfloat16))
    gathered = rng.random() < 0.3  # a table in another vocabulary (5 more rows), read through a row map
    table = torch.randn(vocab + 5 * gathered, d, generator=gen).to(table_dtype)
    table_rows = torch.randint(0, table.shape[0], (vocab,), generator=gen) if gathered else None
    active = torch.rand(rows, generator=gen) < 0.6 if rng.random() < 0.3 else None
    if active is not None:
        active[0] = True
    return dict(
        phi=_logits(rng, gen, rows, vocab).to(dtype), table=table, table_rows=table_rows, active=active,
        g=torch.randn(rows, d, generator=gen), tau=rng.choice([1e-3, 0.3, 0.7, 1.0, 2.5]),
        top_p=rng.choice([1.0, 0.95, 0.5, 1e-6]), top_k=rng.choice([0, 1, 5, vocab - 1, vocab + 3]),
        mode=rng.choice(["entrgi", "aps", "expectation"]),
        alg=rng.choice(["entropy", "maskgit_plus", "topk_margin", "origin", "low_confidence"]),
    )  # fmt: skip


def _kept(phi: torch.Tensor, tau: float, top_p: float, top_k: int) -> torch.Tensor:
    scaled = phi.float() * torch.tensor(1.0 / tau)  # the kernels' x / tau
    return scaled >= keep_threshold(scaled, top_p, top_k)[:, None]


def _run_op(cfg: dict, backend: str):
    leaf = cfg["phi"].to(DEVICE, copy=True).requires_grad_(True)
    out = guided_embedding(
        leaf, cfg["table"].to(DEVICE), temperature=cfg["tau"], top_p=cfg["top_p"], top_k=cfg["top_k"],
        mode=cfg["mode"], backend=backend, generator=torch.Generator(DEVICE).manual_seed(1),
        active=None if cfg["active"] is None else cfg["active"].to(DEVICE),
        table_rows=None if cfg["table_rows"] is None else cfg["table_rows"].to(DEVICE),
    )  # fmt: skip
    (out.embeds.float() * cfg["g"].to(DEVICE)).sum().backward()
    return out, leaf.grad.cpu().double()


@pytest.mark.parametrize("seed", range(24))
def test_random_configuration(seed):
    cfg = _config(seed)
    phi, tau, top_p, top_k = cfg["phi"], cfg["tau"], cfg["top_p"], cfg["top_k"]
    table = cfg["table"] if cfg["table_rows"] is None else cfg["table"][cfg["table_rows"]]
    live = torch.ones(phi.shape[0], dtype=torch.bool) if cfg["active"] is None else cfg["active"]
    (fused, fused_grad), (ref, ref_grad) = _run_op(cfg, "triton"), _run_op(cfg, "torch")
    assert torch.equal(fused.argmax.cpu()[live], ref.argmax.cpu()[live])
    tol = 1e-5 if phi.dtype == torch.float32 else 2e-3
    torch.testing.assert_close(fused.weights.cpu()[live], ref.weights.cpu()[live], atol=tol, rtol=tol)
    tokens = fused.tokens.cpu()[live]
    kept = _kept(phi, tau, top_p, top_k)[live]
    assert kept.gather(-1, tokens[:, None]).all()
    # forward against float64, with the op's own draws
    soft, _, _ = restated_forward(phi[live], table, tau)
    weight = fused.weights.cpu().double()[live, None]
    want = soft if cfg["mode"] == "expectation" else soft + weight * (table.double()[tokens] - soft)
    scale = want.abs().max().clamp_min(1.0)
    table_tol = 2e-2 if table.dtype == torch.bfloat16 or phi.dtype != torch.float32 else 1e-4
    assert (fused.embeds.cpu().double()[live] - want).abs().max() <= table_tol * scale
    # gradient against float64 of the g the dots read (rounded to the table's dtype); the
    # fused error, net of its final cast to phi's dtype, within twice the reference's
    truth = restated_grad(phi[live], table, tau, cfg["g"].to(table.dtype)[live])
    ref_err = (ref_grad[live] - truth).abs().max()
    natural = table.double().norm(dim=-1).max() * cfg["g"].double().norm(dim=-1).max() / tau
    excess = (fused_grad[live] - truth).abs() - CAST_ULP[phi.dtype] * truth.abs()
    assert excess.max() <= 2 * ref_err + 1e-6 * natural
    if cfg["active"] is not None:
        assert not fused_grad[~live].any()
    # the commit step
    init = (phi.float() + torch.randn(phi.shape, generator=torch.Generator().manual_seed(seed))).to(phi.dtype)
    init = torch.where(phi.isinf(), phi, init)
    step = sample_step(phi.to(DEVICE), init.to(DEVICE), temperature=tau, top_p=top_p, top_k=top_k, alg=cfg["alg"],
                       backend="triton", generator=torch.Generator(DEVICE).manual_seed(2),
                       active=None if cfg["active"] is None else cfg["active"].to(DEVICE))  # fmt: skip
    step_tokens = step.tokens.cpu()[live]
    assert kept.gather(-1, step_tokens[:, None]).all()
    confidence = step_confidence_reference(phi, init, step.tokens.cpu(), tau, top_p, top_k, cfg["alg"])[live]
    got = step.confidence.cpu()[live]
    same_inf = got.isinf() & (got == confidence)
    conf_tol = 2e-3 if phi.dtype == torch.float32 else 1e-2
    assert (same_inf | ((got - confidence).abs() <= conf_tol * confidence.abs().clamp_min(1))).all()
