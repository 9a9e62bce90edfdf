"""The checks a swapped forward passes before it replaces a module's own
(``entrgi.swap_checks``): how far apart two outputs are, in eps of the stock output's
largest value; a swapped forward that raises; what is filed where; and the one warning
that names the modules left stock."""

from __future__ import annotations

import math

import pytest
import torch

from entrgi.swap_checks import FUSED_ULPS, Agreement, agree, file_by_check, swapped_agrees, warn_kept_stock


def test_outputs_apart_by_up_to_fused_ulps_eps_of_the_largest_value_agree():
    want = torch.randn(4, 8, generator=torch.Generator().manual_seed(0)).clamp(-1.9, 1.9).to(torch.bfloat16)
    want[0, 0], want[1, 3] = -2.0, 1.25  # the largest magnitude 2: one eps of it is two bf16 spacings in [1, 2)
    unit = torch.finfo(torch.bfloat16).eps * 2.0
    for steps in (0, 1, FUSED_ULPS, FUSED_ULPS + 1):
        got = want.clone()
        got[1, 3] += steps * unit  # exact in bf16
        agreement = agree(want, got)
        assert agreement.eps_apart == pytest.approx(steps) and bool(agreement) == (steps <= FUSED_ULPS)
        assert bool(agree(want, got, exact=True)) == (steps == 0)
    assert str(Agreement(3.0, 2.0)) == "3 eps apart" and not Agreement(3.0, 2.0)


def test_outputs_of_another_kind_never_agree():
    x = torch.randn(2, 3)
    assert agree((x, None), (x.clone(), None)).eps_apart == 0
    for got in (x.double(), x[:1], (x,), [x], None):
        assert agree(x, got).eps_apart == math.inf
    assert agree((x, x), (x,)).eps_apart == math.inf
    assert agree((x, x), (x, x + 1)).eps_apart == agree(x, x + 1).eps_apart > FUSED_ULPS  # the worst pair counts
    zeros = torch.zeros(3)
    assert agree(zeros, zeros + 1e-3).eps_apart == math.inf  # no scale to measure against


def test_a_swapped_forward_that_raises_is_named_not_raised():
    def swapped():
        raise RuntimeError("no kernel for this")

    agreement = swapped_agrees(torch.ones(2), swapped)
    assert not agreement and str(agreement) == "raised RuntimeError: no kernel for this"
    assert swapped_agrees(torch.ones(2), lambda: torch.ones(2))


def test_modules_are_filed_by_their_check():
    found, kept_stock = [], []
    modules = [torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Tanh()]
    verdicts = {modules[0]: Agreement(0.5, 2.0), modules[1]: Agreement(9.0, 2.0)}

    def check(module, forward):
        if module not in verdicts:
            raise TypeError("forward() missing 1 required positional argument")  # its stock call needs more
        return verdicts[module]

    for module in modules:
        file_by_check(module, module.forward, check, found, kept_stock)
    assert found == [(modules[0], modules[0].forward)] and kept_stock == [("ReLU", verdicts[modules[1]])]


def test_one_warning_counts_the_modules_left_stock_and_the_farthest_apart():
    with pytest.warns(UserWarning) as warned:
        warn_kept_stock([("Norm", Agreement(3.0, 2.0)), ("Mlp", Agreement(math.inf, 2.0, "ValueError: odd")),
                         ("Norm", Agreement(4.5, 2.0))], "the lean (triton) forward")  # fmt: skip
    (warning,) = warned
    assert str(warning.message).startswith(
        "entrgi: the lean (triton) forward did not reproduce the stock forward of 1 x Mlp (raised ValueError: odd), "
        "2 x Norm (4.5 eps apart) on a random input (within FUSED_ULPS = 2 eps"
    )
    warn_kept_stock([], "anything")  # nothing left stock: no warning (pyproject makes one an error)
