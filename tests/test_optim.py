"""LogitAdam (eager and fused Triton) against torch.optim.Adam, with frozen rows."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from entrgi.optim import LogitAdam

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAS_TRITON = importlib.util.find_spec("triton") is not None
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="needs triton"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frozen", [False, True])
def test_logit_adam_matches_torch_adam(backend, frozen):
    g = torch.Generator().manual_seed(0)
    start = torch.randn(2, 3, 1100, generator=g).to(DEVICE)  # V above one 1024-wide block
    active = torch.tensor([[True, False, True], [False, True, True]], device=DEVICE) if frozen else None
    ours = start.clone()
    theirs = start.clone().requires_grad_(True)
    optimizer, reference = LogitAdam(ours, lr=0.5, active=active, backend=backend), torch.optim.Adam([theirs], lr=0.5)
    for _ in range(4):
        grad = torch.randn(2, 3, 1100, generator=g).to(DEVICE)
        optimizer.step(grad)
        theirs.grad = grad if active is None else grad * active.unsqueeze(-1)
        reference.step()
    torch.testing.assert_close(ours, theirs.detach(), atol=1e-5, rtol=1e-5)
    if frozen:
        assert torch.equal(ours[~active], start[~active])


def test_fused_adam_needs_float32():
    pytest.importorskip("triton")
    with pytest.raises(ValueError, match="float32"):
        LogitAdam(torch.zeros(2, 4, dtype=torch.bfloat16, device=DEVICE), lr=0.1, backend="triton")
