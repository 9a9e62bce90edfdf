"""Lean activations (``entrgi.lean``): a reward's RMSNorms and gated MLPs keep less for
the guidance backward, with the same rewards and gradients; a module whose forward the
lean one does not reproduce is left as it is."""

from __future__ import annotations

import pytest
import torch

from entrgi import load_reward
from entrgi.lean import lean_forwards
from helpers import assert_same_rewards, guided_reward_inputs, reward_scores_and_grads, saved_activation_bytes

PROMPTS = ["hi", "tell me a long story about the sea and the wind"]


@pytest.mark.parametrize("cache_prefix", [False, True])
def test_lean_classifier_gives_identical_bfloat16_rewards_and_gradients(classifier_path, cache_prefix):
    plain = load_reward(classifier_path, dtype=torch.bfloat16, cache_prefix=cache_prefix, lean_activations=False)
    lean = load_reward(classifier_path, dtype=torch.bfloat16, cache_prefix=cache_prefix)
    # two layers of (input norm, q norm, k norm, post-attention norm, MLP) and the final norm
    assert len(lean.guidance_layers.lean) == 11 and not plain.guidance_layers.lean
    context = plain.prepare(PROMPTS, 3)
    embeds, valid = guided_reward_inputs(plain, 6, 7, seed=3)
    want, want_grad = reward_scores_and_grads(plain, context, embeds, valid)
    got, got_grad = reward_scores_and_grads(lean, context, embeds, valid)
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)
    assert want_grad.abs().sum() > 0


def test_lean_likelihood_reward_matches_in_float32(likelihood_path):
    plain = load_reward(likelihood_path, kind="likelihood", lean_activations=False)
    lean = load_reward(likelihood_path, kind="likelihood")
    context = plain.prepare(PROMPTS, 2)
    embeds, valid = guided_reward_inputs(plain, 4, 5, seed=4)
    # float32 norms need no cast, so autograd adds the residual branch's gradient in
    # another order: the same up to rounding, not bit for bit
    assert_same_rewards((plain, context), (lean, context), embeds, valid, tol=1e-5)


def test_lean_classifier_keeps_less_for_the_backward(classifier_path):
    plain = load_reward(classifier_path, dtype=torch.bfloat16, lean_activations=False)
    lean = load_reward(classifier_path, dtype=torch.bfloat16)
    context = plain.prepare(PROMPTS, 3)
    embeds, valid = guided_reward_inputs(plain, 6, 7, seed=5)
    kept = [saved_activation_bytes(reward, context, embeds, valid) for reward in (lean, plain)]
    assert kept[0] < 0.8 * kept[1]


def test_modules_the_lean_forward_does_not_reproduce_are_left_alone():
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP, Qwen3RMSNorm

    class OnePlusWeightNorm(Qwen3RMSNorm):  # Gemma's scale: (1 + weight)
        def forward(self, hidden_states):
            return super().forward(hidden_states) + self.weight * hidden_states

    gelu_mlp = Qwen3MLP(Qwen3Config(hidden_size=8, intermediate_size=16, hidden_act="gelu"))
    silu_mlp = Qwen3MLP(Qwen3Config(hidden_size=8, intermediate_size=16))
    odd_norm, norm = OnePlusWeightNorm(8), Qwen3RMSNorm(8)
    for module in (odd_norm, norm):
        torch.nn.init.normal_(module.weight)
    hooked_norm = Qwen3RMSNorm(8)
    hooked_norm.forward = hooked_norm.forward  # as an offloading hook installs its own
    model = torch.nn.ModuleList([odd_norm, gelu_mlp, norm, silu_mlp, hooked_norm]).requires_grad_(False)
    trained_norm = Qwen3RMSNorm(8)  # its weight needs a gradient
    model.append(trained_norm)
    assert [module for module, _ in lean_forwards(model)] == [norm, silu_mlp]


@pytest.mark.parametrize("family", ["Llama", "Qwen2", "Mistral"])
def test_other_reward_families_get_lean_layers_with_identical_gradients(family):
    import transformers

    config = getattr(transformers, f"{family}Config")(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_labels=1, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}ForSequenceClassification")(config).to(torch.bfloat16)
    model.eval().requires_grad_(False)
    found = lean_forwards(model)
    assert len(found) == 2 * 3 + 1  # per layer two norms and the MLP, and the final norm
    embeds = torch.randn(3, 6, 32, dtype=torch.bfloat16, requires_grad=True)

    def score_and_grad():
        score = model(inputs_embeds=embeds).logits.sum()
        return score, torch.autograd.grad(score, embeds)[0]

    want, want_grad = score_and_grad()
    for module, forward in found:
        module.forward = forward
    got, got_grad = score_and_grad()
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)
