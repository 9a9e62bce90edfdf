"""What a swapped forward must show before it replaces a module's own, and how a swap
that fails is reported.

A fused or lean forward is swapped in only after it reproduced the stock forward on a
seeded random input: bit for bit where it applies the same ATen ops (the torch
backend), else within ``FUSED_ULPS`` eps of the output's largest value (the triton
backend rounds where the stock code rounds, but sums a row in another order). A check
whose call raises one of ``CALL_MISFITS`` means the module needs other arguments: it is
left stock without a word. A check that ran and disagreed is reported in one warning
per model (:func:`warn_kept_stock`): the module runs stock, the values are the same,
and the launches the fusion saves are not saved. Checks sync with the host: they run
once, at load time.
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Callable

import torch

FUSED_ULPS = 2  # the triton backend's forward vs the module's own: eps of the output's dtype, times its largest value

# what a check's call of a module raises when the module needs other arguments (it is then not swapped)
CALL_MISFITS = (TypeError, ValueError, RuntimeError, AttributeError, IndexError)


def file_by_check(module: torch.nn.Module, forward: Callable, reproduces: Callable[..., bool], found: list,
                  kept_stock: list) -> None:  # fmt: skip
    """(module, forward) onto ``found`` where ``reproduces(module, forward)``, the
    module's class name onto ``kept_stock`` where not, and neither where the check's
    call raises one of ``CALL_MISFITS`` (the module needs other arguments)."""
    try:
        if reproduces(module, forward):
            found.append((module, forward))
        else:
            kept_stock.append(type(module).__name__)
    except CALL_MISFITS:
        pass


def warn_kept_stock(names: list[str], fused: str) -> None:
    """One warning naming (by class or function, counted) what ``fused`` fits but did not
    reproduce in its check: those run their stock forward (the same values, without the
    launches and bytes the fusion saves). On a GPU this is the sign that its rounding
    differs from what the checks allow (``FUSED_ULPS``)."""
    if names:
        counted = ", ".join(f"{count} x {name}" for name, count in sorted(Counter(names).items()))
        warnings.warn(f"entrgi: {fused} did not reproduce the stock forward of {counted} on a random input "
                      f"(within FUSED_ULPS = {FUSED_ULPS} eps of its largest value); those run stock, unfused",
                      stacklevel=3)  # fmt: skip


def agree(want, got, exact: bool) -> bool:
    """Tensors (or tuples of them) equal bit for bit, or (not ``exact``) to within
    ``FUSED_ULPS`` eps of each one's largest value."""
    if isinstance(want, tuple):
        return all(agree(w, g, exact) for w, g in zip(want, got, strict=True))
    if exact or want.dtype != got.dtype or want.shape != got.shape:
        return torch.equal(got, want)
    tolerance = FUSED_ULPS * torch.finfo(want.dtype).eps * want.abs().max()
    return bool((got - want).abs().max() <= tolerance)


def random_rotary(head_dim: int, dtype: torch.dtype, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (2, 3, ``head_dim``) of ``dtype`` on ``generator``'s device, of
    random rotary angles laid out as the models lay theirs out (the half repeated)."""
    angles = torch.randn(2, 3, head_dim // 2, generator=generator, device=generator.device)
    return tuple(f(torch.cat([angles, angles], -1)).to(dtype) for f in (torch.cos, torch.sin))


def random_input(module: torch.nn.Module, width: int, dtype: torch.dtype) -> torch.Tensor:
    """A seeded random (2, 3, ``width``) input of ``dtype`` on ``module``'s device."""
    device = next(module.parameters()).device
    generator = torch.Generator(device).manual_seed(0)
    return torch.randn(2, 3, width, generator=generator, device=device).to(dtype)
