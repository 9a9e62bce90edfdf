"""Qwen3-style attention with its head norms and rotary embedding as one op
(``entrgi.normed_attention``): the stock forward's outputs and gradients, stock calls
for what it does not cover, and no swap where the check does not reproduce the stock
forward. The triton backend: native on GPU, the interpreter on CPU."""

from __future__ import annotations

import functools

import pytest
import torch

import entrgi.normed_attention
from entrgi.layers import swapped_attributes
from entrgi.lean import ROTARY, lean_forwards, rotary_swaps
from entrgi.normed_attention import normed_attention_forwards
from entrgi.ops.layer_ops import normed_rotary_embedding
from entrgi.swap_checks import random_rotary
from helpers import SWAPS_MUST_REPRODUCE

pytestmark = SWAPS_MUST_REPRODUCE
pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _qwen3_classifier(attention_class=None, head_dim: int = 16) -> torch.nn.Module:
    import transformers

    config = transformers.Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=head_dim, num_labels=1, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Qwen3ForSequenceClassification(config)
    if attention_class is not None:
        for index, layer in enumerate(model.model.layers):
            layer.self_attn = attention_class(config, index)
    for module in model.modules():
        if hasattr(module, "variance_epsilon"):  # trained-looking norm weights, not ones
            torch.nn.init.normal_(module.weight, 1.0, 0.3)
    return model.to(DEVICE, torch.bfloat16).eval().requires_grad_(False)


def _score_and_grad(model, embeds, swaps=()):
    with swapped_attributes(list(swaps)):
        score = model(inputs_embeds=embeds, use_cache=False).logits.sum()  # as the rewards call it
    return score, torch.autograd.grad(score, embeds)[0]


def _counted(monkeypatch) -> list:
    calls = []
    monkeypatch.setattr(
        entrgi.normed_attention, "normed_rotary_embedding",
        lambda *args: calls.append(args) or normed_rotary_embedding(*args),
    )  # fmt: skip
    return calls


def test_qwen3_attention_runs_its_head_norms_and_rotary_embedding_as_one_op(monkeypatch):
    model = _qwen3_classifier()
    found = normed_attention_forwards(model, backend="triton")
    assert [module for module, _ in found] == [layer.self_attn for layer in model.model.layers]
    assert normed_attention_forwards(model, backend="torch") == []  # the stock forward with lean norms runs
    lean = [(module, "forward", forward) for module, forward in lean_forwards(model, backend="triton")]
    rotary = [(module, ROTARY, fused) for module, fused in rotary_swaps(model, backend="triton")]
    separate = lean + rotary
    fused = separate + [(module, "forward", forward) for module, forward in found]
    calls = _counted(monkeypatch)
    embeds = torch.randn(3, 6, 32, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    stock, stock_grad = _score_and_grad(model, embeds)
    want, want_grad = _score_and_grad(model, embeds, separate)
    assert not calls
    got, got_grad = _score_and_grad(model, embeds, fused)
    assert len(calls) == 2  # one per layer
    # the same roundings as the separate kernels; a row sum's order may differ on a GPU
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * want.abs().item())
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=1e-2 * want_grad.abs().max().item())
    torch.testing.assert_close(got_grad, stock_grad, rtol=0, atol=2e-2 * stock_grad.abs().max().item())
    assert stock_grad.abs().max() > 0


def test_calls_it_does_not_cover_run_the_stock_forward(monkeypatch):
    from transformers import DynamicCache

    model = _qwen3_classifier()
    ((attention, forward), _) = normed_attention_forwards(model, backend="triton")
    calls = _counted(monkeypatch)
    x = torch.randn(2, 3, 32, dtype=torch.bfloat16, device=DEVICE)
    cos, sin = random_rotary(16, torch.bfloat16, torch.Generator(DEVICE).manual_seed(0))
    cache_name = entrgi.normed_attention.cache_argument(attention)
    with torch.no_grad():
        # a cache of transformers' own (its update's arguments vary between versions)
        want = attention(x, (cos, sin), None, **{cache_name: DynamicCache()})[0]
        got = forward(x, (cos, sin), None, **{cache_name: DynamicCache()})[0]
        assert torch.equal(got, want) and not calls
        # positional arguments past the mask (the stock forward's own, whatever they are)
        want = attention(x, (cos, sin), None, None)[0]
        assert torch.equal(forward(x, (cos, sin), None, None)[0], want) and not calls
        forward(x, (cos, sin), None)
        assert len(calls) == 1
        # rotary tables of another dtype than the queries': the stock norm and rotary calls
        model.float()
        want = attention(x.float(), (cos, sin), None)[0]
        assert want.dtype == torch.float32 and torch.equal(forward(x.float(), (cos, sin), None)[0], want)
    assert len(calls) == 1


def test_attention_the_fused_forward_does_not_reproduce_is_left_alone(monkeypatch):
    from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention

    model = _qwen3_classifier()
    stock_forward = Qwen3Attention.forward

    @functools.wraps(stock_forward)  # its signature: the cache under the keyword the stock forward takes
    def keys_rotated_twice_as_far(self, hidden_states, position_embeddings, attention_mask, **kwargs):
        cos, sin = position_embeddings  # a family whose forward differs from the fused one
        return stock_forward(self, hidden_states, (cos, 2 * sin), attention_mask, **kwargs)

    @functools.wraps(stock_forward)
    def first_key_never_masked(self, hidden_states, position_embeddings, attention_mask, **kwargs):
        if attention_mask is not None:  # differs only in a call with a mask (and, in the check, a cache)
            attention_mask = attention_mask.clone()
            attention_mask[..., 0] = True
        return stock_forward(self, hidden_states, position_embeddings, attention_mask, **kwargs)

    for other_forward in (keys_rotated_twice_as_far, first_key_never_masked):
        with monkeypatch.context() as patch:
            patch.setattr(Qwen3Attention, "forward", other_forward)
            with pytest.warns(UserWarning, match="normed rotary attention did not reproduce .* of 2 x Qwen3Attention"):
                assert normed_attention_forwards(model, backend="triton") == []
    assert len(normed_attention_forwards(model, backend="triton")) == 2
    hook = model.model.layers[0].self_attn.q_norm.register_forward_hook(lambda *args: None)
    assert len(normed_attention_forwards(model, backend="triton")) == 1  # the fused op would skip the hook
    hook.remove()
    attention = model.model.layers[1].self_attn
    attention.forward = attention.forward  # as an offloading library installs its own
    assert len(normed_attention_forwards(model, backend="triton")) == 1
    del attention.forward
    # a head size the kernel does not take: the fused forward would only ever make the stock calls
    assert normed_attention_forwards(_qwen3_classifier(head_dim=24), backend="triton") == []
    for layer in model.model.layers:
        layer.self_attn.k_norm.variance_epsilon = 1e-3  # the two norms' eps differ: one kernel takes one
    assert normed_attention_forwards(model, backend="triton") == []


def test_the_fused_forward_hands_the_attention_function_what_the_stock_one_does():
    """The scaling, dropout (in training) and sliding window (which flash attention reads)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = _qwen3_classifier()
    ((attention, forward), _) = normed_attention_forwards(model, backend="triton")
    attention.train()
    attention.attention_dropout, attention.sliding_window = 0.25, 4
    passed = []

    def attention_function(module, query, key, value, mask, **kwargs):
        passed.append(kwargs)
        return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3]), None

    x = torch.randn(2, 3, 32, dtype=torch.bfloat16, device=DEVICE)
    cos, sin = random_rotary(16, torch.bfloat16, torch.Generator(DEVICE).manual_seed(0))
    mapping = {**ALL_ATTENTION_FUNCTIONS._local_mapping, "sdpa": attention_function}
    with torch.no_grad(), swapped_attributes([(ALL_ATTENTION_FUNCTIONS, "_local_mapping", mapping)]):
        attention(x, (cos, sin), None)
        forward(x, (cos, sin), None)
    assert passed[1] == passed[0] == {"dropout": 0.25, "scaling": attention.scaling, "sliding_window": 4}
