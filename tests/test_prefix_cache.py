"""Cached reward prefixes: the same rewards and gradients as scoring the whole chat."""

from __future__ import annotations

import pytest
import torch

from entrgi import generate, load_denoiser, load_reward

PROMPTS = ["hi", "tell me a long story about the sea and the wind"]  # prefixes of different lengths


def _guided_inputs(reward, rows: int, length: int, seed: int, extra_columns: int = 0):
    """Random mixes of table rows (like guided embeddings) and valid masks cut at random."""
    g = torch.Generator().manual_seed(seed)
    table = reward.input_embeddings().detach()
    weights = torch.softmax(torch.randn(rows, length, table.shape[0], generator=g) * 3, dim=-1)
    embeds = weights @ table
    if extra_columns:
        embeds = torch.cat([embeds, weights @ table[:, -extra_columns:]], dim=-1)
    ends = torch.randint(0, length + 1, (rows,), generator=g)
    valid = torch.arange(length)[None, :] < ends[:, None]
    return embeds.requires_grad_(True), valid


def _scores_and_grads(reward, context, embeds, valid):
    scores = reward.score_embeds(context, embeds, valid)
    (grad,) = torch.autograd.grad(scores.sum(), embeds)
    return scores, grad


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_classifier_prefix_cache_matches_the_whole_chat(classifier_path, attention):
    plain = load_reward(classifier_path, attn_implementation=attention)
    cached = load_reward(classifier_path, attn_implementation=attention, cache_prefix=True)
    context, cached_context = plain.prepare(PROMPTS, 3), cached.prepare(PROMPTS, 3)
    assert context.prefix_kv is None and len(cached_context.prefix_kv) == 2 * 2  # keys + values, 2 layers
    embeds, valid = _guided_inputs(plain, 6, 7, seed=0)
    want, want_grad = _scores_and_grads(plain, context, embeds, valid)
    got, got_grad = _scores_and_grads(cached, cached_context, embeds, valid)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-5, rtol=1e-5)
    assert want_grad.abs().sum() > 0


def test_likelihood_prefix_cache_matches_the_whole_chat(likelihood_path):
    plain = load_reward(likelihood_path, kind="likelihood")
    cached = load_reward(likelihood_path, kind="likelihood", cache_prefix=True)
    context, cached_context = plain.prepare(PROMPTS, 2), cached.prepare(PROMPTS, 2)
    soft_width = 0 if plain.tied else plain.hidden_size  # guidance appends the soft targets when untied
    embeds, valid = _guided_inputs(plain, 4, 5, seed=1, extra_columns=soft_width)
    want, want_grad = _scores_and_grads(plain, context, embeds, valid)
    got, got_grad = _scores_and_grads(cached, cached_context, embeds, valid)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-5, rtol=1e-5)


def test_generate_with_a_cached_prefix_gives_the_same_tokens(denoiser_paths, classifier_path):
    denoiser = load_denoiser(denoiser_paths["dream"], kind="dream")
    common = dict(steps=4, max_new_tokens=6, num_samples=2, guidance_steps=2, seed=4, progress=False)
    plain = generate(PROMPTS, denoiser=denoiser, reward=load_reward(classifier_path), **common)
    cached = generate(PROMPTS, denoiser=denoiser, reward=load_reward(classifier_path, cache_prefix=True), **common)
    assert [r.response_ids for r in cached] == [r.response_ids for r in plain]
    assert sum((r.rewards for r in cached), []) == pytest.approx(sum((r.rewards for r in plain), []))


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_replay_with_a_cached_prefix_matches_eager(denoiser_paths, classifier_path):
    denoiser = load_denoiser(denoiser_paths["dream"], kind="dream", device="cuda")
    reward = load_reward(classifier_path, device="cuda", cache_prefix=True)
    common = dict(steps=6, max_new_tokens=8, num_samples=2, guidance_steps=2, seed=5, progress=False)
    eager = generate(PROMPTS, denoiser=denoiser, reward=reward, cuda_graphs=False, **common)
    graphed = generate(PROMPTS, denoiser=denoiser, reward=reward, cuda_graphs=True, **common)
    assert [r.response_ids for r in graphed] == [r.response_ids for r in eager]
