"""LikelihoodReward against a direct restatement of the published AR-likelihood reward."""

from __future__ import annotations

import pytest
import torch

from entrgi import LikelihoodReward, guided_embedding, load_reward
from entrgi.guidance import GuidanceStep, target_vectors
from entrgi.rewards.likelihood import log_normaliser
from entrgi.rewards.packing import response_mask_until_end


@pytest.fixture(scope="module")
def reward(likelihood_path) -> LikelihoodReward:
    return load_reward(likelihood_path, kind="likelihood")


def _log_probs(reward, ids: list[int]) -> torch.Tensor:
    """(len(ids) - 1, V) log P(next | prefix) of a plain token sequence."""
    logits = reward.model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


def test_tables_are_the_models_own(reward, likelihood_path):
    inputs = reward.model.get_input_embeddings().weight
    head = reward.model.get_output_embeddings().weight
    assert reward.input_embeddings() is inputs and reward.target_embeddings() is head  # no copies
    assert (head.data_ptr() == inputs.data_ptr()) == ("-tied" in likelihood_path)


def test_text_score_is_the_mean_log_probability_of_response_and_suffix(reward):
    prompts, responses = ["hi", "tell me a long story about the sea"], ["the sun is out", "no"]
    scores = reward.score_texts(prompts, responses)
    for prompt, response, score in zip(prompts, responses, scores):
        prefix, suffix = reward.context_ids(prompt)
        targets = reward.tokenizer(response, add_special_tokens=False)["input_ids"] + suffix
        ids = prefix + targets
        lp = _log_probs(reward, ids)[len(prefix) - 1 :].gather(-1, torch.tensor(targets)[:, None])
        torch.testing.assert_close(score, lp.mean(), atol=1e-4, rtol=1e-4)
    assert scores[0] != scores[1]


def test_the_output_head_runs_on_the_response_and_suffix_columns_only(reward, monkeypatch):
    import entrgi.rewards.likelihood as likelihood

    widths = []
    full = likelihood.log_normaliser

    def recording(hidden, weight):
        widths.append(hidden.shape[1])
        return full(hidden, weight)

    monkeypatch.setattr(likelihood, "log_normaliser", recording)
    prompts, responses = ["hi", "tell me a long story about the sea"], ["the sun is out", "no"]
    reward.score_texts(prompts, responses)
    longest = max(len(reward.tokenizer(r, add_special_tokens=False)["input_ids"]) for r in responses)
    suffix = max(len(reward.context_ids(p)[1]) for p in prompts)
    prefix = max(len(reward.context_ids(p)[0]) for p in prompts)
    assert widths == [longest + suffix] and prefix > 1  # not the prefix + response + suffix - 1 columns


@pytest.mark.parametrize("mode", ["entrgi", "aps", "expectation"])
def test_guided_value_matches_the_published_formula(reward, mode):
    """Published: soft_lp = sum_v p_v lp[v] (p constant), hard_lp = lp[drawn], position
    lp = soft_lp + w * stopgrad(hard_lp - soft_lp); committed and suffix tokens hard.
    Fed the guidance loop's ``[input | mixed | soft]`` embeddings, value and gradient
    match it (not those of sum_v q_v lp[v] with the constant mixed law
    q = p + w (onehot(drawn) - p), which differ unless w = 0)."""
    vocab, g = reward.input_embeddings().shape[0], 5
    context = reward.prepare(["what is the weather"], 1)
    prefix, suffix = reward.context_ids("what is the weather")
    assert reward.tokenizer.decode(suffix) == "end of turn"
    phi = (torch.randn(1, g, vocab) * 3).requires_grad_(True)
    committed = torch.tensor([[False, True, False, False, True]])
    committed_ids = torch.tensor([[0, 2023, 0, 0, 2154]])

    step = GuidanceStep(mode, 1, 0.5, 1.0, temperature=0.7, top_p=0.9, top_k=0)
    out = guided_embedding(phi, reward.input_embeddings(), temperature=0.7, top_p=0.9, mode=mode,
                           generator=torch.Generator().manual_seed(11))  # fmt: skip
    guided = torch.cat([out.embeds, target_vectors(phi, out, reward.target_embeddings(), ~committed, step)], dim=-1)
    head = reward.target_embeddings()
    real = torch.cat([reward.input_embeddings()[committed_ids], head[committed_ids], head[committed_ids]], dim=-1)
    embeds = torch.where(committed[..., None], real, guided)
    ids = torch.where(committed, committed_ids, out.argmax)
    valid = response_mask_until_end(ids, torch.tensor([reward.tokenizer.sep_token_id]))
    ours = reward.score_embeds(context, embeds, valid)
    (grad_ours,) = torch.autograd.grad(ours.sum(), phi)

    # the published computation, spelled out with full-vocabulary probabilities
    table = reward.model.get_input_embeddings().weight
    p = torch.softmax(phi / 0.7, dim=-1)
    soft = p @ table
    inputs = torch.where(committed[..., None], table[committed_ids],
                         soft + out.weights[..., None] * (table[out.tokens] - soft).detach())  # fmt: skip
    full = torch.cat([table[torch.tensor([prefix])], inputs, table[torch.tensor([suffix])]], dim=1)
    keep = torch.cat([torch.ones(len(prefix), dtype=torch.bool), valid[0], torch.ones(len(suffix), dtype=torch.bool)])
    lp = torch.log_softmax(reward.model(inputs_embeds=full[:, keep]).logits[0, :-1].float(), -1)[len(prefix) - 1 :]
    n = int(valid.sum())
    positions = valid[0].nonzero()[:, 0]
    drawn = torch.where(committed, committed_ids, out.tokens)[0, positions]
    w = torch.where(committed[0, positions], 1.0, out.weights[0, positions])
    soft_lp = (p[0, positions].detach() * lp[:n]).sum(-1)
    hard_lp = lp[:n].gather(-1, drawn[:, None])[:, 0]
    suffix_lp = lp[n:].gather(-1, torch.tensor(suffix)[:, None])[:, 0]
    guided_lp = torch.where(committed[0, positions], hard_lp, soft_lp + w * (hard_lp - soft_lp).detach())
    published = torch.cat([guided_lp, suffix_lp]).mean()
    q = (p[0, positions] + w[:, None] * (torch.nn.functional.one_hot(drawn, vocab) - p[0, positions])).detach()
    mixed = torch.cat([(q * lp[:n]).sum(-1), suffix_lp]).mean()
    (grad_mixed,) = torch.autograd.grad(mixed, phi, retain_graph=True)
    (grad_published,) = torch.autograd.grad(published, phi)

    torch.testing.assert_close(ours[0], published, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad_ours, grad_published, atol=1e-5, rtol=1e-3)
    if mode != "expectation":  # the two gradients differ by the w (hard - soft) part of the target
        assert not torch.allclose(grad_mixed, grad_published, atol=1e-5, rtol=1e-3)
    assert grad_ours.abs().sum() > 0


def test_embeddings_without_targets_are_refused(reward):
    context = reward.prepare(["hi"], 1)
    embeds = reward.input_embeddings()[torch.tensor([[5, 6]])]
    with pytest.raises(ValueError, match=r"3 x \d+ wide; got \d+ \(guide with target_table"):
        reward.score_embeds(context, embeds, torch.ones(1, 2, dtype=torch.bool))


def test_likelihood_guides_the_sampler(denoiser_paths, reward, monkeypatch):
    from entrgi import generate, load_denoiser

    denoiser = load_denoiser(denoiser_paths["mlm"])
    widths = []
    score_embeds = type(reward).score_embeds
    monkeypatch.setattr(
        reward, "score_embeds", lambda c, e, v: widths.append(e.shape[-1]) or score_embeds(reward, c, e, v)
    )
    results = generate(["hello there"], denoiser=denoiser, reward=reward, method="entrgi", steps=2,
                       max_new_tokens=4, num_samples=2, guidance_steps=1, progress=False)  # fmt: skip
    assert len(results[0].rewards) == 2 and all(r < 0 for r in results[0].rewards)
    assert set(widths) == {3 * reward.hidden_size}  # mixed and soft targets appended


def test_guidance_reads_the_models_tables_in_place(denoiser_paths, reward, monkeypatch):
    import entrgi.guidance as guidance
    from entrgi import generate, load_denoiser

    storages = []
    op = guidance.guided_embedding

    def recording(phi, table, **kwargs):
        storages.append(table.data_ptr())
        return op(phi, table, **kwargs)

    monkeypatch.setattr(guidance, "guided_embedding", recording)
    generate(["hello there"], denoiser=load_denoiser(denoiser_paths["mlm"]), reward=reward, method="entrgi", steps=1,
             max_new_tokens=3, num_samples=1, guidance_steps=1, progress=False)  # fmt: skip
    tables = [reward.input_embeddings().data_ptr(), reward.target_embeddings().data_ptr()]
    assert storages == tables  # the input table, then the output head for the soft targets: no copies


def test_a_target_table_in_another_vocabulary_is_refused(denoiser_paths, reward, monkeypatch):
    from entrgi import load_denoiser
    from entrgi.sampler import GuidanceTable

    head = reward.target_embeddings()
    monkeypatch.setattr(reward, "target_embeddings", lambda: head[:-3])
    rows = head.shape[0]
    with pytest.raises(ValueError, match=f"target table has {rows - 3} rows but its input table {rows}"):
        GuidanceTable.between(load_denoiser(denoiser_paths["mlm"]), reward)


def test_a_head_with_bias_is_refused(reward):
    import copy

    model = copy.deepcopy(reward.model)
    head = model.get_output_embeddings()
    head.bias = torch.nn.Parameter(torch.zeros(head.weight.shape[0]))
    with pytest.raises(ValueError, match="linear map without bias"):
        LikelihoodReward(model, reward.tokenizer)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_log_normaliser_is_logsumexp_chunk_by_chunk(dtype, tol):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 7, 16, generator=g).to(dtype).requires_grad_(True)
    weight = torch.randn(50, 16, generator=g).to(dtype)
    upstream = torch.randn(2, 7, generator=g)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.shape) or t, lambda t: t):
        got = log_normaliser(hidden, weight, chunk_bytes=3 * 4 * 50)  # 3 rows a chunk: 14 rows in 5 chunks
    (got_grad,) = torch.autograd.grad((got * upstream).sum(), hidden)
    want = torch.logsumexp((hidden @ weight.T).float(), dim=-1)
    (want_grad,) = torch.autograd.grad((want * upstream).sum(), hidden)
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    torch.testing.assert_close(got_grad, want_grad, atol=tol, rtol=tol)
    assert kept == [(14, 16)]  # one direction per row; no (rows, V) logits kept
    with pytest.raises(ValueError, match="must be frozen"):
        log_normaliser(hidden, weight.requires_grad_(True))
