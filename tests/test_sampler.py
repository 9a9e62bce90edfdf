"""The sampler end to end on tiny local denoisers of every kind and both reward kinds."""

from __future__ import annotations

import contextlib
import functools
import gc
import math

import pytest
import torch

from entrgi import GuidanceConfig, generate, load_denoiser, sampler
from entrgi.sampler import BatchedGeneration, DiffusionRun, GuidanceTable
from helpers import graphed_runs_match_eager

PROMPTS = ["hello there", "what is the weather like today in the big city"]
SMALL = dict(steps=4, max_new_tokens=6, num_samples=2, guidance_steps=2, progress=False)


@pytest.fixture(scope="module")
def denoisers(denoiser_paths):
    return {kind: load_denoiser(path, kind=None if kind == "mlm" else kind) for kind, path in denoiser_paths.items()}


def test_kinds_are_detected_and_dream_is_shifted(denoisers):
    assert {k: d.kind for k, d in denoisers.items()} == {"mlm": "mlm", "llada": "llada", "dream": "dream"}
    dream = denoisers["dream"]
    ids = torch.randint(1000, 2000, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.bool)
    shifted = dream.logits(ids, mask)
    raw = dream.model(input_ids=ids, attention_mask=mask[:, None, None, :].expand(2, 1, 7, 7)).logits
    torch.testing.assert_close(shifted[:, 1:], raw[:, :-1])
    torch.testing.assert_close(shifted[:, 0], raw[:, 0])
    # bidirectional: changing the last token changes the first position's logits
    other = ids.clone()
    other[:, -1] += 1
    assert not torch.allclose(dream.logits(other, mask)[:, 1], shifted[:, 1])


@pytest.mark.parametrize("kind", ["mlm", "llada", "dream"])
def test_logits_of_the_last_positions_match_the_full_logits(denoisers, kind):
    denoiser = denoisers[kind]
    ids = torch.randint(1000, 2000, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[0, :4] = False  # a left-padded row
    full = denoiser.logits(ids, mask)
    head_rows = []
    record = denoiser.model.get_output_embeddings().register_forward_hook(
        lambda head, args, out: head_rows.append(args[0].shape[1])
    )
    for keep in (1, 5, 8, 9):
        kept = denoiser.logits(ids, mask, keep_last=keep)
        torch.testing.assert_close(kept, full[:, -keep:])
        assert kept.is_contiguous()
    record.remove()
    # the head runs on the kept positions only (Dream: on their left neighbours)
    assert head_rows == [1, 5, 8, 9]
    with pytest.raises(ValueError, match="keep_last"):
        denoiser.logits(ids, mask, keep_last=10)


@pytest.mark.parametrize("keep_argument", [True, False], ids=["keep-argument", "no-keep-argument"])
@pytest.mark.parametrize("head_hook", [True, False], ids=["head-hook", "head-unreachable"])
def test_dream_keeps_the_shifted_rows_however_its_head_is_reached(denoisers, monkeypatch, keep_argument, head_hook):
    dream = denoisers["dream"]
    assert dream._keep_argument is not None  # the tiny model takes logits_to_keep, as Qwen2 does
    ids = torch.randint(1000, 2000, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.bool)
    full = dream.logits(ids, mask)
    if not keep_argument:
        monkeypatch.setattr(dream, "_keep_argument", None)
    if not head_hook:  # as for a head applied through F.linear: the slice of the output does the work
        monkeypatch.setattr(dream, "_head_on_last", lambda *args: contextlib.nullcontext())
    head_rows = []
    record = dream.model.get_output_embeddings().register_forward_hook(
        lambda head, args, out: head_rows.append(args[0].shape[1])
    )
    for keep in (1, 5, 8):
        kept = dream.logits(ids, mask, keep_last=keep)
        torch.testing.assert_close(kept, full[:, -keep:])
        assert kept.is_contiguous() == head_hook
    record.remove()
    # the rows the head ran on: the kept ones (the hook's cut), else the model's own cut
    # (the kept rows and the one after them), else all 9
    assert head_rows == [keep if head_hook else keep + 1 if keep_argument else 9 for keep in (1, 5, 8)]


@pytest.mark.parametrize("kind", ["mlm", "llada", "dream"])
@pytest.mark.parametrize("method", ["entrgi", "aps", "expectation", "bon", "none"])
def test_every_method_runs_on_every_denoiser(denoisers, classifier_reward, kind, method):
    results = generate(PROMPTS, denoiser=denoisers[kind], reward=classifier_reward, method=method, **SMALL)
    assert [r.prompt for r in results] == PROMPTS
    for r in results:
        assert len(r.responses) == len(r.rewards) == len(r.response_ids) == 2
        assert all(isinstance(x, float) for x in r.rewards)
        assert all(len(ids) == 6 for ids in r.response_ids)
        assert denoisers[kind].mask_token_id not in sum(r.response_ids, [])
        assert r.top1_reward == (r.rewards[0] if method == "none" else max(r.rewards))
        assert r.avg_reward == pytest.approx(sum(r.rewards) / 2)


def test_determinism_per_seed(denoisers, similarity_reward):
    run = lambda seed: generate(PROMPTS, denoiser=denoisers["mlm"], reward=similarity_reward, seed=seed, **SMALL)  # noqa: E731
    first, again, other = run(1), run(1), run(2)
    assert [r.response_ids for r in first] == [r.response_ids for r in again]
    assert [r.rewards for r in first] == [r.rewards for r in again]
    assert [r.response_ids for r in first] != [r.response_ids for r in other]


@pytest.mark.parametrize("cache_prefix", [False, True])
def test_runs_are_reused_across_batches_and_calls(denoisers, classifier_path, monkeypatch, cache_prefix):
    """Batches of one shape share one cached run (refilled by ``load``, cached reward
    prefix included) within a call and across calls, with the tokens of fresh runs."""
    from entrgi import load_reward

    classifier_reward = load_reward(classifier_path, cache_prefix=cache_prefix)
    denoiser = denoisers["dream"]
    prompts = ["red car", "big dog", "red car", "a much longer prompt than the others"]
    lengths = [len(ids) for ids in denoiser.encode_prompts(prompts)]
    assert lengths[0] == lengths[1] != lengths[3]
    config = GuidanceConfig(prompts_per_batch=1, seed=3, **{k: v for k, v in SMALL.items() if k != "progress"})
    job = BatchedGeneration(prompts, denoiser, classifier_reward, config)
    fresh = []
    for index in range(job.num_batches):
        denoiser.run_cache.clear()
        fresh += job.run_batch(index)
    denoiser.run_cache.clear()
    built = []
    init = DiffusionRun.__init__
    monkeypatch.setattr(DiffusionRun, "__init__", lambda self, *a, **k: built.append(1) or init(self, *a, **k))
    first = generate(prompts, denoiser=denoiser, reward=classifier_reward, config=config, progress=False)
    again = generate(prompts, denoiser=denoiser, reward=classifier_reward, config=config, progress=False)
    assert len(built) == 2 and len(denoiser.run_cache) == 2  # one run per shape, for both calls
    for results in (first, again):
        assert [r.response_ids for r in results] == [r.response_ids for r in fresh]
        assert [r.forward_passes for r in results] == [r.forward_passes for r in fresh]
    assert first[0].response_ids != first[2].response_ids  # same prompt, own batch seed
    denoiser.run_cache.clear()


def test_run_cache_is_bounded_and_drops_the_least_recently_used():
    from entrgi.run_cache import RunCache

    cache = RunCache(capacity=2)
    for key in "abc":
        cache.get_or_build(key, lambda: object())
    assert len(cache) == 2
    assert cache.get_or_build("c", lambda: None)[1] and not cache.get_or_build("a", lambda: None)[1]  # b dropped
    assert cache.get_or_build("c", lambda: None)[1]  # used again: a, built before it, is dropped next
    assert not cache.get_or_build("d", lambda: None)[1]
    assert cache.get_or_build("c", lambda: None)[1] and not cache.get_or_build("a", lambda: None)[1]
    with pytest.raises(ValueError, match="capacity"):
        RunCache(capacity=0)


def _run(denoiser, reward, config, prompts=PROMPTS):
    encoded = denoiser.encode_prompts(prompts)
    table = GuidanceTable.between(denoiser, reward) if config.guided else None
    context = reward.prepare(prompts, config.num_samples) if config.guided else None
    return DiffusionRun(denoiser, encoded, config, torch.Generator().manual_seed(0), table, reward, context)


def test_prompts_are_never_modified_and_padding_is_left(denoisers, classifier_reward):
    config = GuidanceConfig(steps=3, max_new_tokens=5, num_samples=3, guidance_steps=1)
    run = _run(denoisers["dream"], classifier_reward, config)
    prompt_before = run.canvas[:, : run.prompt_length].clone()
    assert not run.attention[0, 0] and run.attention[-1, 0]  # short prompt is left-padded
    for step in range(config.steps):
        run.step(step)
        assert torch.equal(run.canvas[:, : run.prompt_length], prompt_before)
    assert (run.response != denoisers["dream"].mask_token_id).all()


def test_each_step_commits_the_scheduled_number_of_masked_positions(denoisers, classifier_reward):
    config = GuidanceConfig(method="bon", steps=4, max_new_tokens=8, num_samples=2, deprioritize_eos=False)
    run = _run(denoisers["llada"], classifier_reward, config)
    remaining = [8]
    for step in range(4):
        run.step(step)
        remaining.append(int((run.response == run.denoiser.mask_token_id).sum(-1)[0]))
    # Dream's schedule: t_i = linspace(1, 1e-3, T + 1); commit int(n * (1 - t_{i+1}/t_i)), all at the end
    t = [1 - i * (1 - 1e-3) / 4 for i in range(5)]
    expected = [8]
    for i in range(3):
        expected.append(expected[-1] - int(expected[-1] * (1 - t[i + 1] / t[i])))
    assert remaining == expected + [0] == [8, 7, 5, 3, 0]


def test_temperature_zero_is_greedy_and_guided_rows_use_argmax(denoisers, classifier_reward):
    a = generate(PROMPTS, denoiser=denoisers["mlm"], reward=classifier_reward, temperature=0.0, seed=1, **SMALL)
    b = generate(PROMPTS, denoiser=denoisers["mlm"], reward=classifier_reward, temperature=0.0, seed=2, **SMALL)
    assert [r.response_ids for r in a] == [r.response_ids for r in b]
    assert all(r.response_ids[0] == r.response_ids[1] for r in a)


def test_guidance_raises_the_reward(denoisers, similarity_reward):
    common = dict(steps=4, max_new_tokens=6, num_samples=4, progress=False, seed=3)
    unguided = generate(PROMPTS, denoiser=denoisers["mlm"], reward=similarity_reward, method="none", **common)
    guided = generate(PROMPTS, denoiser=denoisers["mlm"], reward=similarity_reward, method="entrgi",
                      guidance_steps=3, lr=1.0, **common)  # fmt: skip
    mean = lambda rs: sum(r.avg_reward for r in rs) / len(rs)  # noqa: E731
    assert mean(guided) > mean(unguided) + 0.02


def test_eos_is_deprioritised_and_cuts_the_response(denoisers, classifier_reward, monkeypatch):
    denoiser = denoisers["mlm"]
    end = denoiser.end_token_ids[0]
    monkeypatch.setattr(denoiser, "end_token_ids", [2003, end])  # every declared end token counts, not the first
    original = denoiser.model.forward

    def eos_loving_forward(*args, **kwargs):
        out = original(*args, **kwargs)
        out.logits[:, -2:, end] += 50.0  # the last two response slots are near-certain EOS
        return out

    denoiser.model.forward = eos_loving_forward
    try:
        for deprioritize, expect_eos in [(True, False), (False, True)]:
            config = GuidanceConfig(method="none", steps=2, max_new_tokens=4, num_samples=1, temperature=0.0,
                                    alg="maskgit_plus", deprioritize_eos=deprioritize)  # fmt: skip
            run = _run(denoiser, classifier_reward, config, prompts=["hi"])
            run.step(0)  # commits int(4 * (1 - 0.5005)) = 1 position
            committed = run.response != denoiser.mask_token_id
            assert committed.sum() == 1
            assert bool((run.response[committed] == end).all()) == expect_eos
    finally:
        denoiser.model.forward = original
    assert denoiser.decode([2000, 2001, end, 2002]) == denoiser.decode([2000, 2001])


@pytest.mark.parametrize("method", ["none", "entrgi"])
@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_non_finite_logits_raise_after_the_last_step(denoisers, classifier_reward, monkeypatch, method, bad):
    denoiser = denoisers["mlm"]
    original = denoiser.model.forward

    def broken_forward(*args, **kwargs):
        out = original(*args, **kwargs)
        out.logits[0, -1, 7] = bad  # one logit of one response position
        return out

    monkeypatch.setattr(denoiser.model, "forward", broken_forward)
    with pytest.raises(ValueError, match=r"non-finite \(NaN or \+inf\) logits appeared during denoising"):
        generate(["hi"], denoiser=denoiser, reward=classifier_reward, method=method, **SMALL)


def test_vocab_mapping_reports_coverage(denoisers, classifier_reward):
    table = GuidanceTable.between(denoisers["mlm"], classifier_reward)
    assert table.mapping.mapped == len(denoisers["mlm"].tokenizer)
    reward_table = classifier_reward.input_embeddings()
    assert table.weight.data_ptr() == reward_table.data_ptr(), "the reward's own matrix, not a copy"
    rows = torch.arange(len(reward_table)) if table.rows is None else table.rows.long()
    assert torch.equal(rows, table.mapping.ids)
    assert "100.00%" in table.mapping.report()


def test_a_sparse_vocab_mapping_warns(denoisers, classifier_reward, monkeypatch):
    vocab = classifier_reward.tokenizer.get_vocab()
    kept = dict(sorted(vocab.items(), key=lambda item: item[1])[: len(vocab) // 2])  # half the strings
    monkeypatch.setattr(classifier_reward.tokenizer, "get_vocab", lambda: kept)
    sparse = r"vocabulary mapping: [\d,]+ of [\d,]+ denoiser ids \(50\.00%\) found .*, which the reward sees in"
    with pytest.warns(UserWarning, match=sparse + " their place: check that the two tokenizers spell tokens alike"):
        table = GuidanceTable.between(denoisers["mlm"], classifier_reward)  # what generate builds first
    assert table.mapping.mapped == len(kept)


def test_guidance_table_refuses_rows_outside_the_reward_table():
    weight = torch.randn(20, 4)
    rows = torch.randint(0, 20, (30,), dtype=torch.int32)
    assert GuidanceTable(weight, rows).mapping is None
    rows[0], rows[7] = 0, 20
    with pytest.raises(ValueError, match=r"table_rows values must lie in \[0, 20\), got \[0, 20\]"):
        GuidanceTable(weight, rows)


def test_guidance_reads_a_table_in_another_vocabulary_through_its_rows(denoisers, classifier_reward):
    """A reward whose vocabulary orders tokens differently: its matrix read through
    ``rows`` steers exactly as the same embeddings in the denoiser's order."""
    config = GuidanceConfig(steps=3, max_new_tokens=5, num_samples=2, guidance_steps=2)
    direct = _run(denoisers["dream"], classifier_reward, config)
    shuffled = _run(denoisers["dream"], classifier_reward, config)
    table = shuffled.table
    assert table.rows is None  # the tiny models share one vocabulary
    order = torch.randperm(len(table.weight), generator=torch.Generator().manual_seed(0))
    table.weight, table.rows = table.weight[order], torch.argsort(order).to(torch.int32)
    for step in range(config.steps):
        direct.step(step)
        shuffled.step(step)
    assert torch.equal(shuffled.response, direct.response)


def test_recomputed_adam_moments_steer_as_stored_ones(monkeypatch):
    """``adam_moments="recompute"`` on the Triton backend (the interpreter here; the step
    benchmark's tiny random models, V = 1024): the optimiser stores no moments and
    replays from the denoiser's own logits, and the run commits the tokens that float32
    moments give, step for step."""
    import entrgi.guidance
    from entrgi.step_benchmark import StepOptions, build_models, new_run, step_config

    denoiser, reward = build_models("tiny", torch.device("cpu"), torch.float32)
    runs = {}
    for moments in ("float32", "recompute"):
        config = step_config("tiny", "entrgi", StepOptions(guidance_steps=2, new_tokens=3, adam_moments=moments))
        runs[moments] = new_run(denoiser, reward, config.replace(backend="triton"), seed=3)
    made = []
    original = entrgi.guidance.LogitAdam

    def spy(*args, **kwargs):
        made.append(original(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(entrgi.guidance, "LogitAdam", spy)
    for step in range(2):
        for run in runs.values():
            run.step(step)
        stored, replayed = made[-2:]
        assert torch.equal(replayed.param, stored.param)  # the steered logits, bit for bit
        assert torch.equal(runs["recompute"].response, runs["float32"].response)
    assert stored.exp_avg is not None and replayed.exp_avg is None and replayed.exp_avg_sq is None
    assert replayed.fused and replayed.step_count == 2


def test_bfloat16_adam_moments_steer_like_float32(denoisers, similarity_reward, monkeypatch):
    """``adam_moments="bfloat16"`` reaches the guidance loop and steers about as float32
    moments do (same seed, same start: close steered logits)."""
    import entrgi.sampler

    config = GuidanceConfig(steps=2, max_new_tokens=5, num_samples=2, guidance_steps=3, lr=0.5)
    original, steered = entrgi.sampler.optimize_logits, {}
    for dtype in ("float32", "bfloat16"):
        run = _run(denoisers["mlm"], similarity_reward, config.replace(adam_moments=dtype))
        assert run.guidance.adam_moments == dtype

        def spy(phi, *args, dtype=dtype, **kwargs):
            before = phi.clone()
            original(phi, *args, **kwargs)
            steered[dtype] = (before, phi.clone())

        monkeypatch.setattr(entrgi.sampler, "optimize_logits", spy)
        run.step(0)
    (start32, end32), (start16, end16) = steered["float32"], steered["bfloat16"]
    assert torch.equal(start32, start16) and not torch.equal(end32, start32)
    torch.testing.assert_close(end16, end32, atol=0.05, rtol=0)
    assert not torch.equal(end16, end32)


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))],
)
def test_unguided_steps_sample_the_denoisers_own_dtype(denoiser_paths, monkeypatch, device):
    denoiser = load_denoiser(denoiser_paths["dream"], kind="dream", device=device, dtype=torch.bfloat16)
    seen, sample_step = [], sampler.sample_step
    monkeypatch.setattr(sampler, "sample_step", lambda phi, **kw: seen.append(phi.dtype) or sample_step(phi, **kw))
    run = functools.partial(generate, PROMPTS, denoiser=denoiser, method="none", seed=2, cuda_graphs=False, **SMALL)
    plain = run()
    assert set(seen) == {torch.bfloat16}  # no float32 copy of the logits
    seen.clear()
    upcast = run(logits_hook=lambda step, canvas, logits: logits)  # a hook is handed float32 logits
    assert set(seen) == {torch.float32}
    assert [r.response_ids for r in upcast] == [r.response_ids for r in plain]


def test_step_has_no_host_sync(denoisers, classifier_reward, monkeypatch):
    config = GuidanceConfig(steps=3, max_new_tokens=4, num_samples=2, guidance_steps=2, alg_temp=0.5)
    run = _run(denoisers["dream"], classifier_reward, config)

    def forbidden(*_args, **_kwargs):
        raise AssertionError("host sync inside the denoising step")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for step in range(config.steps):
        run.step(step)
    monkeypatch.undo()
    assert (run.response != denoisers["dream"].mask_token_id).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_step_has_no_cuda_sync(denoiser_paths, classifier_path):
    from entrgi import load_reward

    denoiser = load_denoiser(denoiser_paths["dream"], kind="dream", device="cuda")
    reward = load_reward(classifier_path, device="cuda")
    config = GuidanceConfig(steps=3, max_new_tokens=4, num_samples=2, guidance_steps=2)
    encoded = denoiser.encode_prompts(PROMPTS)
    run = DiffusionRun(denoiser, encoded, config, torch.Generator("cuda").manual_seed(0),
                       GuidanceTable.between(denoiser, reward), reward, reward.prepare(PROMPTS, 2))  # fmt: skip
    run.step(0)  # warm-up (lazy inits)
    torch.cuda.set_sync_debug_mode("error")
    try:
        run.step(1)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["entrgi", "expectation", "none"])
def test_cuda_graph_replay_matches_eager(denoiser_paths, classifier_path, method):
    from entrgi import load_reward

    denoiser = load_denoiser(denoiser_paths["dream"], kind="dream", device="cuda")
    reward = load_reward(classifier_path, device="cuda")
    replays = graphed_runs_match_eager(PROMPTS, denoiser, reward, calls=2, method=method, steps=7, max_new_tokens=8,
                                       num_samples=2, guidance_steps=2, guide_every=2, alg_temp=0.3, seed=5,
                                       output_history=True)  # fmt: skip
    # guided steps 0, 2, 4, 6 and unguided 1, 3, 5: each kind runs eagerly once, then replays
    # ("none": one kind, warmed at step 0); the second call reuses the cached run: all 7 replay
    assert replays == [5 if method != "none" else 6, 7]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_hooked_run_on_cuda_denoises_eagerly(denoiser_paths, classifier_path):
    from entrgi import load_reward

    denoiser = load_denoiser(denoiser_paths["dream"], kind="dream", device="cuda")
    reward = load_reward(classifier_path, device="cuda")
    halved = lambda step, canvas, logits: logits * 0.5  # noqa: E731
    replays = graphed_runs_match_eager(PROMPTS, denoiser, reward, steps=4, max_new_tokens=6, num_samples=2,
                                       guidance_steps=2, logits_hook=halved)  # fmt: skip
    assert replays == [0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_with_recomputed_adam_moments(denoiser_paths, classifier_path):
    """The replayed Adam's per-step history and step scalars live in the captured graph."""
    from entrgi import load_reward

    denoiser = load_denoiser(denoiser_paths["dream"], kind="dream", device="cuda", dtype=torch.bfloat16)
    reward = load_reward(classifier_path, device="cuda", dtype=torch.bfloat16)
    graphed_runs_match_eager(PROMPTS, denoiser, reward, calls=2, steps=4, max_new_tokens=8, num_samples=2,
                             guidance_steps=3, adam_moments="recompute", seed=6)  # fmt: skip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_capture_again_after_every_graph_is_freed(denoiser_paths, classifier_path):
    """The shared graph pool outlives its graphs: with the run cache cleared (every graph
    freed), a new run captures into it again."""
    from entrgi import load_reward

    denoiser = load_denoiser(denoiser_paths["dream"], kind="dream", device="cuda")
    reward = load_reward(classifier_path, device="cuda")
    common = dict(steps=3, max_new_tokens=4, num_samples=2, guidance_steps=2, seed=3)
    first = generate(PROMPTS, denoiser=denoiser, reward=reward, progress=False, **common)
    denoiser.run_cache.clear()
    gc.collect()
    again = generate(PROMPTS, denoiser=denoiser, reward=reward, progress=False, **common)
    assert [r.response_ids for r in again] == [r.response_ids for r in first]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cache_prefix", [False, True])
def test_cuda_graphs_with_the_likelihood_reward_and_a_cached_prefix(denoiser_paths, likelihood_path, classifier_path,
                                                                      cache_prefix):  # fmt: skip
    from entrgi import load_reward

    denoiser = load_denoiser(denoiser_paths["dream"], kind="dream", device="cuda")
    for reward in (load_reward(likelihood_path, kind="likelihood", device="cuda", cache_prefix=cache_prefix),
                   load_reward(classifier_path, device="cuda", cache_prefix=cache_prefix)):  # fmt: skip
        replays = graphed_runs_match_eager(PROMPTS, denoiser, reward, steps=4, max_new_tokens=6, num_samples=2,
                                           guidance_steps=2, seed=3)  # fmt: skip
        assert replays == [3]  # step 0 runs eagerly and captures, steps 1-3 replay


def test_a_failed_capture_names_the_step_and_the_way_out(denoisers, classifier_reward, monkeypatch):
    class FakeGraph:  # stands in for torch.cuda.CUDAGraph on a machine without CUDA
        def register_generator_state(self, generator):
            pass

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, pool: contextlib.nullcontext())
    monkeypatch.setattr(sampler, "_graph_pool", lambda device: None)
    run = _run(denoisers["dream"], classifier_reward, GuidanceConfig(steps=3, max_new_tokens=4, num_samples=2))
    run._warmed.add(True)  # as after the eager warm-up step

    def syncing_step(guided, step):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    monkeypatch.setattr(run, "_step", syncing_step)
    with pytest.raises(RuntimeError, match="capturing the guided denoising step .* pass cuda_graphs=False") as caught:
        run.graphed_step(0)
    assert "not permitted when stream is capturing" in str(caught.value.__cause__)


def test_cuda_graphs_need_capturable_attention(denoisers, classifier_path, monkeypatch):
    from entrgi import load_reward
    from entrgi.sampler import use_cuda_graphs

    # as on a CUDA device: cuda_graphs 'auto' or True asks for graphs
    monkeypatch.setattr(GuidanceConfig, "use_cuda_graphs", lambda config, device: config.cuda_graphs in ("auto", True))
    reward = load_reward(classifier_path, kind="classifier")
    reward.model.config._attn_implementation = "flash_attention_2"
    guided = GuidanceConfig(method="entrgi", cuda_graphs=True)
    with pytest.raises(ValueError, match=r"reward \(Qwen3ForSequenceClassification\) uses 'flash_attention_2'"):
        use_cuda_graphs(guided, denoisers["dream"], reward)
    with pytest.raises(ValueError, match="flash_attention_2"):  # before any work
        generate(PROMPTS, denoiser=denoisers["dream"], reward=reward, cuda_graphs=True, **SMALL)
    with pytest.warns(UserWarning, match="without CUDA graphs"):
        assert not use_cuda_graphs(guided.replace(cuda_graphs="auto"), denoisers["dream"], reward)
    assert use_cuda_graphs(guided.replace(method="none"), denoisers["dream"], reward)  # no reward in the step
    reward.model.config._attn_implementation = "sdpa"
    assert use_cuda_graphs(guided, denoisers["dream"], reward)
    for kind in ("dream", "llada"):
        monkeypatch.setattr(denoisers[kind].model.config, "_attn_implementation", "flash_attention_2")
    with pytest.raises(ValueError, match=r"denoiser \(\w+\) uses 'flash_attention_2'"):
        use_cuda_graphs(guided, denoisers["dream"], reward)
    # LLaDA's own attention code builds its bias from the mask on the device
    assert use_cuda_graphs(guided, denoisers["llada"], reward)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(num_samples=0), ValueError, "num_samples must be an int >= 1, got 0"),
        (dict(steps=0), ValueError, "steps must be an int >= 1, got 0"),
        (dict(method="greedy"), ValueError, "unknown method 'greedy'"),
        (dict(alg="best"), ValueError, "unknown alg 'best'"),
        (dict(temperature=-1.0), ValueError, r"temperature must be 0 \(greedy\) or finite and >= 2.94e-39"),
        (dict(temperature=math.inf), ValueError, r"temperature must be 0 \(greedy\) or finite .* got inf"),
        (dict(temperature="0.7"), TypeError, "temperature must be a Python number, got str"),
        (dict(top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
        (dict(top_k=-2), ValueError, "top_k must be an int >= 0"),
        (dict(max_new_tokens=500), ValueError, r"exceeds the denoiser's context of 128 positions"),
        (dict(lr=0.0), ValueError, "lr must be a finite number > 0, got 0.0"),
        (dict(lr=math.nan), ValueError, "lr must be a finite number > 0, got nan"),
        (dict(reward_temperature=math.inf), ValueError, "reward_temperature must be a finite number > 0, got inf"),
        (dict(alg_temp="1"), ValueError, "alg_temp must be a finite number >= 0, got '1'"),
        (dict(eps=1.0), ValueError, r"eps must be in \(0, 1\), got 1.0"),
        (dict(bogus=1), ValueError, r"unknown GuidanceConfig fields: \['bogus'\]"),
        (dict(cuda_graphs="yes"), ValueError, "cuda_graphs must be 'auto', True or False, got 'yes'"),
        (dict(cuda_graphs=True), ValueError, "cuda_graphs=True needs a CUDA denoiser, got device cpu"),
        (dict(adam_moments="float16"), ValueError, "unknown adam_moments 'float16'"),
        (dict(seed="7"), ValueError, "seed must be an int, got '7'"),
    ],
)
def test_bad_generate_arguments_raise(denoisers, classifier_reward, kwargs, error, match):
    with pytest.raises(error, match=match):
        generate(PROMPTS, denoiser=denoisers["mlm"], reward=classifier_reward, progress=False, **kwargs)


def test_bad_generate_inputs_raise(denoisers, classifier_reward):
    with pytest.raises(ValueError, match="prompts is empty"):
        generate([], denoiser=denoisers["mlm"], reward=classifier_reward)
    with pytest.raises(TypeError, match=r"prompts\[1\] must be a str, got int"):
        generate(["a", 3], denoiser=denoisers["mlm"], reward=classifier_reward)
    with pytest.raises(ValueError, match="method 'entrgi' needs a reward"):
        generate(["a"], denoiser=denoisers["mlm"])
    with pytest.raises(TypeError, match="denoiser must be an entrgi.Denoiser"):
        generate(["a"], denoiser=object(), reward=classifier_reward)
    unscored = generate(["a"], denoiser=denoisers["mlm"], method="none", **SMALL)
    assert unscored[0].rewards is None and unscored[0].top1_reward is None


def test_a_reward_whose_text_scores_are_not_one_per_response_is_named(denoisers, classifier_reward, monkeypatch):
    score_texts = type(classifier_reward).score_texts
    monkeypatch.setattr(classifier_reward, "score_texts", lambda *args: score_texts(classifier_reward, *args)[:-1])
    with pytest.raises(ValueError, match=r"score_texts must return rewards of shape \(N,\) = \(4,\), got \(3,\)"):
        generate(["a", "b"], denoiser=denoisers["mlm"], reward=classifier_reward, method="bon", **SMALL)


@pytest.mark.parametrize(
    "scores,match",
    [
        (lambda rewards: rewards.detach(), "score_embeds returned rewards with no gradient to response_embeds"),
        (lambda rewards: rewards[:, None], r"score_embeds must return rewards of shape \(N,\) = \(4,\), got \(4, 1\)"),
        (lambda rewards: rewards.tolist(), r"score_embeds must return rewards of shape \(N,\) = \(4,\), got list"),
    ],
)  # fmt: skip
def test_a_reward_that_guidance_cannot_use_is_named(denoisers, classifier_reward, monkeypatch, scores, match):
    score_embeds = type(classifier_reward).score_embeds
    monkeypatch.setattr(classifier_reward, "score_embeds", lambda *args: scores(score_embeds(classifier_reward, *args)))
    with pytest.raises(ValueError, match=match):
        generate(["a", "b"], denoiser=denoisers["mlm"], reward=classifier_reward, **SMALL)
