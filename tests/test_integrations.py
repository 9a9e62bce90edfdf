"""Drop-in patches: the published optimize_logits and dllm's EntrgiDreamSampler, tested
against a restatement of the published per-trajectory loop on stand-ins."""

from __future__ import annotations

import gc
import sys
import types
import weakref

import pytest
import torch

from entrgi.integrations import apply_entrgi_to_dllm, apply_entrgi_to_published

K, P, G = 2, 3, 5
NEVER = -7  # an end id that argmax never produces


def _published_loop(base_logits, mask, x, reward_model, prefix, suffix, table, steps, lr, tau):
    """The published optimize_logits in expectation mode (one prompt, K rows), trimmed."""
    masked = [m[P:] for m in mask]
    phi = torch.cat([base_logits[p][mask[p]] for p in range(len(mask))]).detach().clone().float().requires_grad_(True)
    phi_init = phi.detach().clone()
    optimizer = torch.optim.Adam([phi], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        rows, start = [], 0
        for p in range(len(mask)):
            n = int(masked[p].sum())
            soft = torch.softmax(phi[start : start + n] / tau, dim=-1) @ table
            response = table[x[p, P:]].clone()
            response[masked[p]] = soft
            rows.append(response)
            start += n
        full = torch.cat([prefix.expand(len(mask), -1, -1), torch.stack(rows), suffix.expand(len(mask), -1, -1)], 1)
        rewards = reward_model(inputs_embeds=full, attention_mask=torch.ones(full.shape[:2], dtype=torch.long)).logits
        (-rewards[:, 0].sum()).backward()
        optimizer.step()
    return phi.detach(), phi_init


@pytest.fixture
def setup(classifier_reward):
    table = classifier_reward.input_embeddings().detach()
    vocab = table.shape[0]
    prefix_ids, _ = classifier_reward.context_ids("what is the weather")
    suffix_ids = classifier_reward.tokenizer("end of turn", add_special_tokens=False)["input_ids"]
    prefix, suffix = table[torch.tensor([prefix_ids])], table[torch.tensor([suffix_ids])]
    base_logits = torch.randn(K, P + G, vocab) * 2
    x = torch.randint(1000, 2000, (K, P + G))
    mask = torch.zeros(K, P + G, dtype=torch.bool)
    mask[0, P + 1 :] = True
    mask[1, P:] = True
    mask[1, P + 2] = False
    return types.SimpleNamespace(table=table, prefix=prefix, suffix=suffix, base_logits=base_logits, x=x, mask=mask,
                                 reward=classifier_reward)  # fmt: skip


def _published_config(**overrides):
    values = dict(M=2, eta=0.5, temperature=0.7, top_p=0.95, top_k=None, use_entrgi=False, use_aps=False)
    return types.SimpleNamespace(**{**values, **overrides})


def test_published_patch_matches_the_published_loop(setup):
    module = types.ModuleType("published_entrgi")
    module.optimize_logits = lambda *args: None
    apply_entrgi_to_published(module)
    cache = types.SimpleNamespace(prefix_embeds=setup.prefix, suffix_embeds=setup.suffix, user_content="q")
    args = (setup.base_logits, list(setup.mask), setup.x, P, torch.zeros(K), 1, K, setup.reward.model, [cache],
            None, setup.table, None, NEVER, None)  # fmt: skip
    phi, phi_init = module.optimize_logits(*args, _published_config())
    expected, expected_init = _published_loop(setup.base_logits, setup.mask, setup.x, setup.reward.model,
                                              setup.prefix, setup.suffix, setup.table, 2, 0.5, 0.7)  # fmt: skip
    assert phi.shape == (int(setup.mask.sum()), setup.table.shape[0])
    torch.testing.assert_close(phi_init, expected_init)
    torch.testing.assert_close(phi, expected, atol=2e-3, rtol=1e-3)  # Adam amplifies float noise in ~0 grads
    assert not torch.equal(phi, phi_init)

    entrgi_phi, _ = module.optimize_logits(*args, _published_config(use_entrgi=True, top_k=5))
    assert entrgi_phi.shape == phi.shape and torch.isfinite(entrgi_phi).all()
    nothing = module.optimize_logits(*args[:1], [torch.zeros(P + G, dtype=torch.bool)] * K, *args[2:],
                                     _published_config())  # fmt: skip
    assert nothing == (None, None)


class StandInSampler:
    """dllm's EntrgiDreamSampler interface, as far as _optimize_logits reads it."""

    def __init__(self, setup):
        self.reward_model, self.mapped_embeds = setup.reward.model, setup.table
        self.tokenizer = types.SimpleNamespace(eos_token_id=NEVER, pad_token_id=None)

    def _optimize_logits(self, *args):
        raise NotImplementedError("the slow published loop")


def _dllm_config(**overrides):
    values = dict(M=2, eta=0.5, reward_temperature=1.0, temperature=0.7, top_p=0.95, top_k=None, aps=False,
                  soft_only=True)  # fmt: skip
    return types.SimpleNamespace(**{**values, **overrides})


def test_dllm_patch_on_a_stand_in_sampler(setup):
    patched = apply_entrgi_to_dllm(StandInSampler)
    sampler = patched(setup)
    caches = [(setup.prefix, setup.suffix, "q")]
    phi, phi_init, ew_mean = sampler._optimize_logits(setup.base_logits, setup.mask, setup.x, P, caches, K,
                                                      _dllm_config(), "cpu")  # fmt: skip
    expected, _ = _published_loop(setup.base_logits, setup.mask, setup.x, setup.reward.model, setup.prefix,
                                  setup.suffix, setup.table, 2, 0.5, 0.7)  # fmt: skip
    torch.testing.assert_close(phi, expected, atol=2e-3, rtol=1e-3)  # Adam amplifies float noise in ~0 grads
    assert ew_mean == 0.0  # soft_only: w = 0
    _, _, entropy_weight = sampler._optimize_logits(setup.base_logits, setup.mask, setup.x, P, caches, K,
                                                    _dllm_config(soft_only=False), "cpu")  # fmt: skip
    assert 0.0 < entropy_weight < 1.0  # mean normalised entropy of the masked rows


def test_dllm_patch_finds_the_installed_class(monkeypatch):
    fake = types.ModuleType("dllm.pipelines.entrgi")
    fake.EntrgiDreamSampler = type("EntrgiDreamSampler", (), {"_optimize_logits": lambda self: None})
    for name in ("dllm", "dllm.pipelines"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "dllm.pipelines.entrgi", fake)
    patched = apply_entrgi_to_dllm()
    assert patched is fake.EntrgiDreamSampler and patched._optimize_logits.__name__ == "dllm_optimize_logits"


def test_missing_targets_raise(monkeypatch):
    for name in ("dllm", "dllm.pipelines.entrgi", "dllm.pipelines.rl"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails
    with pytest.raises(ImportError, match="EntrgiDreamSampler was not found"):
        apply_entrgi_to_dllm()
    with pytest.raises(AttributeError, match="has no optimize_logits"):
        apply_entrgi_to_published(types.ModuleType("empty"))


def test_the_wrapped_reward_is_made_once_and_freed_with_its_model(classifier_path):
    from transformers import AutoModelForSequenceClassification

    from entrgi.integrations import _classifier

    model = AutoModelForSequenceClassification.from_pretrained(classifier_path)
    wrapper = _classifier(model)
    assert _classifier(model) is wrapper and wrapper.model is model
    freed = weakref.ref(model)
    del model, wrapper
    gc.collect()
    assert freed() is None, "the patched loop's reward wrapper keeps its model alive"
