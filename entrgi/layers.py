"""How a model's repeated layers run: compiled, activation-checkpointed, lean, or a mix.

``compiled``: every layer runs through one ``torch.compile`` of the layers' forward
(regional compilation). The layers share one compiled graph because their code and
shapes are the same and their parameters are graph inputs, so compiling costs one
layer's worth whatever the depth. Inductor fuses each layer's elementwise work (norms,
rotary embedding, gated activation, residual adds) into a few kernels: an eager Qwen3
layer runs about 50 non-view ATen ops forward and 80 backward, which makes a guided
step's reward forward + backward thousands of small launches even from a CUDA graph.
Shapes are static within a run, so the first call of a run compiles and later calls
and graph replays reuse it; a new batch shape compiles once more (dynamic sizes).

``checkpointed``: each layer keeps only its input for the backward and recomputes the
rest (non-reentrant ``torch.utils.checkpoint`` without RNG-state bookkeeping: models run
in eval mode and draw no random numbers), which keeps the step free of host syncs and
capturable. About one extra forward for most of the activation memory.

``lean``: the layers' RMSNorms and gated MLPs keep less for the backward and, on
CUDA, run as one fused Triton kernel each way, as does the rotary embedding (see
:mod:`entrgi.lean`; the same values, up to rounding when fused; about a third less
activation memory for Qwen-family layers, nothing recomputed but one elementwise op);
an attention that normalises each query and key head (Qwen3) runs those norms inside
the rotary kernel (:mod:`entrgi.normed_attention`), transformers' sdpa attention
runs grouped query heads folded, with the mask prepared once per forward
(:mod:`entrgi.sdpa`), and LLaDA's own blocks run fused the same way
(:mod:`entrgi.lean_llada`). Only for layers neither compiled
(inductor fuses and chooses what to keep) nor checkpointed (they keep their inputs
alone).

Key/value caches: a ``past_key_values`` (or ``cache``) that offers ``for_layer(index)``
reaches each layer as that layer's own view, so the compiled graph does not depend on
the layer's index (one graph instead of one per layer). Values and gradients are those
of the plain layers (up to the compiler's fp reassociation).
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections import Counter
from typing import Iterator

import torch
from torch.utils.checkpoint import checkpoint

from entrgi.lean import ROTARY, lean_forwards, rotary_swaps
from entrgi.lean_llada import llada_forwards
from entrgi.sdpa import folded_sdpa_fits, folded_sdpa_swap


def model_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's stack of layers: of its ``nn.ModuleList``s whose entries share one
    class, the one holding the most parameters. Raises when there is none."""
    stacks = [
        list(stack)
        for stack in model.modules()
        if isinstance(stack, torch.nn.ModuleList) and len(stack) and len({type(m) for m in stack}) == 1
    ]
    if not stacks:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of layers to compile or checkpoint")
    return max(stacks, key=lambda stack: sum(p.numel() for m in stack for p in m.parameters()))


# what a decoder layer's key/value cache argument is called (transformers >= 5.24: cache)
CACHE_KWARGS = ("past_key_values", "cache")


def _call(forward, *args, **kwargs):
    return forward(*args, **kwargs)


def _compiled_call():
    """``torch.compile`` of a fresh copy of ``_call``. Dynamo keeps its cache and its
    recompile limit per code object, so each model compiles into its own."""
    code = _call.__code__.replace()
    return torch.compile(types.FunctionType(code, _call.__globals__, _call.__name__))


class LayerRunner:
    """Runs ``model``'s layers compiled, checkpointed and / or lean inside :meth:`active`
    (a no-op when all are off). Every swapped ``forward`` (including one a hook
    library installed on the instance) is restored on exit."""

    def __init__(self, model: torch.nn.Module, compiled: bool = False, checkpointed: bool = False, lean: bool = False):
        self.compiled, self.checkpointed = compiled, checkpointed
        self.layers = model_layers(model) if compiled or checkpointed else []
        self._call = _compiled_call() if compiled else _call
        # a checkpoint recomputes after active() has restored the stock forwards, and
        # would find other saved tensors; inductor chooses what compiled layers keep
        lean = lean and not (compiled or checkpointed)
        if lean:
            from entrgi.normed_attention import normed_attention_forwards  # it imports the rewards' caches

            self.lean = lean_forwards(model) + normed_attention_forwards(model) + llada_forwards(model)
        else:
            self.lean = []
        self.rotary = rotary_swaps(model) if lean else []
        self.folded_sdpa = lean and folded_sdpa_fits(model)

    def describe(self) -> str:
        """What runs instead of the stock code, for a log line, e.g. "lean: 28 x
        Qwen3DecoderLayer, 57 x Qwen3RMSNorm, ...; rotary: modeling_qwen3; folded sdpa"
        ("stock" where nothing is swapped)."""
        parts = [f"{len(self.layers)} layers {how}" for how, on in (("compiled", self.compiled),
                 ("checkpointed", self.checkpointed)) if on]  # fmt: skip
        if self.lean:
            counted = Counter(type(module).__name__ for module, _ in self.lean)
            parts.append("lean: " + ", ".join(f"{count} x {name}" for name, count in counted.items()))
        if self.rotary:
            parts.append("rotary: " + ", ".join(module.__name__.rsplit(".", 1)[-1] for module, _ in self.rotary))
        if self.folded_sdpa:
            parts.append("folded sdpa")
        return "; ".join(parts) or "stock"

    def _layer_forward(self, index: int, forward):
        def run(*args, **kwargs):
            for name in CACHE_KWARGS:
                if hasattr(kwargs.get(name), "for_layer"):
                    kwargs[name] = kwargs[name].for_layer(index)
            layer_call = functools.partial(self._call, forward)
            if self.checkpointed:
                return checkpoint(layer_call, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)
            return layer_call(*args, **kwargs)

        return run

    def _lean_swaps(self) -> list[tuple[object, str, object]]:
        """The lean forwards, fused rotary functions and (fresh: it keeps the masks it
        prepared) folded sdpa attention, as attribute swaps."""
        return (
            [(module, "forward", forward) for module, forward in self.lean]
            + [(module, ROTARY, fused) for module, fused in self.rotary]
            + ([folded_sdpa_swap()] if self.folded_sdpa else [])
        )

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        layers = [
            (layer, "forward", self._layer_forward(index, layer.forward)) for index, layer in enumerate(self.layers)
        ]
        with swapped_attributes(layers + self._lean_swaps()):
            yield

    @contextlib.contextmanager
    def prefill(self) -> Iterator[None]:
        """The lean layers alone, for a no-grad pass whose keys and values later calls
        inside :meth:`active` attend to (a cached prompt prefix): it rounds as they do
        (fused kernels on CUDA). Compiled or checkpointed layers run stock here."""
        with swapped_attributes(self._lean_swaps()):
            yield


@contextlib.contextmanager
def swapped_attributes(swaps: list[tuple[object, str, object]]) -> Iterator[None]:
    """Each (object, name, value): ``object.name`` set to value inside the block and
    restored after (deleted again where the object had none of its own: a module's
    ``forward`` then falls back to its class's)."""
    missing = object()
    previous = [vars(target).get(name, missing) for target, name, _ in swaps]
    for target, name, value in swaps:
        setattr(target, name, value)
    try:
        yield
    finally:
        for (target, name, _), value in zip(swaps, previous):
            if value is missing:
                delattr(target, name)
            else:
                setattr(target, name, value)
