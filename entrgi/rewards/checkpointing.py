"""Activation checkpointing of a reward model's layers for the guidance backward.

A guided step runs the reward forward and backward M times over every row's
``[prefix | response | suffix]``; the activations the backward keeps (norm inputs,
attention, the MLP's wide intermediates) are the step's largest buffer, about
0.3 GiB per layer at 16 rows x 200 tokens of a 1.7B Qwen3 reward. With
checkpointing each layer keeps only its input and recomputes the rest during the
backward: about one extra reward forward per guidance step for most of that memory.

Layers are found as transformers' ``GradientCheckpointingLayer`` modules (every
decoder / encoder layer of the library's models) and run through non-reentrant
``torch.utils.checkpoint`` without RNG-state bookkeeping (rewards run in eval mode
and draw no random numbers), which keeps the step free of host syncs and capturable
by CUDA graphs. Values and gradients are unchanged.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
from torch.utils.checkpoint import checkpoint


def checkpoint_layers_of(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's checkpointable layers; raises when it has none."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no transformers GradientCheckpointingLayer to checkpoint; "
            "use checkpoint_layers=False for this model"
        )
    return layers


@contextlib.contextmanager
def checkpointed(layers: list[torch.nn.Module]) -> Iterator[None]:
    """Within the block, each of ``layers`` runs its forward under activation
    checkpointing; their own ``forward`` (including one a hook library installed on
    the instance) is restored on exit."""
    previous = [layer.__dict__.get("forward") for layer in layers]
    for layer in layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False, preserve_rng_state=False)
    try:
        yield
    finally:
        for layer, forward in zip(layers, previous):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward
