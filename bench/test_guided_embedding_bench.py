"""pytest-benchmark view of the op: ``pytest bench/ --benchmark-only``.

Same shapes as ``entrgi bench`` (full V on a GPU, small on CPU); the CLI adds the
floor, memory, CSV and plots. Speed is reported here, never asserted.
"""

from __future__ import annotations

import pytest
import torch

from entrgi import guided_embedding

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
VOCAB = 152_064 if GPU else 4096
SHAPES = [(128, 1024), (512, 1024), (2048, 2048)] if GPU else [(16, 64), (64, 64)]
BACKENDS = ["torch", "triton"] if GPU else ["torch"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,d", SHAPES)
def test_guided_embedding_fwd_bwd(benchmark, backend, n, d):
    phi = torch.randn(n, VOCAB, device=DEVICE).requires_grad_(True)
    table = torch.randn(VOCAB, d, device=DEVICE, dtype=torch.bfloat16 if GPU else torch.float32)
    grad = torch.randn(n, d, device=DEVICE, dtype=table.dtype)

    def step():
        phi.grad = None
        guided_embedding(phi, table, temperature=0.7, top_p=0.95, backend=backend, check_values=False).embeds.backward(
            grad
        )
        if GPU:
            torch.cuda.synchronize()

    benchmark(step)
    assert phi.grad is not None and torch.isfinite(phi.grad).all()
