"""Dream-style step hooks (logits and tokens) and the per-step response history."""

from __future__ import annotations

import json

import pytest
import torch

from entrgi import generate, load_denoiser
from entrgi.cli import main

PROMPTS = ["hello there", "what is the weather like today in the big city"]
SMALL = dict(steps=4, max_new_tokens=6, num_samples=2, guidance_steps=2, progress=False)


@pytest.fixture(scope="module")
def dream(denoiser_paths):
    return load_denoiser(denoiser_paths["dream"], kind="dream")


@pytest.mark.parametrize("method", ["entrgi", "none"])
def test_history_holds_the_response_after_every_step(dream, classifier_reward, method):
    results = generate(PROMPTS, denoiser=dream, reward=classifier_reward, method=method, output_history=True, **SMALL)
    mask = dream.mask_token_id
    for result in results:
        history = torch.tensor(result.history)  # (steps, K, G)
        assert history.shape == (4, 2, 6)
        assert history[-1].tolist() == result.response_ids
        masks = (history == mask).sum(-1)
        # Dream's schedule commits int(n (1 - s / t)) of the n masks a step (t = linspace(1, 1e-3, 5)), all at the last
        assert masks.tolist() == [[5, 5], [4, 4], [3, 3], [0, 0]]
        committed = history[:-1] != mask
        assert torch.equal(history[1:][committed], history[:-1][committed])  # a committed token never changes
    assert all(r.history is None for r in generate(PROMPTS, denoiser=dream, reward=classifier_reward, **SMALL))


@pytest.mark.parametrize("eps, masks", [(1e-3, [4, 0]), (0.5, [5, 0])])
def test_eps_is_the_last_step_s_time(dream, classifier_reward, eps, masks):
    # two steps, t = 1 -> s = (1 + eps) / 2 -> eps: int(6 (1 - s)) commits first (2; 1 at eps = 0.5), then the rest
    results = generate(PROMPTS, denoiser=dream, reward=classifier_reward, method="none", steps=2, max_new_tokens=6,
                       num_samples=2, eps=eps, output_history=True, progress=False)  # fmt: skip
    for result in results:
        assert (torch.tensor(result.history) == dream.mask_token_id).sum(-1).tolist() == [[m, m] for m in masks]


def test_history_of_a_threshold_run_ends_at_its_last_step(denoiser_paths, classifier_reward):
    llada = load_denoiser(denoiser_paths["llada"], kind="llada")
    results = generate(PROMPTS, denoiser=llada, reward=classifier_reward, method="none", max_new_tokens=8,
                       num_samples=2, remasking="low_confidence", confidence_threshold=0.5, output_history=True,
                       progress=False)  # fmt: skip
    for result in results:
        history = torch.tensor(result.history)
        assert 1 <= history.shape[0] <= 8 and history.shape[1:] == (2, 8)
        assert history[-1].tolist() == result.response_ids and not (history[-1] == llada.mask_token_id).any()
        # at least one commit a step, and a step only after something was left to commit
        masks = (history == llada.mask_token_id).sum((1, 2))
        assert (masks[1:] < masks[:-1]).all() and masks[-2:].tolist() != [0, 0]


@pytest.mark.parametrize("options", [dict(method="entrgi"), dict(method="entrgi", adam_moments="recompute"),
                                     dict(method="none")])  # fmt: skip
def test_logits_hook_steers_what_the_step_draws(dream, classifier_reward, options):
    favoured = 1234
    calls = []

    def only_one_token(step, canvas, logits):
        calls.append((step, tuple(canvas.shape), tuple(logits.shape), logits.dtype))
        logits = logits.clone()
        logits[..., favoured] += 1e4
        return logits

    results = generate(PROMPTS, denoiser=dream, reward=classifier_reward, logits_hook=only_one_token,
                       deprioritize_eos=False, **options, **SMALL)  # fmt: skip
    assert all(ids == [favoured] * 6 for r in results for ids in r.response_ids)
    prompt_length = calls[0][1][1] - 6
    assert calls == [(step, (4, prompt_length + 6), (4, 6, dream.vocab_size), torch.float32) for step in range(4)]


def test_tokens_hook_rewrites_the_canvas_each_step(dream, classifier_reward):
    steps_seen = []

    def pin_first_position(step, canvas, logits):
        steps_seen.append(step)
        canvas[:, -6] = 777  # the response's first position, committed or not
        return canvas

    results = generate(PROMPTS, denoiser=dream, reward=classifier_reward, tokens_hook=pin_first_position,
                       output_history=True, **SMALL)  # fmt: skip
    assert steps_seen == [0, 1, 2, 3]
    for result in results:
        assert all(ids[0] == 777 for ids in result.response_ids)
        assert all(sample[0] == 777 for step in result.history for sample in step)  # recorded after the hook


def test_identity_hooks_leave_the_tokens_of_a_seed_unchanged(dream, classifier_reward):
    plain = generate(PROMPTS, denoiser=dream, reward=classifier_reward, seed=3, **SMALL)
    hooked = generate(PROMPTS, denoiser=dream, reward=classifier_reward, seed=3, logits_hook=lambda s, c, x: x,
                      tokens_hook=lambda s, c, x: c, **SMALL)  # fmt: skip
    assert [r.response_ids for r in hooked] == [r.response_ids for r in plain]


@pytest.mark.parametrize(
    "hooks, message",
    [
        (dict(logits_hook=lambda s, c, x: x[..., :-1]), r"logits_hook must return a tensor like the one it was given "
                                                        r"\(shape \(4, 6, \d+\), torch.float32 on cpu\), got shape"),
        (dict(logits_hook=lambda s, c, x: None), "logits_hook must return .* got NoneType"),
        (dict(tokens_hook=lambda s, c, x: c.int()), r"tokens_hook must return .*torch.int64.* got .*torch.int32"),
    ],
)  # fmt: skip
def test_a_hook_returning_something_else_raises(dream, classifier_reward, hooks, message):
    with pytest.raises(ValueError, match=message):
        generate(PROMPTS, denoiser=dream, reward=classifier_reward, **hooks, **SMALL)


def test_hooks_refuse_cuda_graphs_on(dream, classifier_reward, monkeypatch):
    monkeypatch.setattr("entrgi.config.GuidanceConfig.use_cuda_graphs", lambda self, device: True)
    with pytest.raises(ValueError, match="cuda_graphs=True: step hooks run Python at every step"):
        generate(PROMPTS, denoiser=dream, reward=classifier_reward, cuda_graphs=True, logits_hook=lambda s, c, x: x,
                 **SMALL)  # fmt: skip


def test_cli_writes_the_history_with_output_history(tmp_path, mlm_path, classifier_path):
    out = tmp_path / "results.json"
    argv = ["generate", "--model", mlm_path, "--reward-model", classifier_path, "--prompt", "hi",
            "--steps", "3", "--max-new-tokens", "3", "--num-samples", "2", "--guidance-steps", "1", "--quiet",
            "--output-history", "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    record = json.loads(out.read_text())["results"][0]
    assert len(record["history"]) == 3 and [len(s) for s in record["history"][-1]] == [3, 3]
    assert main(argv[:-3] + ["-o", str(out)]) == 0
    assert "history" not in json.loads(out.read_text())["results"][0]
