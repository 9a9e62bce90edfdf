"""Folded sdpa attention (``entrgi.sdpa``): grouped query heads run as one longer
sequence per key / value head, with the mask prepared once, give transformers' stock
``sdpa`` outputs and gradients as close to a float64 ground truth as the stock ones;
calls it does not cover go to the stock function."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import entrgi.sdpa
from entrgi.layers import swapped_attributes
from entrgi.sdpa import MASK_ALIGNMENT, FoldedSdpa, _geometry, folded_sdpa_fits, folded_sdpa_swap
from entrgi.swap_checks import Agreement
from helpers import SWAPS_MUST_REPRODUCE

pytestmark = SWAPS_MUST_REPRODUCE
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class _Attention(torch.nn.Module):
    """What the attention functions read from the calling module."""

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, True


def _inputs(batch, heads, kv_heads, length, keys, dtype, seed, mask_batch=None, dense_query=True):
    generator = torch.Generator().manual_seed(seed)

    def leaf(*shape):
        return torch.randn(*shape, generator=generator).to(dtype).to(DEVICE)

    # the fused rotary kernel's queries are dense in (B, H, T, D); the stock ones a transpose
    query = leaf(batch, heads, length, 16) if dense_query else leaf(batch, length, heads, 16).transpose(1, 2)
    key, value = leaf(batch, kv_heads, keys, 16), leaf(batch, kv_heads, keys, 16)
    mask = torch.rand(mask_batch or batch, 1, length, keys, generator=generator) < 0.6
    mask[..., 0] = True  # no row fully masked
    return [t.requires_grad_(True) for t in (query, key, value)], mask.to(DEVICE)


def _run(attention, module, inputs, mask, grad):
    out = attention(module, *inputs, mask, scaling=0.25)[0]
    return out, torch.autograd.grad(out, inputs, grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "batch, heads, kv_heads, length, keys, mask_batch, dense_query",
    [
        (2, 4, 2, 5, 7, None, True),
        (3, 6, 2, 3, 20, 1, True),
        (2, 8, 1, 6, 11, None, False),
        (2, 3, 3, 4, 4, None, True),
    ],
)
def test_folded_attention_gives_the_stock_outputs_and_gradients(
    dtype, batch, heads, kv_heads, length, keys, mask_batch, dense_query
):  # fmt: skip
    inputs, mask = _inputs(batch, heads, kv_heads, length, keys, dtype, heads + keys, mask_batch, dense_query)
    module = _Attention(heads // kv_heads)
    grad = torch.randn(batch, length, heads, 16, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    want, want_grads = _run(sdpa_attention_forward, module, inputs, mask, grad)
    got, got_grads = _run(FoldedSdpa(), module, inputs, mask, grad)
    assert got.shape == want.shape and got.is_contiguous()
    # Per query row the same attention over the same keys, but the kernel's products over
    # the longer folded query block may sum in another order (on CUDA, and on an AMD EPYC
    # CPU: up to 1.6 ulps of the largest output); the keys' and values' gradients are
    # summed over a group inside the kernel, not after it. So each is held to a float64
    # ground truth: no further from it than the stock one.
    inputs64 = [t.detach().double().requires_grad_(True) for t in inputs]
    truth, truth_grads = _run(sdpa_attention_forward, module, inputs64, mask, grad.double())
    eps = torch.finfo(dtype).eps
    for got_t, want_t, truth_t in zip((got, *got_grads), (want, *want_grads), (truth, *truth_grads)):
        scale = truth_t.abs().max()
        assert (got_t.double() - truth_t).abs().max() <= (want_t.double() - truth_t).abs().max() + 2 * eps * scale


def test_the_output_gradient_reaches_the_kernel_in_its_output_layout():
    """PyTorch's memory-efficient backward reads dL/d(out) contiguous in (B, T, H, D)
    order, the order its forward writes the output in, and copies one in any other; the
    folded output's gradient arrives so laid out, and with no grouping the stock
    function's does too."""
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recorded(*args, **kwargs):
        out = sdpa(*args, **kwargs)
        out.register_hook(lambda grad: seen.append(grad))
        return out

    for heads, kv_heads in ((4, 2), (3, 3)):
        inputs, mask = _inputs(2, heads, kv_heads, 5, 7, torch.float32, 3)
        grad = torch.randn(2, 5, heads, 16, device=DEVICE)
        with swapped_attributes([(torch.nn.functional, "scaled_dot_product_attention", recorded)]):
            _run(FoldedSdpa(), _Attention(heads // kv_heads), inputs, mask, grad)
        assert seen[-1].shape == (2, kv_heads, 5 * heads // kv_heads, 16) and seen[-1].transpose(1, 2).is_contiguous()


def _descendants(event):
    for child in event.cpu_children:
        yield child
        yield from _descendants(child)


@pytest.mark.parametrize("attention", [FoldedSdpa(), sdpa_attention_forward], ids=["folded", "stock"])
def test_the_fused_attention_backward_copies_no_gradient(attention):
    """Profiled, one call forward and backward: sdpa runs a fused kernel (not the math
    path; CPU's flash kernel here, the memory-efficient one under a mask on CUDA) and
    its backward makes no copy of the gradient it is handed, folded or stock (the folded
    output's gradient once arrived laid out otherwise, and each layer's backward copied it)."""
    inputs, mask = _inputs(2, 8, 2, 37, 50, torch.bfloat16, 6)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        out = attention(_Attention(4), *inputs, mask, scaling=0.25)[0]
        torch.autograd.grad(out, inputs, torch.randn_like(out))
    kernels = [e for e in profile.events() if e.name.startswith("aten::_scaled_dot_product_")]
    backwards = [e for e in kernels if e.name.endswith("_backward")]
    assert len(backwards) == 1 and not any("math" in e.name for e in kernels), [e.name for e in kernels]
    copies = [e.name for e in _descendants(backwards[0]) if e.name in ("aten::clone", "aten::copy_")]
    assert not copies, f"{backwards[0].name} copied: {copies}"


def test_the_mask_is_prepared_once_additive_folded_and_aligned():
    def additive(allowed):
        return torch.zeros(allowed.shape, dtype=torch.bfloat16, device=DEVICE).masked_fill(~allowed, float("-inf"))

    folded = FoldedSdpa()
    mask = torch.rand(2, 1, 3, 5, device=DEVICE) < 0.5
    prepared = folded.prepared_mask(mask, torch.bfloat16, 2)
    assert prepared.shape == (2, 1, 6, 5) and prepared.dtype == torch.bfloat16
    assert prepared.stride(2) % MASK_ALIGNMENT == 0  # the kernel pads nothing
    assert torch.equal(prepared, additive(mask).repeat(1, 1, 2, 1))  # each group's rows after one another
    assert folded.prepared_mask(mask, torch.bfloat16, 2) is prepared  # once per mask tensor
    assert folded.prepared_mask(mask.clone(), torch.bfloat16, 2) is not prepared
    recycled = ~mask  # a new mask at the id of one since freed: prepared anew
    folded._masks[id(recycled), torch.bfloat16, 2] = (mask, prepared)
    assert torch.equal(folded.prepared_mask(recycled, torch.bfloat16, 2), additive(recycled).repeat(1, 1, 2, 1))
    assert folded.prepared_mask(mask, torch.float32, 2).dtype == torch.float32
    bias = torch.randn(1, 1, 3, 5, device=DEVICE)  # an additive mask is copied as it is
    assert torch.equal(folded.prepared_mask(bias, torch.float32, 3), bias.repeat(1, 1, 3, 1))


@pytest.mark.parametrize(
    "case",
    ["covered", "dropout", "softcap", "output_attentions", "no mask", "a mask per head", "a 3-D mask",
     "a mask of another dtype"],
)  # fmt: skip
def test_calls_it_does_not_cover_go_to_the_stock_function(case, monkeypatch):
    (query, key, value), mask = _inputs(2, 4, 2, 3, 5, torch.float32, 0)
    flags = {
        "dropout": {"dropout": 0.1},
        "softcap": {"softcap": 30.0},
        "output_attentions": {"output_attentions": True},
    }
    kwargs = flags.get(case, {})
    other_dtype = torch.zeros(mask.shape, dtype=torch.bfloat16, device=DEVICE).masked_fill(~mask, -1e4)
    mask = {
        "no mask": None, "a mask per head": mask.expand(2, 4, 3, 5), "a 3-D mask": mask[:, 0],
        "a mask of another dtype": other_dtype,
    }.get(case, mask)  # fmt: skip
    folded, calls = FoldedSdpa(), []
    monkeypatch.setattr(folded, "stock", lambda *args, **passed: calls.append((args, passed)) or (None, None))
    folded(_Attention(2), query, key, value, mask, **kwargs)
    if case == "covered":
        assert calls == []
        return
    ((args, passed),) = calls
    assert args[4] is mask and all(passed[name] == flag for name, flag in kwargs.items())


def test_the_models_check_draws_its_own_head_geometry():
    from transformers import BertConfig, Qwen3Config

    grouped = Qwen3Config(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=32)
    assert _geometry(SimpleNamespace(config=grouped)) == (8, 2, 32)
    assert _geometry(SimpleNamespace(config=BertConfig(hidden_size=64, num_attention_heads=4))) == (4, 4, 16)


def test_models_get_the_folded_attention_on_the_triton_backend_only(classifier_path, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(classifier_path, attn_implementation="sdpa").to(DEVICE)
    assert folded_sdpa_fits(model, backend="triton") and not folded_sdpa_fits(model, backend="torch")
    eager = AutoModelForSequenceClassification.from_pretrained(classifier_path, attn_implementation="eager").to(DEVICE)
    assert not folded_sdpa_fits(eager, backend="triton")  # eager attention is not the sdpa function
    monkeypatch.setattr(entrgi.sdpa, "folded_sdpa_reproduces", lambda model: Agreement(math.inf, 2.0, "ValueError: x"))
    with pytest.warns(
        UserWarning, match=r"folded grouped-query sdpa did not reproduce .*attention \(raised ValueError: x\)"
    ):
        assert not folded_sdpa_fits(model, backend="triton")  # a swap is made only where it reproduces
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    before = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    with swapped_attributes([folded_sdpa_swap()]):
        assert isinstance(ALL_ATTENTION_FUNCTIONS["sdpa"], FoldedSdpa)
    assert (
        ALL_ATTENTION_FUNCTIONS._local_mapping == before and ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward
    )
