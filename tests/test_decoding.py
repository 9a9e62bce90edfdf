"""Commit schedules and selection (Dream, LLaDA blocks and remasking, Fast-dLLM thresholds),
classifier-free guidance, and what guidance hands the reward."""

from __future__ import annotations

import math

import pytest
import torch

from entrgi import GuidanceConfig, generate, load_denoiser
from entrgi.guidance import GuidanceStep, optimize_logits
from entrgi.sampler import DiffusionRun, GuidanceTable
from entrgi.schedule import (
    current_block, linear_counts, random_commits, select_commits, threshold_commits, timesteps,
)  # fmt: skip

PROMPTS = ["hello there", "what is the weather like today in the big city"]


@pytest.fixture(scope="module")
def llada(denoiser_paths):
    return load_denoiser(denoiser_paths["llada"], kind="llada")


@pytest.fixture(scope="module")
def dream(denoiser_paths):
    return load_denoiser(denoiser_paths["dream"], kind="dream")


def _run(denoiser, reward, config, prompts=PROMPTS, seed=0):
    encoded = denoiser.encode_prompts(prompts)
    table = GuidanceTable.between(denoiser, reward) if config.guided else None
    context = reward.prepare(prompts, config.num_samples) if config.guided else None
    return DiffusionRun(denoiser, encoded, config, torch.Generator().manual_seed(seed), table, reward, context)


def _masks_per_block(run, block_length):
    masked = run.response == run.denoiser.mask_token_id
    return masked.view(masked.shape[0], -1, block_length).sum(-1).tolist()


def test_current_block_is_the_first_block_with_a_mask():
    masked = torch.tensor(
        [[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 1, 1]], dtype=torch.bool
    )
    block = current_block(masked, 2).long().tolist()
    assert block == [[0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1], [0] * 6, [1, 1, 0, 0, 0, 0]]


def test_linear_counts_spread_a_block_evenly_larger_shares_first():
    # LLaDA's get_num_transfer_tokens: 10 masks over 4 steps -> 3, 3, 2, 2
    left, counts = 10, []
    for step in range(4):
        masked = torch.arange(12).unsqueeze(0) < left  # `left` masks in a 12-wide block
        counts.append(int(linear_counts(masked, 4, torch.tensor([step]))[0]))
        left -= counts[-1]
    assert counts == [3, 3, 2, 2]
    # the block's step index wraps: step 5 of 4-step blocks is the second of its block
    assert int(linear_counts(torch.ones(1, 7, dtype=torch.bool), 4, torch.tensor([5]))[0]) == 3


def test_blocks_decode_left_to_right_with_the_linear_schedule(llada, classifier_reward):
    config = GuidanceConfig(method="entrgi", steps=4, max_new_tokens=8, block_length=4, num_samples=2,
                            guidance_steps=1, remasking="low_confidence", deprioritize_eos=False)  # fmt: skip
    run = _run(llada, classifier_reward, config)
    history = []
    for step in range(config.steps):
        run.step(step)
        history.append(_masks_per_block(run, 4))
    rows = len(PROMPTS) * 2
    # 2 blocks x 2 steps: ceil(4 / 2) = 2 per step; the second block waits for the first
    assert history == [[[2, 4]] * rows, [[0, 4]] * rows, [[0, 2]] * rows, [[0, 0]] * rows]


@pytest.mark.parametrize("scope", ["block", "all"])
def test_guidance_scope_steers_the_current_block_or_every_mask(llada, similarity_reward, scope):
    config = GuidanceConfig(method="entrgi", steps=2, max_new_tokens=6, block_length=3, num_samples=2,
                            guidance_steps=2, lr=1.0, guidance_scope=scope)  # fmt: skip
    run = _run(llada, similarity_reward, config)
    masked = run.response == llada.mask_token_id
    masked[:, 0] = False  # a committed position inside the first block
    phi_init = run.response_logits()
    steered = masked & current_block(masked, 3) if scope == "block" else None
    phi = phi_init.clone()
    run.optimize(phi, masked, steered)
    moved = (phi != phi_init).any(-1)
    expected = masked.clone()
    if scope == "block":
        expected[:, 3:] = False
    assert torch.equal(moved, expected)


def test_guided_commit_scores_the_unsteered_logits(dream, similarity_reward, monkeypatch):
    """phi is optimised in place, so the entropy confidence is taken before it moves."""
    import entrgi.sampler as sampler
    from entrgi.ops.reference import entropy_confidence_reference

    config = GuidanceConfig(method="entrgi", steps=3, max_new_tokens=6, num_samples=2, guidance_steps=2, lr=2.0,
                            deprioritize_eos=False)  # fmt: skip
    run = _run(dream, similarity_reward, config)
    unsteered = run.response_logits()
    seen = {}
    sample_step, select_commits = sampler.sample_step, sampler.select_commits

    def spy_sample(phi, **kwargs):
        seen["phi"] = phi.clone()
        return sample_step(phi, **kwargs)

    def spy_select(confidence, *args):
        seen["confidence"] = confidence.clone()
        return select_commits(confidence, *args)

    monkeypatch.setattr(sampler, "sample_step", spy_sample)
    monkeypatch.setattr(sampler, "select_commits", spy_select)
    run.step(0)
    entropy = lambda phi: entropy_confidence_reference(phi.flatten(0, 1), config.temperature).view(phi.shape[:2])  # noqa: E731
    torch.testing.assert_close(seen["confidence"], entropy(unsteered))
    assert not torch.allclose(entropy(seen["phi"]), entropy(unsteered))  # guidance did move phi


def test_in_place_guidance_needs_a_contiguous_float32_phi():
    for phi in (torch.randn(2, 3, 8).transpose(0, 1), torch.randn(2, 3, 8, dtype=torch.float64)):
        with pytest.raises(ValueError, match="in_place needs a contiguous float32"):
            optimize_logits(phi, *[None] * 7, in_place=True)


class _InputSpy:
    """A reward that records the embeddings and response mask guidance hands it."""

    def __init__(self):
        self.embeds, self.valid = [], []

    def score_embeds(self, context, embeds, valid):
        self.embeds.append(embeds.detach().clone())
        self.valid.append(valid.clone())
        return (embeds.sum(-1) * valid).sum(-1)


def test_guidance_cuts_the_reward_input_at_the_first_end_token_of_the_argmax():
    """The reward sees each response up to its first end token as argmax(phi) reads it
    (SPEC), not as the hard draw does: position 1's argmax is the end token, which a
    draw picks about one time in seven, so every row's input stops after position 0."""
    vocab, end = 8, 7
    phi = torch.randn(64, 4, vocab, generator=torch.Generator().manual_seed(3)) * 0.1
    phi[:, :, end] = -3.0
    phi[:, 1, end] = 0.5  # the argmax at position 1, yet a draw there is mostly another token
    masked = torch.ones(64, 4, dtype=torch.bool)
    table = torch.randn(vocab, 5, generator=torch.Generator().manual_seed(4))
    spy = _InputSpy()
    step = GuidanceStep(mode="entrgi", steps=2, lr=1e-3, reward_temperature=1.0, temperature=1.0, top_p=1.0, top_k=0,
                        backend="torch")  # fmt: skip
    optimize_logits(phi, masked, torch.zeros(64, 4, dtype=torch.long), table, spy, None, torch.tensor([end]), step,
                    torch.Generator().manual_seed(5))  # fmt: skip
    expected = torch.tensor([True, False, False, False]).expand(64, 4)
    assert len(spy.valid) == 2 and all(torch.equal(valid, expected) for valid in spy.valid)


def test_guidance_shows_the_reward_the_committed_tokens_at_committed_positions():
    """Committed positions reach the reward as their tokens' embeddings (the op skips
    those rows and returns zeros there)."""
    g = torch.Generator().manual_seed(6)
    phi, table = torch.randn(3, 6, 10, generator=g), torch.randn(10, 4, generator=g)
    masked = torch.rand(3, 6, generator=g) < 0.5
    masked[:, 0] = True
    masked[:, 1] = False
    response = torch.randint(0, 10, (3, 6), generator=g)
    spy = _InputSpy()
    step = GuidanceStep(mode="aps", steps=2, lr=0.1, reward_temperature=1.0, temperature=0.8, top_p=1.0, top_k=0,
                        backend="torch")  # fmt: skip
    optimize_logits(phi, masked, response, table, spy, None, torch.tensor([99]), step, torch.Generator().manual_seed(7))
    for embeds in spy.embeds:
        assert torch.equal(embeds[~masked], table[response][~masked])


def _greedy_commit(llada, reward, remasking, seed):
    """One greedy commit of a fresh run: (committed (N, G) bool, the logits it read)."""
    config = GuidanceConfig(method="none", steps=4, max_new_tokens=16, num_samples=2, temperature=0.0,
                            remasking=remasking, deprioritize_eos=False)  # fmt: skip
    run = _run(llada, reward, config, seed=seed)
    masked = run.response == llada.mask_token_id
    phi = run.response_logits()
    run.commit(phi.clone(), masked)
    return masked & (run.response != llada.mask_token_id), phi


def test_low_confidence_remasking_commits_the_most_probable_tokens(llada, classifier_reward):
    """Greedy draws: LLaDA's score is each position's top probability under softmax(phi)."""
    committed, phi = _greedy_commit(llada, classifier_reward, "low_confidence", seed=0)
    top_probability = torch.softmax(phi, -1).amax(-1)
    t = timesteps(4)
    count = int(16 * (1 - t[1] / t[0]))  # Dream's schedule at the first of 4 steps: 3 of 16 masks
    expected = top_probability.argsort(-1, descending=True)[:, :count]
    assert (committed.sum(-1) == count).all()
    assert torch.equal(committed, torch.zeros_like(committed).scatter_(-1, expected, True))


def test_random_remasking_commits_a_seeded_uniform_choice(llada, classifier_reward):
    draws = [_greedy_commit(llada, classifier_reward, "random", seed)[0] for seed in (0, 0, 1, 2, 3)]
    assert torch.equal(draws[0], draws[1])
    assert all((d.sum(-1) == 3).all() for d in draws)
    assert len({tuple(d.flatten().tolist()) for d in draws}) >= 3  # the scores ignore phi


def test_classifier_free_guidance_mixes_a_prompt_masked_batch(dream, classifier_reward):
    config = GuidanceConfig(method="none", steps=2, max_new_tokens=4, num_samples=1, cfg_scale=1.5)
    run = _run(dream, classifier_reward, config)
    mixed = run.response_logits()
    unconditional = run.canvas.clone()
    prompt = run.canvas[:, : run.prompt_length]
    unconditional[:, : run.prompt_length] = torch.where(run.attention[:, : run.prompt_length],
                                                        dream.mask_token_id, prompt)  # fmt: skip
    p = run.prompt_length
    cond = dream.logits(run.canvas, run.attention)[:, p:].float()
    un = dream.logits(unconditional, run.attention)[:, p:].float()
    torch.testing.assert_close(mixed, un + 2.5 * (cond - un), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(mixed, cond, atol=1e-3)
    results = generate(PROMPTS, denoiser=dream, reward=classifier_reward, progress=False,
                       **{**config.__dict__, "cfg_scale": 1.5})  # fmt: skip
    assert all(dream.mask_token_id not in sum(r.response_ids, []) for r in results)


def test_commit_selection_never_touches_unmasked_positions():
    confidence = torch.tensor([[5.0, -torch.inf, 1.0, -torch.inf, 3.0]])
    masked = torch.tensor([[False, True, True, True, False]])
    for count in range(4):
        chosen = select_commits(confidence, masked, torch.tensor([count]), 0.0, None)
        assert chosen.sum() == count and not (chosen & ~masked).any()
    sampled = select_commits(confidence, masked, torch.tensor([3]), 0.7, torch.Generator().manual_seed(0))
    assert torch.equal(sampled, masked)


def test_random_commits_take_each_mask_with_the_step_fraction_and_all_on_the_last():
    """alg="origin": each masked position is committed with probability 1 - s/t, and
    every one on the last step (whose fraction, 1 - eps/t, is just short of 1)."""
    schedule = timesteps(4)
    masked = torch.rand(64, 50, generator=torch.Generator().manual_seed(1)) < 0.7
    generator = torch.Generator().manual_seed(2)
    for step in range(4):
        commit = random_commits(masked, schedule, torch.tensor([step]), generator)
        assert not (commit & ~masked).any()
        if step == 3:
            assert torch.equal(commit, masked)
        else:
            fraction = float(1 - schedule[step + 1] / schedule[step])
            n = int(masked.sum())
            assert abs(int(commit.sum()) / n - fraction) < 4 * math.sqrt(fraction * (1 - fraction) / n)


def test_threshold_commits_everything_confident_and_at_least_one():
    confidence = torch.tensor([[0.95, 0.2, 0.97, 0.5], [0.1, 0.3, 0.2, 0.05], [0.99, 0.99, 0.99, 0.99]])
    masked = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    commit = threshold_commits(confidence, masked, 0.9).long().tolist()
    assert commit == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]


@pytest.mark.parametrize("threshold,blocks", [(1.0, None), (1e-6, None), (1e-6, 2), (0.3, 2)])
def test_threshold_decoding_counts_forward_passes(llada, classifier_reward, threshold, blocks):
    g = 8
    results = generate(PROMPTS, denoiser=llada, reward=classifier_reward, method="entrgi", num_samples=2,
                       max_new_tokens=g, guidance_steps=1, remasking="low_confidence", progress=False,
                       confidence_threshold=threshold, block_length=None if blocks is None else g // blocks)  # fmt: skip
    passes = [r.forward_passes for r in results]
    for r in results:
        assert llada.mask_token_id not in sum(r.response_ids, [])
    if threshold == 1.0:  # nothing reaches probability 1: one commit per step
        assert passes == [g, g]
    elif threshold == 1e-6:  # everything passes: one step per block
        assert passes == [blocks or 1] * 2
    else:
        assert all(blocks <= p <= g for p in passes)


def test_fixed_step_runs_report_their_steps(llada, classifier_reward):
    results = generate(PROMPTS, denoiser=llada, reward=classifier_reward, method="bon", steps=4, max_new_tokens=8,
                       num_samples=2, block_length=4, progress=False)  # fmt: skip
    assert [r.forward_passes for r in results] == [4, 4]


def test_block_cfg_threshold_step_has_no_host_sync(dream, classifier_reward, monkeypatch):
    config = GuidanceConfig(steps=4, max_new_tokens=4, block_length=2, num_samples=2, guidance_steps=1,
                            cfg_scale=0.5, alg="maskgit_plus", confidence_threshold=0.5)  # fmt: skip
    run = _run(dream, classifier_reward, config)

    def forbidden(*_args, **_kwargs):
        raise AssertionError("host sync inside the denoising step")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for step in range(4):
        run.step(step)
    monkeypatch.undo()
    assert run.finished()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(block_length=3, max_new_tokens=8), r"max_new_tokens \(8\) must be a multiple of block_length \(3\)"),
        (
            dict(block_length=2, max_new_tokens=8, steps=6),
            r"steps \(6\) must be a multiple of the number of blocks \(4\)",
        ),
        (dict(block_length=0), "block_length must be an int >= 1 or None, got 0"),
        (dict(remasking="lowest"), "unknown remasking 'lowest'"),
        (dict(guidance_scope="row"), "unknown guidance_scope 'row'"),
        (dict(cfg_scale=-1.0), "cfg_scale must be a finite number >= 0, got -1.0"),
        (dict(cfg_scale=math.inf), "cfg_scale must be a finite number >= 0, got inf"),
        (dict(confidence_threshold=1.5, alg="maskgit_plus"), r"confidence_threshold must be in \(0, 1\], got 1.5"),
        (dict(confidence_threshold=0.9), "needs a probability confidence .* got 'entropy'"),
        (dict(alg="origin", block_length=4, max_new_tokens=8, steps=4), "use remasking='random'"),
    ],
)
def test_bad_decoding_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GuidanceConfig(**kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("threshold", [None, 0.5])
def test_cuda_graphs_replay_blocks_cfg_and_thresholds(denoiser_paths, classifier_path, threshold):
    from entrgi import load_reward

    denoiser = load_denoiser(denoiser_paths["llada"], kind="llada", device="cuda")
    reward = load_reward(classifier_path, device="cuda")
    common = dict(method="entrgi", steps=8, max_new_tokens=8, block_length=4, num_samples=2, guidance_steps=2,
                  cfg_scale=0.5, remasking="low_confidence", confidence_threshold=threshold, seed=5,
                  progress=False)  # fmt: skip
    eager = generate(PROMPTS, denoiser=denoiser, reward=reward, cuda_graphs=False, **common)
    graphed = generate(PROMPTS, denoiser=denoiser, reward=reward, cuda_graphs=True, **common)
    assert [r.response_ids for r in graphed] == [r.response_ids for r in eager]
    assert [r.forward_passes for r in graphed] == [r.forward_passes for r in eager]
