"""Cached reward prefixes: the same rewards and gradients as scoring the whole chat."""

from __future__ import annotations

import pytest
import torch

from entrgi import generate, load_denoiser, load_reward
from entrgi.rewards.prefix_cache import PrefixKeysValues, cache_argument, prefix_keys_values
from helpers import assert_same_rewards, guided_reward_inputs

PROMPTS = ["hi", "tell me a long story about the sea and the wind"]  # prefixes of different lengths


@pytest.mark.filterwarnings("error::FutureWarning")  # the cache goes under the model's own keyword
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_classifier_prefix_cache_matches_the_whole_chat(classifier_path, attention):
    plain = load_reward(classifier_path, attn_implementation=attention)
    cached = load_reward(classifier_path, attn_implementation=attention, cache_prefix=True)
    context, cached_context = plain.prepare(PROMPTS, 3), cached.prepare(PROMPTS, 3)
    assert context.prefix_kv is None and len(cached_context.prefix_kv) == 2 * 2  # keys + values, 2 layers
    embeds, valid = guided_reward_inputs(plain, 6, 7, seed=0)
    assert_same_rewards((plain, context), (cached, cached_context), embeds, valid)


def test_the_cached_prefix_runs_through_the_guidance_calls_layers(classifier_path):
    """The prefix's keys and values come from the layers the guidance calls run (lean,
    fused on CUDA), so cached and uncached rewards round alike."""
    reward = load_reward(classifier_path, cache_prefix=True)
    module, forward = reward.guidance_layers.lean[0]
    calls = []

    def counted(*args, **kwargs):
        calls.append(module)
        return forward(*args, **kwargs)

    reward.guidance_layers.lean[0] = (module, counted)
    reward.prepare(PROMPTS, 2)
    assert calls, "the prefix ran without the lean layers"
    assert "forward" not in vars(module), "the stock forward is back after the prefix"


def test_likelihood_prefix_cache_matches_the_whole_chat(likelihood_path):
    plain = load_reward(likelihood_path, kind="likelihood")
    cached = load_reward(likelihood_path, kind="likelihood", cache_prefix=True)
    context, cached_context = plain.prepare(PROMPTS, 2), cached.prepare(PROMPTS, 2)
    embeds, valid = guided_reward_inputs(plain, 4, 5, seed=1)
    assert_same_rewards((plain, context), (cached, cached_context), embeds, valid)


def test_generate_with_a_cached_prefix_gives_the_same_tokens(denoiser_paths, classifier_path):
    denoiser = load_denoiser(denoiser_paths["dream"], kind="dream")
    common = dict(steps=4, max_new_tokens=6, num_samples=2, guidance_steps=2, seed=4, progress=False)
    plain = generate(PROMPTS, denoiser=denoiser, reward=load_reward(classifier_path), **common)
    cached = generate(PROMPTS, denoiser=denoiser, reward=load_reward(classifier_path, cache_prefix=True), **common)
    assert [r.response_ids for r in cached] == [r.response_ids for r in plain]
    assert sum((r.rewards for r in cached), []) == pytest.approx(sum((r.rewards for r in plain), []))


def test_cache_argument_is_the_keyword_the_model_takes():
    class Renamed(torch.nn.Module):  # transformers >= 5.24
        def forward(self, inputs_embeds, cache=None, use_cache=None): ...

    class Before(torch.nn.Module):
        def forward(self, inputs_embeds, past_key_values=None, use_cache=None): ...

    assert (cache_argument(Renamed()), cache_argument(Before())) == ("cache", "past_key_values")


def test_the_cache_hands_each_layer_its_prefix_keys_before_the_new_ones_and_keeps_nothing():
    keys, values = ([torch.randn(2, 1, 4, 8) for _ in range(3)] for _ in range(2))
    cache, new_key, new_value = PrefixKeysValues(keys, values), torch.randn(2, 1, 3, 8), torch.randn(2, 1, 3, 8)
    assert cache.get_seq_length() == cache.for_layer(2).get_seq_length() == 4  # the cached length
    for got in (cache.update(new_key, new_value, 2), cache.for_layer(2).update(new_key, new_value, 0)):
        assert torch.equal(got[0], torch.cat([keys[2], new_key], -2))
        assert torch.equal(got[1], torch.cat([values[2], new_value], -2))
    assert [t.shape[-2] for t in cache.keys + cache.values] == [4] * 6  # nothing was stored


@pytest.mark.parametrize("filled", [(), (0, 2)])
def test_a_model_whose_layers_do_not_each_fill_the_cache_is_refused(filled):
    class Body(torch.nn.Module):
        def forward(self, inputs_embeds, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None):
            for layer in filled:
                past_key_values.update(inputs_embeds, inputs_embeds, layer)

    with pytest.raises(ValueError, match="do not call their key/value cache's update: cannot cache its prefix"):
        prefix_keys_values(Body(), {"inputs_embeds": torch.randn(1, 2, 4)})


def test_cache_prefix_needs_a_causal_reward(mlm_path, minilm_path):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from entrgi.rewards import ClassifierReward

    tokenizer = AutoTokenizer.from_pretrained(mlm_path)
    bert = BertForSequenceClassification(BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=32, num_labels=1))  # fmt: skip
    with pytest.raises(ValueError, match="causal"):
        ClassifierReward(bert, tokenizer, cache_prefix=True)
    with pytest.raises(ValueError, match="causal"):
        load_reward(minilm_path, kind="similarity", cache_prefix=True)
