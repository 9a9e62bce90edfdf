"""The memory layouts the kernels read: what a tensor becomes before a launch, a view
where one exists and a copy where none does."""

from __future__ import annotations

import torch


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself where its last dimension has stride 1 (what the row kernels index),
    else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def dense_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` (..., W) as contiguous (rows, W): a view where ``t`` is contiguous."""
    return t.reshape(-1, t.shape[-1]).contiguous()
