"""Layer checkpointing and compilation (``entrgi.layers``): same rewards, gradients and
tokens; checkpointing keeps fewer activations; compiled layers share one graph."""

from __future__ import annotations

import pytest
import torch

from entrgi import generate, load_denoiser, load_reward
from entrgi.layers import LayerRunner, model_layers
from helpers import CAN_COMPILE, assert_same_rewards, guided_reward_inputs, saved_activation_bytes

PROMPTS = ["hi", "tell me a long story about the sea and the wind"]
STOCK = {"lean_activations": False}  # the stock layers the options are compared with (float32, tight tolerances)
needs_compiler = pytest.mark.skipif(not CAN_COMPILE, reason="inductor needs a C++ compiler on CPU")


@pytest.fixture
def compiled_graphs():
    """A function returning how many graphs dynamo compiled since the test began."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    start = counters["stats"]["unique_graphs"]
    yield lambda: counters["stats"]["unique_graphs"] - start
    torch._dynamo.reset()


@pytest.mark.parametrize("cache_prefix", [False, True])
def test_checkpointed_classifier_matches_and_saves_less(classifier_path, cache_prefix):
    plain = load_reward(classifier_path, cache_prefix=cache_prefix, **STOCK)
    checkpointed = load_reward(classifier_path, cache_prefix=cache_prefix, checkpoint_layers=True)
    context = plain.prepare(PROMPTS, 3)
    embeds, valid = guided_reward_inputs(plain, 6, 7, seed=3)
    assert_same_rewards((plain, context), (checkpointed, context), embeds, valid, tol=1e-6)
    kept = [saved_activation_bytes(reward, context, embeds, valid) for reward in (checkpointed, plain)]
    assert kept[0] < 0.6 * kept[1]


def test_checkpointed_likelihood_and_similarity_match(likelihood_path, minilm_path):
    for path, kind, options in ((likelihood_path, "likelihood", {}), (minilm_path, "similarity", {"target": "sea"})):
        plain = load_reward(path, kind=kind, **STOCK, **options)
        checkpointed = load_reward(path, kind=kind, checkpoint_layers=True, **options)
        context = plain.prepare(PROMPTS, 2)
        embeds, valid = guided_reward_inputs(plain, 4, 5, seed=4)
        assert_same_rewards((plain, context), (checkpointed, context), embeds, valid, tol=1e-6)


@pytest.mark.parametrize("options", [{"checkpoint_layers": True}, {}])
def test_modules_get_their_own_forward_back(classifier_path, options):
    reward = load_reward(classifier_path, **options)
    layers = reward.model.base_model.layers
    context = reward.prepare(PROMPTS, 1)
    embeds, valid = guided_reward_inputs(reward, 2, 4, seed=5)
    lean_modules = [module for module, _ in reward.guidance_layers.lean]
    assert bool(lean_modules) != bool(options)  # lean unless checkpointed
    reward.score_embeds(context, embeds, valid)
    assert all("forward" not in module.__dict__ for module in [*layers, *lean_modules])
    with pytest.raises(ValueError, match="boom"):
        reward.score_packed = lambda packed: (_ for _ in ()).throw(ValueError("boom"))
        reward.score_embeds(context, embeds, valid)
    assert all("forward" not in module.__dict__ for module in [*layers, *lean_modules])


def test_layer_options_need_a_layer_stack(chat_tokenizer):
    from entrgi.rewards import ClassifierReward

    class Plain(torch.nn.Module):
        config = type("Config", (), {"num_labels": 1, "pad_token_id": 0})()

    for option in ("checkpoint_layers", "compile_layers"):
        with pytest.raises(ValueError, match="Plain has no nn.ModuleList of layers"):
            ClassifierReward(Plain(), chat_tokenizer, **{option: True})
    assert LayerRunner(Plain()).layers == []  # neither option: nothing to find


def test_model_layers_finds_the_decoder_stack(classifier_reward, similarity_reward):
    assert model_layers(classifier_reward.model) == list(classifier_reward.model.base_model.layers)
    assert model_layers(similarity_reward.model) == list(similarity_reward.model.encoder.layer)
    model = torch.nn.Module()
    model.heads = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])  # a stack, but a small one
    model.layers = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(2)])
    model.mixed = torch.nn.ModuleList([torch.nn.Linear(32, 32), torch.nn.LayerNorm(32)])  # the most, of two classes
    assert model_layers(model) == list(model.layers)


@needs_compiler
@pytest.mark.parametrize("cache_prefix, checkpoint", [(False, False), (True, True)])
def test_compiled_classifier_matches_with_one_graph_for_all_layers(
    classifier_path, compiled_graphs, cache_prefix, checkpoint
):
    plain = load_reward(classifier_path, cache_prefix=cache_prefix, **STOCK)
    compiled = load_reward(classifier_path, cache_prefix=cache_prefix, checkpoint_layers=checkpoint,
                           compile_layers=True)  # fmt: skip
    context = plain.prepare(PROMPTS, 3)
    embeds, valid = guided_reward_inputs(plain, 6, 7, seed=8)
    assert_same_rewards((plain, context), (compiled, context), embeds, valid, tol=1e-5)
    # every layer (two here) runs the same graph: the cached prefix reaches each as its own view
    assert compiled_graphs() == 1
    if checkpoint:
        uncheckpointed = load_reward(classifier_path, cache_prefix=cache_prefix, compile_layers=True)
        kept = [saved_activation_bytes(reward, context, embeds, valid) for reward in (compiled, uncheckpointed)]
        assert kept[0] < 0.6 * kept[1]


@needs_compiler
def test_compiled_similarity_reward_matches(minilm_path, compiled_graphs):
    plain = load_reward(minilm_path, kind="similarity", target="sea")
    compiled = load_reward(minilm_path, kind="similarity", target="sea", compile_layers=True)
    context = plain.prepare(PROMPTS, 2)
    embeds, valid = guided_reward_inputs(plain, 4, 5, seed=9)
    assert_same_rewards((plain, context), (compiled, context), embeds, valid, tol=1e-5)
    assert compiled_graphs() == 1


@needs_compiler
def test_generate_with_compiled_layers_gives_the_same_tokens(denoiser_paths, classifier_path, compiled_graphs):
    common = dict(steps=4, max_new_tokens=6, num_samples=2, guidance_steps=2, seed=10, progress=False)
    plain = generate(PROMPTS, denoiser=load_denoiser(denoiser_paths["dream"], kind="dream"), reward=load_reward(classifier_path),
                     **common)  # fmt: skip
    denoiser = load_denoiser(denoiser_paths["dream"], kind="dream", compile_layers=True)
    reward = load_reward(classifier_path, compile_layers=True, cache_prefix=True)
    compiled = generate(PROMPTS, denoiser=denoiser, reward=reward, **common)
    assert [r.response_ids for r in compiled] == [r.response_ids for r in plain]
    assert compiled_graphs() == 2  # the denoiser's layer and the reward's, each reused every step
    assert "forward" not in denoiser.model.model.layers[0].__dict__  # restored after each call


def test_generate_with_checkpointed_reward_gives_the_same_tokens(denoiser_paths, classifier_path):
    denoiser = load_denoiser(denoiser_paths["dream"], kind="dream")
    common = dict(steps=4, max_new_tokens=6, num_samples=2, guidance_steps=2, seed=6, progress=False)
    plain = generate(PROMPTS, denoiser=denoiser, reward=load_reward(classifier_path), **common)
    reward = load_reward(classifier_path, checkpoint_layers=True, cache_prefix=True)
    checkpointed = generate(PROMPTS, denoiser=denoiser, reward=reward, **common)
    assert [r.response_ids for r in checkpointed] == [r.response_ids for r in plain]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "options",
    [
        {"cache_prefix": True},
        {"checkpoint_layers": True},
        {"cache_prefix": True, "checkpoint_layers": True},
        {"compile_layers": True},
        {"cache_prefix": True, "checkpoint_layers": True, "compile_layers": True},
    ],
)
def test_graph_replay_with_reward_layer_options_matches_eager(denoiser_paths, classifier_path, options):
    compile_layers = options.get("compile_layers", False)
    denoiser = load_denoiser(denoiser_paths["dream"], kind="dream", device="cuda", compile_layers=compile_layers)
    reward = load_reward(classifier_path, device="cuda", **options)
    common = dict(steps=6, max_new_tokens=8, num_samples=2, guidance_steps=2, seed=7, progress=False)
    eager = generate(PROMPTS, denoiser=denoiser, reward=reward, cuda_graphs=False, **common)
    graphed = generate(PROMPTS, denoiser=denoiser, reward=reward, cuda_graphs=True, **common)
    assert [r.response_ids for r in graphed] == [r.response_ids for r in eager]
