"""Lean activations (``entrgi.lean``): a reward's RMSNorms and gated MLPs keep less for
the guidance backward, with the same rewards and gradients; a module whose forward the
lean one does not reproduce is left as it is."""

from __future__ import annotations

import contextlib
from typing import Iterator

import pytest
import torch

from entrgi import load_reward
import entrgi.lean
import entrgi.normed_attention
import entrgi.sdpa
from entrgi.layers import swapped_attributes
from entrgi.lean import (
    QKV, ROTARY, StackedLinear, fused_rotary, _projections_reproduce, _stacked_attention, kept_bytes, lean_forwards,
    rotary_swaps,
)  # fmt: skip
from entrgi.ops.layer_ops import add_rms_norm_writable, merged_silu_gate, rotary_embedding
from entrgi.swap_checks import Agreement, random_rotary
from helpers import (
    SWAPS_MUST_REPRODUCE, assert_same_rewards, guided_reward_inputs, reward_scores_and_grads, saved_activation_bytes,
)  # fmt: skip

pytestmark = SWAPS_MUST_REPRODUCE
PROMPTS = ["hi", "tell me a long story about the sea and the wind"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the triton backend: native, or the interpreter


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


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_modules_the_lean_forward_does_not_reproduce_are_left_alone(backend):
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
    model.to(DEVICE if backend == "triton" else "cpu")
    # the Gemma-style norm is off by its input, far more than FUSED_ULPS; the gelu MLP too
    with pytest.warns(
        UserWarning, match=r"of 1 x OnePlusWeightNorm \(\S+ eps apart\), 1 x Qwen3MLP \(\S+ eps apart\) on"
    ):
        assert [module for module, _ in lean_forwards(model, backend)] == [norm, silu_mlp]


def test_a_lean_forward_that_raises_leaves_its_module_stock_with_a_warning(monkeypatch):
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP

    mlp = Qwen3MLP(Qwen3Config(hidden_size=8, intermediate_size=16)).requires_grad_(False)

    def broken(*args):
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(entrgi.lean, "silu_gate", broken)
    with pytest.warns(UserWarning, match=r"of 1 x Qwen3MLP \(raised RuntimeError: kernel failed\) on a random"):
        assert lean_forwards(torch.nn.ModuleList([mlp]), backend="torch") == []


def test_decoder_layers_the_lean_forward_does_not_reproduce_are_left_alone():
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer

    class HalfBranchLayer(Qwen3DecoderLayer):  # its residual branches scaled: not x + attn(norm(x))
        def forward(self, hidden_states, **kwargs):
            return hidden_states + 0.5 * (super().forward(hidden_states, **kwargs) - hidden_states)

    class FlaggedLayer(Qwen3DecoderLayer):  # needs an argument the check does not give: left alone, no warning
        def forward(self, hidden_states, flag, **kwargs):
            return super().forward(hidden_states, **kwargs)

    config = Qwen3Config(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=16, attn_implementation="sdpa")  # fmt: skip
    torch.manual_seed(0)
    layers = torch.nn.ModuleList([HalfBranchLayer(config, 0), Qwen3DecoderLayer(config, 1), FlaggedLayer(config, 2)])
    layers.to(DEVICE).requires_grad_(False)
    for norm in (module for module in layers.modules() if hasattr(module, "variance_epsilon")):
        torch.nn.init.normal_(norm.weight)
    with pytest.warns(UserWarning, match=r"of 1 x HalfBranchLayer \(\S+ eps apart\) on a random input") as warned:
        found = [module for module, _ in lean_forwards(layers, backend="triton")]
    assert len(warned) == 1
    assert layers[1] in found and layers[0] not in found and layers[2] not in found
    assert not any(module in layers for module, _ in lean_forwards(layers, backend="torch"))


def _family_classifier(family: str, device: str = "cpu") -> torch.nn.Module:
    import transformers

    config = getattr(transformers, f"{family}Config")(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_labels=1, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}ForSequenceClassification")(config).to(device, torch.bfloat16)
    return model.eval().requires_grad_(False)


def _score_and_grad(model, embeds, swaps=()):
    for module, forward in swaps:
        module.forward = forward
    score = model(inputs_embeds=embeds).logits.sum()
    return score, torch.autograd.grad(score, embeds)[0]


@pytest.mark.parametrize("family", ["Llama", "Qwen2", "Mistral"])
def test_other_reward_families_get_lean_layers_with_identical_gradients(family):
    model = _family_classifier(family)
    found = lean_forwards(model)
    assert len(found) == 2 * 3 + 1  # per layer two norms and the MLP, and the final norm
    embeds = torch.randn(3, 6, 32, dtype=torch.bfloat16, requires_grad=True)
    want, want_grad = _score_and_grad(model, embeds)
    got, got_grad = _score_and_grad(model, embeds, found)
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)


@pytest.mark.parametrize("family", ["Qwen3", "Llama"])
def test_fused_lean_layers_give_the_stock_rewards_and_gradients(family, monkeypatch):
    model = _family_classifier(family, DEVICE)
    found = lean_forwards(model, backend="triton")
    # the torch backend's modules, and (triton) each attention's q, k and v projections and
    # each decoder layer (its residual adds inside the norms' kernels)
    layers = list(model.model.layers)
    projections = [module for module, _ in found if isinstance(module, torch.nn.Linear)]
    assert projections == [getattr(layer.self_attn, name) for layer in layers for name in QKV]
    assert [module for module, _ in found if module in layers] == layers
    assert [module for module, _ in found if module not in projections + layers] == [
        module for module, _ in lean_forwards(model, backend="torch")
    ]
    rotary = rotary_swaps(model, backend="triton")
    assert [module.__name__.rsplit(".", 1)[-1] for module, _ in rotary] == [f"modeling_{family.lower()}"]
    assert rotary_swaps(model, backend="torch") == []  # the stock function is the torch backend
    calls, gates, adds = [], [], []
    monkeypatch.setattr(entrgi.lean, "rotary_embedding", lambda *args: calls.append(args) or rotary_embedding(*args))
    monkeypatch.setattr(entrgi.lean, "merged_silu_gate", lambda *args: gates.append(args) or merged_silu_gate(*args))
    monkeypatch.setattr(
        entrgi.lean, "add_rms_norm_writable", lambda *args: adds.append(args) or add_rms_norm_writable(*args)
    )
    add_into, accumulated = entrgi.lean._LeanGatedMlp.add_into, []
    monkeypatch.setattr(
        entrgi.lean._LeanGatedMlp, "add_into", lambda self, x, out: accumulated.append(out) or add_into(self, x, out)
    )
    stacked_call, stacked = StackedLinear.__call__, []
    monkeypatch.setattr(StackedLinear, "__call__", lambda self, x: stacked.append(self) or stacked_call(self, x))
    embeds = torch.randn(3, 6, 32, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    want, want_grad = _score_and_grad(model, embeds)
    with swapped_attributes([(module, ROTARY, fused) for module, fused in rotary]):
        got, got_grad = _score_and_grad(model, embeds, found)
    assert len(calls) == 2  # one per layer: the fused rotary ran
    assert len(gates) == 2  # and the gate and up projections as one GEMM
    assert len(stacked) == 4  # per layer that one and the q, k, v projections
    assert len(adds) == 2  # and the residual add before the second norm inside its kernel
    assert len(accumulated) == 2  # and the last one inside the down projection's GEMM
    # bfloat16 layers whose norms sum in another order: a rounding flip here and there,
    # carried through two layers
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * want.abs().item())
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=1e-2 * want_grad.abs().max().item())
    assert want_grad.abs().max() > 0


def test_stacked_projections_and_rotary_functions_that_do_not_reproduce_stay_stock_with_a_warning(monkeypatch):
    import transformers.models.llama.modeling_llama as modeling

    model = _family_classifier("Llama", DEVICE)
    stock_rotary = getattr(modeling, ROTARY)
    monkeypatch.setattr(entrgi.lean, "_projections_reproduce", lambda projections: Agreement(5.0, 2.0))
    with pytest.warns(UserWarning, match=r"of 2 x LlamaAttention projections \(5 eps apart\) on a random input"):
        found = lean_forwards(model, backend="triton")
    assert not any(isinstance(module, torch.nn.Linear) for module, _ in found)

    def keys_unrotated(q, k, cos, sin, *args, **kwargs):  # a family whose rotary function differs
        return stock_rotary(q, k, cos, sin, *args, **kwargs)[0], k

    monkeypatch.setattr(modeling, ROTARY, keys_unrotated)
    with pytest.warns(UserWarning, match=f"rotary embedding did not reproduce .* of 1 x {modeling.__name__}.{ROTARY}"):
        assert rotary_swaps(model, backend="triton") == []


@contextlib.contextmanager
def _add_into_calls() -> Iterator[list]:
    """The calls of :meth:`_LeanGatedMlp.add_into` (a fused layer's last residual add
    inside its down projection's GEMM) made inside the block."""
    calls, add_into = [], entrgi.lean._LeanGatedMlp.add_into
    with swapped_attributes([(entrgi.lean._LeanGatedMlp, "add_into", lambda *a: calls.append(a) or add_into(*a))]):
        yield calls


@pytest.mark.parametrize("part", ["mlp", "mlp.down_proj"])
@pytest.mark.parametrize("hook", ["register_forward_hook", "register_forward_pre_hook"])
def test_a_hooked_mlp_runs_through_its_module_in_a_fused_layer(part, hook):
    """A fused layer adds its MLP's output inside the down projection's GEMM only while
    the MLP and its down projection run as built: with a hook on either, the layer calls
    the module (the hook sees every call) and adds the result; the same score either way."""
    model = _family_classifier("Qwen3", DEVICE)
    found = lean_forwards(model, backend="triton")
    embeds = torch.randn(3, 6, 32, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    with _add_into_calls() as accumulated:
        want, want_grad = _score_and_grad(model, embeds, found)
        assert len(accumulated) == 2
        seen = []
        handle = getattr(model.model.layers[1].get_submodule(part), hook)(lambda module, *_: seen.append(module))
        got, got_grad = _score_and_grad(model, embeds)
        handle.remove()
    assert len(seen) == 1 and len(accumulated) == 2 + 1  # layer 1 called its module; layer 0 accumulated
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * want.abs().item())
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=1e-2 * want_grad.abs().max().item())


def test_a_down_projection_with_a_bias_adds_its_output_outside_the_gemm():
    """The GEMM that accumulates into the residual sum adds no bias: a fused layer whose
    down projection has one calls its MLP and adds the output (its check passes)."""
    model = _family_classifier("Qwen3", DEVICE)
    mlp = model.model.layers[1].mlp
    down = torch.nn.Linear(64, 32, device=DEVICE, dtype=torch.bfloat16).requires_grad_(False)
    down.weight.copy_(mlp.down_proj.weight)
    torch.nn.init.normal_(down.bias)
    mlp.down_proj = down
    embeds = torch.randn(3, 6, 32, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    want, want_grad = _score_and_grad(model, embeds)
    found = lean_forwards(model, backend="triton")  # a layer that did not reproduce would warn: an error here
    assert model.model.layers[1] in [module for module, _ in found]
    with _add_into_calls() as accumulated:
        got, got_grad = _score_and_grad(model, embeds, found)
    assert len(accumulated) == 1  # layer 0's
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * want.abs().item())
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=1e-2 * want_grad.abs().max().item())


def test_a_fused_layer_called_with_positional_arguments_runs_its_stock_forward():
    model = _family_classifier("Qwen3", DEVICE)
    layer = model.model.layers[0]
    forward = dict(lean_forwards(model, backend="triton"))[layer]
    generator = torch.Generator(DEVICE).manual_seed(0)
    x = torch.randn(2, 3, 32, generator=generator, device=DEVICE).to(torch.bfloat16)
    mask = torch.eye(3, dtype=torch.bool, device=DEVICE).expand(2, 1, 3, 3).clone()
    mask[0, 0, 2, :2] = True  # a mask that no argument-free call reproduces
    rotary = random_rotary(layer.self_attn.head_dim, torch.bfloat16, generator)
    with torch.no_grad():
        assert torch.equal(forward(x, mask, position_embeddings=rotary), layer(x, mask, position_embeddings=rotary))


@pytest.mark.parametrize("part", ["self_attn.k_proj", "mlp"])
def test_modules_whose_forward_a_hook_library_replaced_keep_their_own_weights_and_forward(part):
    """An offloading library (accelerate) installs its own forward on a module and loads
    its weights there: such a projection's attention, and such an MLP, are not stacked
    (their weights stay where they are) and the replaced forward runs on every call."""
    model = _family_classifier("Qwen3", DEVICE)
    hooked = model.model.layers[1].get_submodule(part)
    group_name = part.split(".")[0]  # the attention or the MLP
    group, stacked_group = (model.model.layers[i].get_submodule(group_name) for i in (1, 0))

    def storages(module):
        return [p.data_ptr() for p in module.parameters()]

    calls, own_forward = [], hooked.forward
    hooked.forward = lambda *args, **kwargs: calls.append(args) or own_forward(*args, **kwargs)
    weights, stacked_weights = storages(group), storages(stacked_group)
    found = lean_forwards(model, backend="triton")
    assert storages(group) == weights
    assert storages(stacked_group) != stacked_weights  # layer 0's were stacked
    assert hooked not in [module for module, _ in found]
    calls.clear()  # (the layer's check called it)
    embeds = torch.randn(3, 6, 32, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    want, want_grad = _score_and_grad(model, embeds)
    got, got_grad = _score_and_grad(model, embeds, found)
    assert len(calls) == 2  # the stock run's and the fused one's
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * want.abs().item())
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=1e-2 * want_grad.abs().max().item())


@pytest.mark.parametrize("failing_layer", [0, 1])
def test_one_attention_the_fused_rotary_does_not_reproduce_keeps_its_family_stock(failing_layer, monkeypatch):
    """The swap replaces a modelling module's function for all its attentions: every
    head size and dtype among them must reproduce, whichever is checked first."""
    import transformers.models.llama.modeling_llama as modeling

    model = _family_classifier("Llama", DEVICE)
    model.model.layers[failing_layer].self_attn.head_dim = 8  # (the check reads the head size alone)
    stock_rotary = getattr(modeling, ROTARY)

    def keys_unrotated_at_eight(q, k, cos, sin, *args, **kwargs):
        rotated_q, rotated_k = stock_rotary(q, k, cos, sin, *args, **kwargs)
        return rotated_q, k if q.shape[-1] == 8 else rotated_k

    monkeypatch.setattr(modeling, ROTARY, keys_unrotated_at_eight)
    with pytest.warns(UserWarning, match=f"rotary embedding did not reproduce .* of 1 x {modeling.__name__}.{ROTARY}"):
        assert rotary_swaps(model, backend="triton") == []
    model.model.layers[failing_layer].self_attn.head_dim = 16
    assert [module for module, _ in rotary_swaps(model, backend="triton")] == [modeling]


def test_kept_bytes_counts_what_autograd_keeps_besides_the_models_parameters():
    linear = torch.nn.Linear(8, 4, bias=False)
    x = torch.randn(5, 8, requires_grad=True)
    assert kept_bytes(lambda: linear(x), linear) == x.nbytes  # its weight is the model's
    assert kept_bytes(lambda: linear(x), torch.nn.Linear(1, 1)) == x.nbytes + linear.weight.nbytes


def test_denoiser_fused_layers_give_the_stock_logits(dream_like_path):
    from entrgi import load_denoiser

    fused = load_denoiser(dream_like_path, kind="dream", device=DEVICE, dtype=torch.bfloat16)
    stock = load_denoiser(dream_like_path, kind="dream", device=DEVICE, dtype=torch.bfloat16, fused_layers=False)
    # two layers of (input norm, post-attention norm, MLP) and the final norm; on CUDA also
    # each layer and its q, k and v projections
    modules = [module for module, _ in fused.layers.lean]
    layers = list(fused.model.model.layers)
    assert len([m for m in modules if not isinstance(m, torch.nn.Linear) and m not in layers]) == 7
    assert len(modules) == (7 if DEVICE == "cpu" else 7 + 2 + 2 * 3) and not stock.layers.lean
    ids = torch.randint(0, fused.vocab_size, (3, 9), device=DEVICE)
    mask = torch.ones(3, 9, dtype=torch.bool, device=DEVICE)
    want, got = stock.logits(ids, mask), fused.logits(ids, mask)
    if DEVICE == "cpu":  # off CUDA the lean forwards run the stock arithmetic
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=0, atol=1e-2 * want.abs().max().item())


def test_forced_fused_denoiser_gives_the_stock_logits_under_a_padding_mask(dream_like_path, monkeypatch):
    """The denoiser's fused layers and folded attention as CUDA runs them (forced here:
    the interpreter on CPU), with rows padded on the left as a batch of prompts is."""
    from entrgi import load_denoiser

    stock = load_denoiser(dream_like_path, kind="dream", fused_layers=False, device=DEVICE)
    for module in (entrgi.lean, entrgi.normed_attention, entrgi.sdpa):
        monkeypatch.setattr(module, "resolve_backend", lambda backend, device: "triton")
    fused = load_denoiser(dream_like_path, kind="dream", device=DEVICE)
    assert fused.layers.folded_sdpa and not stock.layers.folded_sdpa
    ids = torch.randint(0, fused.vocab_size, (3, 9), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    mask = (torch.arange(9) >= torch.tensor([[0], [3], [5]])).to(DEVICE)  # padded on the left
    want, got = stock.logits(ids, mask), fused.logits(ids, mask)
    torch.testing.assert_close(got[mask], want[mask], rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("cache_prefix", [False, True])
def test_forced_fused_layers_generate_the_stock_tokens(dream_like_path, classifier_path, cache_prefix, monkeypatch):
    """A guided generate whose models run the fused layers, folded attention and lean
    decoder layers as CUDA runs them (forced: the interpreter on CPU, float32) gives the
    stock layers' tokens, and their rewards up to rounding."""
    from entrgi import GuidanceConfig, generate, load_denoiser

    config = GuidanceConfig(steps=3, max_new_tokens=5, num_samples=2, guidance_steps=2, seed=5)
    prompts = ["red car", "a much longer prompt than the other"]
    stock_denoiser = load_denoiser(dream_like_path, kind="dream", fused_layers=False, device=DEVICE)
    stock_reward = load_reward(classifier_path, cache_prefix=cache_prefix, lean_activations=False, device=DEVICE)
    for module in (entrgi.lean, entrgi.normed_attention, entrgi.sdpa):
        monkeypatch.setattr(module, "resolve_backend", lambda backend, device: "triton")
    denoiser, reward = (
        load_denoiser(dream_like_path, kind="dream", device=DEVICE),
        load_reward(classifier_path, cache_prefix=cache_prefix, device=DEVICE),
    )
    assert denoiser.layers.folded_sdpa and reward.guidance_layers.folded_sdpa
    want = generate(prompts, denoiser=stock_denoiser, reward=stock_reward, config=config, progress=False)
    got = generate(prompts, denoiser=denoiser, reward=reward, config=config, progress=False)
    assert [r.response_ids for r in got] == [r.response_ids for r in want]
    torch.testing.assert_close([r.rewards for r in got], [r.rewards for r in want], rtol=1e-4, atol=1e-5)


def test_fused_rotary_hands_calls_it_does_not_fit_to_the_stock_function():
    from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

    fused = fused_rotary(apply_rotary_pos_emb)
    q, k = torch.randn(2, 5, 3, 8, device=DEVICE), torch.randn(2, 5, 1, 8, device=DEVICE)  # (B, T, H, D)
    cos, sin = torch.randn(2, 5, 8, device=DEVICE), torch.randn(2, 5, 8, device=DEVICE)
    for got, want in zip(fused(q, k, cos, sin, unsqueeze_dim=2), apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)):
        assert torch.equal(got, want)
    odd = torch.randn(2, 3, 5, 6, device=DEVICE)  # a head size the kernel does not take
    for got, want in zip(
        fused(odd, odd, cos[..., :6], sin[..., :6]), apply_rotary_pos_emb(odd, odd, cos[..., :6], sin[..., :6])
    ):
        assert torch.equal(got, want)
    half = torch.randn(2, 3, 5, 8, device=DEVICE).bfloat16()  # float32 angles: the stock result is float32
    for got, want in zip(fused(half, half, cos, sin), apply_rotary_pos_emb(half, half, cos, sin)):
        assert got.dtype == torch.float32 and torch.equal(got, want)


def test_stacked_linears_share_one_weight_and_fall_back_once_moved(monkeypatch):
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP

    torch.manual_seed(0)
    mlp = Qwen3MLP(Qwen3Config(hidden_size=16, intermediate_size=24)).to(DEVICE).requires_grad_(False)
    x = torch.randn(2, 5, 16, device=DEVICE, requires_grad=True)
    want = mlp(x)
    want_grad = torch.autograd.grad(want.sum(), x)[0]
    ((module, lean),) = lean_forwards(torch.nn.ModuleList([mlp]), backend="triton")
    # the layers read slices of one stacked weight: the same values, no second copy
    stacked = mlp.gate_proj.weight.untyped_storage().data_ptr()
    assert mlp.up_proj.weight.untyped_storage().data_ptr() == stacked
    assert mlp.up_proj.weight.data_ptr() == stacked + 24 * 16 * mlp.up_proj.weight.element_size()
    assert torch.equal(mlp(x), want)
    got = lean(x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), x)[0], want_grad)
    mlp.half()  # new storage for every parameter: the stack is stale, the layers run one by one
    monkeypatch.setattr(entrgi.lean, "merged_silu_gate", None)
    x16 = x.detach().half()
    with torch.no_grad():
        torch.testing.assert_close(lean(x16), mlp(x16))
    linear = torch.nn.Linear(4, 3).requires_grad_(False)
    assert StackedLinear.fits([linear, torch.nn.Linear(4, 2).requires_grad_(False)])
    assert not StackedLinear.fits([linear, torch.nn.Linear(4, 2, bias=False).requires_grad_(False)])  # bias on one
    assert not StackedLinear.fits([linear, torch.nn.Linear(5, 2).requires_grad_(False)])  # another input width
    assert not StackedLinear.fits([linear, torch.nn.Linear(4, 2)])  # a trained layer
    assert not StackedLinear.fits([linear, torch.nn.Linear(4, 2).requires_grad_(False).half()])


@pytest.mark.parametrize("cache_prefix", [False, True])
def test_fused_classifier_with_stacked_projections_gives_the_stock_rewards_and_gradients(
    classifier_path, cache_prefix, monkeypatch
):  # fmt: skip
    """The fused layers as CUDA runs them (forced here: the interpreter on CPU), through
    the reward's own path: packed inputs, and the prompt prefix cached by a no-grad pass
    the later calls attend to."""
    plain = load_reward(classifier_path, cache_prefix=cache_prefix, lean_activations=False, device=DEVICE)
    for module in (entrgi.lean, entrgi.normed_attention, entrgi.sdpa):
        monkeypatch.setattr(module, "resolve_backend", lambda backend, device: "triton")
    fused = load_reward(classifier_path, cache_prefix=cache_prefix, device=DEVICE)
    # per layer the layer itself, four norms, the MLP, the q, k and v projections and the
    # attention (its head norms and rotary embedding as one op); and the final norm
    assert len(fused.guidance_layers.lean) == 2 * 10 + 1
    assert sum(isinstance(module, torch.nn.Linear) for module, _ in fused.guidance_layers.lean) == 2 * 3
    assert fused.guidance_layers.folded_sdpa and not plain.guidance_layers.folded_sdpa
    assert fused.guidance_layers.describe() == (
        "lean: 2 x Qwen3DecoderLayer, 6 x Linear, 9 x Qwen3RMSNorm, 2 x Qwen3MLP, 2 x Qwen3Attention; "
        "rotary: modeling_qwen3; folded sdpa"
    )
    assert plain.guidance_layers.describe() == "stock"
    groups, folded_call = [], entrgi.sdpa.FoldedSdpa.__call__
    monkeypatch.setattr(entrgi.sdpa.FoldedSdpa, "__call__", lambda self, module, query, key, *args, **kwargs:
                        groups.append(query.shape[1] // key.shape[1]) or folded_call(self, module, query, key, *args,
                                                                                       **kwargs))  # fmt: skip
    normed, normed_call = [], entrgi.normed_attention.normed_rotary_embedding
    monkeypatch.setattr(entrgi.normed_attention, "normed_rotary_embedding",
                        lambda *args: normed.append(args) or normed_call(*args))  # fmt: skip
    context = plain.prepare(PROMPTS, 3)
    embeds, valid = guided_reward_inputs(plain, 6, 7, seed=8)
    assert_same_rewards((plain, context), (fused, fused.prepare(PROMPTS, 3)), embeds, valid, tol=1e-4)
    assert set(groups) == {2}  # the layers' attention ran folded: two query heads per key / value head
    assert len(normed) == len(groups)  # each with its head norms and rotary embedding as one op (cache or not)


def test_stacked_projections_are_checked_call_by_call_and_hand_out_slices_of_one_input_only():
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention

    config = Qwen3Config(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    torch.manual_seed(0)
    attention = Qwen3Attention(config, layer_idx=0).to(DEVICE).requires_grad_(False)
    projections = _stacked_attention(attention, "triton")
    assert [linear for linear, _ in projections] == [getattr(attention, name) for name in QKV]
    assert _projections_reproduce(projections)
    (query, query_forward), (key, key_forward), (value, value_forward) = projections
    assert not _projections_reproduce([(query, query_forward), (key, value_forward), (value, key_forward)])
    x, other = torch.randn(2, 4, 32, device=DEVICE), torch.randn(2, 4, 32, device=DEVICE)
    stacked_query = query_forward(x)
    torch.testing.assert_close(stacked_query, torch.nn.functional.linear(x, query.weight))
    # a call on another tensor runs its own layer; the slice for x is still there after it
    torch.testing.assert_close(key_forward(other), torch.nn.functional.linear(other, key.weight))
    key_slice = key_forward(x)  # a slice of the query call's output: one GEMM for the three
    assert key_slice.untyped_storage().data_ptr() == stacked_query.untyped_storage().data_ptr()
    torch.testing.assert_close(key_slice, torch.nn.functional.linear(x, key.weight))
    torch.testing.assert_close(value_forward(x), torch.nn.functional.linear(x, value.weight))
    assert _stacked_attention(attention, "torch") == []  # the torch backend keeps the stock layers
