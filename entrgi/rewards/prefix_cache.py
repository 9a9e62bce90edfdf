"""Prompt-side keys and values of a causal reward model, computed once per batch.

In ``[prefix | response | suffix]`` the prefix (the chat up to the response) never
changes during a run, and a causal model's prefix states do not depend on what
follows. So the prefix's keys and values are computed once (``prefix_keys_values``)
and every guidance step runs the model over ``[last prefix token | response |
suffix]`` only, attending to the cached keys: the same values and gradients for
about (prefix length / total length) less reward compute and activation memory.
The last prefix token stays in the new block so the block always holds a real
token (the classifier reads the last one; the likelihood reward needs the state
that predicts the first response token).
"""

from __future__ import annotations

import functools
import inspect

import torch


def cache_argument(model: torch.nn.Module) -> str:
    """The keyword ``model.forward`` takes its key/value cache under: ``cache`` from
    transformers 5.24 (which deprecates ``past_key_values``), ``past_key_values`` before."""
    return _cache_argument_of(type(model).forward)


@functools.cache  # keyed by the function: a class whose forward is replaced gets its new one's keyword
def _cache_argument_of(forward) -> str:
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


class PrefixKeysValues:
    """A ``past_key_values`` for HF attention layers that call ``update(k, v, layer)``:
    returns each layer's cached prefix keys / values (N, heads, P, head_dim) followed by
    the new ones, and stores nothing, so one instance serves every step and replay."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys, self.values = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys = torch.cat([self.keys[layer_idx], key_states], dim=-2)
        return keys, torch.cat([self.values[layer_idx], value_states], dim=-2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[0].shape[-2]

    def for_layer(self, index: int) -> PrefixKeysValues:
        """Layer ``index``'s cache alone, whatever index its layer then passes to
        ``update`` (a compiled layer then does not depend on its index; see ``layers``)."""
        return _OneLayerKeysValues([self.keys[index]], [self.values[index]])


class _OneLayerKeysValues(PrefixKeysValues):
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        return super().update(key_states, value_states, 0)


class _Recorder:
    """A ``past_key_values`` that keeps what each layer computes (the prefill pass)."""

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.keys[layer_idx], self.values[layer_idx] = key_states, value_states
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


# this package's caches: their update takes keys, values and the layer index alone, under every transformers version
OWN_CACHES = (PrefixKeysValues, _OneLayerKeysValues, _Recorder)


@torch.no_grad()
def prefix_keys_values(base_model, inputs: dict) -> tuple[torch.Tensor, ...]:
    """Run ``base_model`` (the decoder body) on the prefix ``inputs`` (inputs_embeds,
    attention_mask, position_ids) and return its keys then its values, one tensor per
    layer each: ``(k_0, ..., k_L-1, v_0, ..., v_L-1)``."""
    recorder = _Recorder()
    base_model(**inputs, **{cache_argument(base_model): recorder}, use_cache=True)
    layers = sorted(recorder.keys)
    if not layers or layers != list(range(len(layers))):
        raise ValueError(
            "the reward model's layers do not call their key/value cache's update: cannot cache its prefix"
        )
    return tuple(recorder.keys[i] for i in layers) + tuple(recorder.values[i] for i in layers)
