"""What a swapped forward must show before it replaces a module's own, and how a swap
that fails is reported.

A fused or lean forward is swapped in only after it reproduced the stock forward on a
seeded random input: bit for bit where it applies the same ATen ops (the torch
backend), else within ``FUSED_ULPS`` eps of the output's largest value (the triton
backend rounds where the stock code rounds, but sums a row in another order). Where the
check's stock call raises one of ``CALL_MISFITS``, the module needs other arguments: it
is left stock without a word. A swapped forward that disagreed (:class:`Agreement`
holds by how much) or raised where the stock one ran is reported in one warning per
model (:func:`warn_kept_stock`): the module runs stock, the values are the same, and
the launches the fusion saves are not saved. Checks sync with the host: they run once,
at load time.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch

FUSED_ULPS = 2  # the triton backend's forward vs the module's own: eps of the output's dtype, times its largest value

# what a check's call of a module raises when the module needs other arguments (it is then not swapped)
CALL_MISFITS = (TypeError, ValueError, RuntimeError, AttributeError, IndexError)


@dataclass(frozen=True)
class Agreement:
    """How far a swapped forward's output lies from the stock one's: ``eps_apart``, the
    largest difference in eps of the output's dtype times the stock output's largest
    magnitude (inf for another type, dtype or shape, or where the swapped forward raised:
    ``error`` names what it raised); true where that is within ``limit``."""

    eps_apart: float
    limit: float
    error: str | None = None

    def __bool__(self) -> bool:
        return self.eps_apart <= self.limit

    def __str__(self) -> str:
        return f"raised {self.error}" if self.error else f"{self.eps_apart:.3g} eps apart"


def _limit(exact: bool) -> float:
    return 0.0 if exact else float(FUSED_ULPS)


def agree(want, got, exact: bool = False) -> Agreement:
    """Outputs (tensors, None, or tuples of them, the worst pair counting) equal bit for
    bit (``exact``), or within ``FUSED_ULPS`` eps of each stock tensor's largest value."""
    limit = _limit(exact)
    if type(want) is not type(got):
        return Agreement(math.inf, limit)
    if isinstance(want, tuple):
        if len(want) != len(got):
            return Agreement(math.inf, limit)
        agreements = [agree(w, g, exact) for w, g in zip(want, got)]
        return max(agreements, key=lambda a: a.eps_apart, default=Agreement(0.0, limit))
    if want is None:
        return Agreement(0.0, limit)
    if want.dtype != got.dtype or want.shape != got.shape:
        return Agreement(math.inf, limit)
    if want.numel() == 0 or torch.equal(got, want):
        return Agreement(0.0, limit)
    difference = (got.float() - want.float()).abs().max()
    scale = torch.finfo(want.dtype).eps * want.float().abs().max()
    return Agreement(float(difference / scale) if scale > 0 else math.inf, limit)


def swapped_agrees(want, swapped: Callable[[], object], exact: bool = False) -> Agreement:
    """:func:`agree` of the stock output ``want`` and ``swapped()``; where ``swapped``
    raises (the stock forward having run, the fault is the swap's), an Agreement naming
    the error, so the module stays stock and the warning says why."""
    try:
        got = swapped()
    except Exception as error:  # whatever it is, the module keeps its stock forward, and the warning names it
        return Agreement(math.inf, _limit(exact), f"{type(error).__name__}: {error}")
    return agree(want, got, exact)


def file_by_check(module: torch.nn.Module, forward: Callable, reproduces: Callable[..., Agreement], found: list,
                  kept_stock: list) -> None:  # fmt: skip
    """(module, forward) onto ``found`` where ``reproduces(module, forward)`` holds, (the
    module's class name, its Agreement) onto ``kept_stock`` where not, and neither where
    the check's stock call raises one of ``CALL_MISFITS`` (the module needs other
    arguments)."""
    try:
        agreement = reproduces(module, forward)
    except CALL_MISFITS:
        return
    if agreement:
        found.append((module, forward))
    else:
        kept_stock.append((type(module).__name__, agreement))


def warn_kept_stock(kept_stock: list[tuple[str, Agreement]], fused: str) -> None:
    """One warning naming what ``fused`` fits but did not reproduce in its check, by class
    or function: each name counted, with the farthest its outputs lay from the stock ones
    (or the error its swapped forward raised). Those run their stock forward (the same
    values, without the launches and bytes the fusion saves). On a GPU this is the sign
    that its rounding differs from what the checks allow (``FUSED_ULPS``)."""
    if not kept_stock:
        return
    counts, worst = Counter(name for name, _ in kept_stock), {}
    for name, agreement in kept_stock:
        if name not in worst or agreement.eps_apart > worst[name].eps_apart:
            worst[name] = agreement
    counted = ", ".join(f"{counts[name]} x {name} ({worst[name]})" for name in sorted(counts))
    warnings.warn(f"entrgi: {fused} did not reproduce the stock forward of {counted} on a random input "
                  f"(within FUSED_ULPS = {FUSED_ULPS} eps of its largest value); those run stock, unfused",
                  stacklevel=3)  # fmt: skip


def random_rotary(head_dim: int, dtype: torch.dtype, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (2, 3, ``head_dim``) of ``dtype`` on ``generator``'s device, of
    random rotary angles laid out as the models lay theirs out (the half repeated)."""
    angles = torch.randn(2, 3, head_dim // 2, generator=generator, device=generator.device)
    return tuple(f(torch.cat([angles, angles], -1)).to(dtype) for f in (torch.cos, torch.sin))


def random_query_key(
    head_dim: int, dtype: torch.dtype, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (2, 2, 3, ``head_dim``) queries and (2, 1, 3, ``head_dim``) keys of ``dtype``
    on ``generator``'s device, laid out (B, H, T, D) as attention rotates them."""
    device = generator.device
    return tuple(torch.randn(2, heads, 3, head_dim, generator=generator, device=device).to(dtype) for heads in (2, 1))


def random_input(module: torch.nn.Module, width: int, dtype: torch.dtype) -> torch.Tensor:
    """A seeded random (2, 3, ``width``) input of ``dtype`` on ``module``'s device."""
    device = next(module.parameters()).device
    generator = torch.Generator(device).manual_seed(0)
    return torch.randn(2, 3, width, generator=generator, device=device).to(dtype)
