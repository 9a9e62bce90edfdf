"""Independent float64 restatements of the op semantics and a χ² check, for tests."""

from __future__ import annotations

import math

import torch


def filtered_law(x: torch.Tensor, tau: float, top_p: float, top_k: int) -> torch.Tensor:
    """Exact sampling law of one row: softmax(phi/tau) restricted to the published
    top-p-then-top-k kept set (ties at the boundary kept), renormalised. float64."""
    scaled = x.double() / tau
    probs = torch.softmax(scaled, dim=-1)
    order = sorted(range(len(scaled)), key=lambda v: -scaled[v].item())
    kept, mass = [], 0.0
    for rank, v in enumerate(order):
        if rank > 0 and top_p < 1.0 and mass > top_p:
            break
        if top_k and rank >= top_k:
            break
        kept.append(v)
        mass += probs[v].item()
    boundary = min(scaled[v].item() for v in kept)
    keep = scaled >= boundary
    law = torch.where(keep, probs, torch.zeros_like(probs))
    return law / law.sum()


def restated_forward(phi, table, tau):
    """soft (R, d), w (R,) and p (R, V) in float64."""
    x = phi.double()
    p = torch.softmax(x / tau, dim=-1)
    soft = p @ table.double()
    p1 = torch.softmax(x, dim=-1)
    plogp = torch.where(p1 > 0, p1 * torch.log(p1), torch.zeros_like(p1))
    w = -plogp.sum(-1) / math.log(x.shape[-1])
    return soft, w, p


def restated_grad(phi, table, tau, g):
    """dphi = (1/tau) p * (E g - <g, soft>), float64."""
    soft, _, p = restated_forward(phi, table, tau)
    eg = g.double() @ table.double().T
    return p * (eg - (g.double() * soft).sum(-1, keepdim=True)) / tau


def chi2_critical(df: int, z: float = 3.7) -> float:
    """Wilson-Hilferty upper quantile of χ²(df); z = 3.7 is a 1e-4 false-alarm rate."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def assert_law(samples: torch.Tensor, law: torch.Tensor) -> None:
    """Every sample lies in the support, and the counts pass a χ² test against ``law``."""
    n = samples.numel()
    counts = torch.bincount(samples, minlength=law.numel()).double()
    support = law > 0
    assert counts[~support].sum() == 0, f"samples outside the kept set: {counts[~support]}"
    expected = law[support] * n
    stat = ((counts[support] - expected) ** 2 / expected).sum().item()
    df = int(support.sum()) - 1
    if df > 0:
        assert stat < chi2_critical(df), f"χ²={stat:.1f} exceeds the {df}-dof critical value"
