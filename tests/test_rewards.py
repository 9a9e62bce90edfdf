"""Rewards: packing, pooling at the last real token, chat-template split, similarity."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from entrgi.attention import attention_mask_4d
from entrgi.rewards import load_reward
from entrgi.rewards.packing import pack_inputs, response_mask_until_end
from entrgi.rewards.vocab import build_vocab_mapping, warn_if_sparse


def test_pack_right_and_left_keep_order_and_count_positions():
    embeds = torch.arange(6.0).view(1, 6, 1)
    valid = torch.tensor([[False, True, False, True, True, False]])
    right = pack_inputs(embeds, valid, "right")
    assert right.inputs_embeds.flatten()[-3:].tolist() == [1.0, 3.0, 4.0]
    assert right.attention_mask.tolist() == [[0, 0, 0, 1, 1, 1]]
    assert right.position_ids.tolist() == [[0, 0, 0, 0, 1, 2]]
    left = pack_inputs(embeds, valid, "left")
    assert left.inputs_embeds.flatten()[:3].tolist() == [1.0, 3.0, 4.0]
    assert left.attention_mask.tolist() == [[1, 1, 1, 0, 0, 0]]


def test_response_mask_stops_before_the_first_end_token():
    ids = torch.tensor([[5, 6, 9, 7, 9], [5, 5, 5, 5, 5]])
    assert response_mask_until_end(ids, torch.tensor([9])).tolist() == [
        [True, True, False, False, False],
        [True, True, True, True, True],
    ]


def _tokenizer(vocab: dict, unk=None, eos=None, pad=None) -> SimpleNamespace:
    return SimpleNamespace(get_vocab=lambda: vocab, unk_token_id=unk, eos_token_id=eos, pad_token_id=pad)


def test_each_denoiser_id_maps_to_the_reward_id_of_its_string_else_the_fallback():
    denoiser = _tokenizer({"a": 0, "b": 1, "c": 2, "beyond the logits": 5})
    reward = _tokenizer({"b": 7, "a": 3, "<unk>": 9, "beyond the logits": 4}, unk=9, eos=8, pad=6)
    mapping = build_vocab_mapping(denoiser, reward, 4)  # logits rows 0..3: id 3 has no string, id 5 no row
    assert mapping.ids.tolist() == [3, 7, 9, 9] and mapping.mapped == 2 and mapping.fallback_id == 9
    with pytest.warns(UserWarning, match=r"2 of 4 denoiser ids \(50\.00%\) found .* the rest map to id 9"):
        warn_if_sparse(mapping)
    assert build_vocab_mapping(denoiser, _tokenizer({}, eos=8, pad=6), 4).fallback_id == 8  # unk, eos, then pad
    assert build_vocab_mapping(denoiser, _tokenizer({}, pad=6), 4).fallback_id == 6
    with pytest.raises(ValueError, match="declares no unk, eos or pad token"):
        build_vocab_mapping(denoiser, _tokenizer({}), 4)
    dense = build_vocab_mapping(
        _tokenizer({str(i): i for i in range(9)}), _tokenizer({str(i): i for i in range(10)}, unk=9), 10
    )
    assert dense.coverage == 0.9
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_sparse(dense)  # nine in ten found: no warning


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_the_4d_mask_lets_each_query_see_the_cached_and_valid_keys_and_itself(implementation, causal):
    """A padded query sees itself too: a fully masked row would make NaN, which leaks
    through zero attention weights. eager gets the mask additive, in the activations' dtype."""
    model = SimpleNamespace(config=SimpleNamespace(_attn_implementation=implementation))
    valid = torch.tensor([[False, True, True, False], [True, True, True, True]])
    past_valid = torch.tensor([[False, True], [True, True]])
    mask = attention_mask_4d(model, valid, causal, torch.bfloat16, past_valid)
    order = torch.ones(4, 4, dtype=torch.bool).tril() if causal else torch.ones(4, 4, dtype=torch.bool)
    new_keys = (valid[:, None, :] & order) | torch.eye(4, dtype=torch.bool)
    allowed = torch.cat([past_valid[:, None, :].expand(2, 4, 2), new_keys], dim=-1)[:, None]
    if implementation == "eager":
        lowest = torch.finfo(torch.bfloat16).min
        allowed = torch.zeros(allowed.shape, dtype=torch.bfloat16).masked_fill(~allowed, lowest)
    assert torch.equal(mask, allowed)
    assert torch.equal(attention_mask_4d(model, valid, causal, torch.bfloat16), mask[..., 2:])  # no cache


def test_classifier_reads_the_last_real_token_whatever_the_padding(classifier_reward):
    reward = classifier_reward
    prompts = ["short", "a much longer prompt with many more words in it"]
    responses = ["yes", "a long answer that goes on and on"]
    batched = reward.score_texts(prompts, responses)
    for prompt, response, score in zip(prompts, responses, batched):
        prefix, suffix = reward.context_ids(prompt)
        ids = prefix + reward.tokenizer(response, add_special_tokens=False)["input_ids"] + suffix
        alone = reward.model(input_ids=torch.tensor([ids])).logits[0, 0]
        torch.testing.assert_close(score, alone, atol=1e-5, rtol=1e-5)


def test_texts_are_scored_on_their_first_max_response_tokens(classifier_reward, monkeypatch):
    reward, text = classifier_reward, "one two three four five six"
    ids = reward.tokenizer(text, add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(reward, "max_response_tokens", 3)
    first = reward.input_embeddings()[torch.tensor([ids[:3]])]
    want = reward.score_embeds(reward.prepare(["hi"], 1), first, torch.ones(1, 3, dtype=torch.bool))
    torch.testing.assert_close(reward.score_texts(["hi"], [text]), want, atol=1e-5, rtol=1e-5)


def test_a_classifier_reward_needs_one_label():
    from transformers import BertConfig, BertForSequenceClassification

    from entrgi.rewards import ClassifierReward

    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=2)  # fmt: skip
    with pytest.raises(ValueError, match="a classifier reward needs num_labels == 1, got 2"):
        ClassifierReward(BertForSequenceClassification(config), None)


def test_chat_template_split_renders_the_whole_chat(classifier_reward):
    reward = classifier_reward
    prefix, suffix = reward.context_ids("how are you?")
    text = reward.tokenizer.decode(prefix + suffix)
    assert "[ user ] how are you?" in text and "[ assistant ]" in text
    assert reward.tokenizer.cls_token_id not in prefix  # no doubled BOS/CLS from the template split


def test_guidance_and_final_scores_agree_on_hard_tokens(classifier_reward):
    reward = classifier_reward
    ids = reward.tokenizer("the sun is shining", add_special_tokens=False)["input_ids"]
    table = reward.input_embeddings()
    g = len(ids) + 3  # three trailing slots masked out, as after an EOS
    valid = torch.tensor([[True] * len(ids) + [False] * 3])
    embeds = table[torch.tensor([ids + [0, 0, 0]])]
    guided = reward.score_embeds(reward.prepare(["hi"], 1), embeds, valid)
    assert embeds.shape[1] == g
    torch.testing.assert_close(guided, reward.score_texts(["hi"], ["the sun is shining"]), atol=1e-5, rtol=1e-5)


def test_similarity_reward_matches_mean_pooled_sentence_embeddings(similarity_reward, minilm_path):
    from sentence_transformers import SentenceTransformer

    texts = ["a sunny day at the beach", "the tax code of a small country"]
    encoder = SentenceTransformer(minilm_path, device="cpu")
    expected = torch.tensor(encoder.encode(texts + ["a sunny day at the beach"], normalize_embeddings=True))
    scores = similarity_reward.score_texts(["", ""], texts)
    torch.testing.assert_close(scores, expected[:2] @ expected[2], atol=1e-4, rtol=0)
    assert scores[0] > 0.9 > scores[1]


@pytest.mark.parametrize(
    "kind,options,match",
    [
        ("classifier", dict(target="calm seas"), "target is the text a similarity reward moves towards; a classifier"),
        ("likelihood", dict(target="calm seas"), "a likelihood reward does not read it"),
        ("similarity", dict(system_prompt="Be brief."), "a similarity reward reads no chat template"),
        ("similarity", dict(cache_prefix=True), "cache_prefix needs a causal reward"),
        ("regression", {}, "unknown reward kind 'regression'"),
    ],
)
def test_reward_options_its_kind_does_not_read_are_refused_before_loading(kind, options, match):
    with pytest.raises(ValueError, match=match):
        load_reward("/no/such/model", kind=kind, **options)  # checked before the path is looked at
