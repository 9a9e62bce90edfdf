"""LogitAdam (eager and fused Triton) against torch.optim.Adam, with frozen rows."""

from __future__ import annotations

import importlib.util
import math

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


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_moments_round_a_float32_step(backend):
    """Each step is float32 Adam from the stored moments; the moments are then stored
    rounded to bfloat16 (restated here step by step)."""
    g = torch.Generator().manual_seed(1)
    start = torch.randn(3, 1100, generator=g).to(DEVICE)
    ours, exact = start.clone(), start.clone()
    optimizer = LogitAdam(ours, lr=0.5, backend=backend, moment_dtype=torch.bfloat16)
    exact_optimizer = LogitAdam(exact, lr=0.5, backend=backend)
    assert optimizer.exp_avg.dtype == optimizer.exp_avg_sq.dtype == torch.bfloat16
    want = start.clone()
    m = v = torch.zeros_like(start, dtype=torch.bfloat16)
    for step in range(1, 5):
        grad = torch.randn(3, 1100, generator=g).to(DEVICE)
        optimizer.step(grad)
        exact_optimizer.step(grad)
        m_step = m.float() + 0.1 * (grad - m.float())
        v_step = 0.999 * v.float() + 0.001 * grad * grad
        denom = v_step.sqrt() / (1 - 0.999**step) ** 0.5 + 1e-8
        want -= 0.5 / (1 - 0.9**step) * m_step / denom
        m, v = m_step.bfloat16(), v_step.bfloat16()
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(optimizer.exp_avg, m) and torch.equal(optimizer.exp_avg_sq, v)
    assert not torch.equal(ours, exact), "the rounding must show"
    torch.testing.assert_close(ours, exact, atol=0.05, rtol=0)  # and stay small


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(moment_dtype=torch.float16), ValueError, "moment_dtype must be torch.float32 or torch.bfloat16"),
        (dict(param=torch.zeros(2, 4, dtype=torch.long)), TypeError, "param must be float32, bfloat16 or float16"),
        (dict(lr=-0.1), ValueError, "lr must be a finite number > 0, got -0.1"),
        (dict(lr=math.inf), ValueError, "lr must be a finite number > 0, got inf"),
        (dict(betas=(1.0, 0.999)), ValueError, r"betas must be two numbers in \[0, 1\), got \(1.0, 0.999\)"),
        (dict(eps=-1e-8), ValueError, "eps must be a finite number >= 0, got -1e-08"),
        (dict(eps=math.inf), ValueError, "eps must be a finite number >= 0, got inf"),
        (
            dict(replay_from=torch.zeros(2, 4, dtype=torch.long), max_steps=1),
            ValueError,
            "replay_from must be a float tensor, got torch.int64",
        ),
        (
            dict(replay_from=torch.zeros(2, 5), max_steps=1),
            ValueError,
            r"replay_from \(2, 5\) on cpu must have the param's shape \(2, 4\) and device cpu",
        ),
        (dict(replay_from=torch.zeros(2, 4)), ValueError, "replay_from needs max_steps, an int >= 1, got None"),
        (dict(replay_from=torch.zeros(2, 4), max_steps=0), ValueError, "needs max_steps, an int >= 1, got 0"),
        (
            dict(replay_from=torch.zeros(2, 4), max_steps=2, moment_dtype=torch.bfloat16),
            ValueError,
            "replay_from stores no moments: leave moment_dtype float32",
        ),
        (
            dict(active=torch.ones(3, dtype=torch.bool)),
            ValueError,
            r"active shape \(3,\) != param's leading shape \(2,\)",
        ),
    ],
)
def test_bad_optimizer_arguments_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        LogitAdam(**(dict(param=torch.zeros(2, 4), lr=0.1) | kwargs))


def test_replay_from_the_param_itself_raises():
    param = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="values before the first step, not the param itself"):
        LogitAdam(param, lr=0.1, replay_from=param, max_steps=1)


def test_gradient_of_another_shape_raises():
    optimizer = LogitAdam(torch.zeros(2, 4, device=DEVICE), lr=0.1, backend="torch")
    with pytest.raises(ValueError, match=r"grad shape \(2, 3\) != param shape \(2, 4\)"):
        optimizer.step(torch.ones(2, 3, device=DEVICE))
    with pytest.raises(ValueError, match=r"grad shape \(4, 2\) != param shape \(2, 4\)"):  # as many entries
        optimizer.step(torch.ones(4, 2, device=DEVICE))
