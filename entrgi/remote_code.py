"""Remote-code models written for transformers 4.x, loaded by transformers 5.

transformers 5's ``from_pretrained`` reads what ``PreTrainedModel.post_init()`` sets on
the model (``all_tied_weights_keys``) and calls
``tie_weights(missing_keys=..., recompute_mapping=...)``. A modeling file written for 4.x
may skip ``post_init()`` and define ``tie_weights(self)``; LLaDA's, as published, does
both, so ``AutoModel.from_pretrained`` fails on it (``AttributeError`` or ``TypeError``).
:func:`loadable` gives such a class what transformers 5 asks of it, and builds its
parameters on the meta device as transformers 4.x's ``low_cpu_mem_usage`` loading did,
and changes nothing else: the network, its weights and its forward are the checkpoint's own.
:func:`sdpa_backends_kept` undoes what such code's ``__init__`` may switch for the whole
process (LLaDA's turns torch's memory-efficient attention kernel off).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Iterator

import torch

_SDPA_BACKENDS = ("flash", "mem_efficient", "math", "cudnn")

# from_pretrained arguments that also say where the remote code comes from
_CODE_SOURCE_ARGUMENTS = ("revision", "code_revision", "cache_dir", "local_files_only", "token")


def _takes_new_tie_arguments(tie_weights) -> bool:
    parameters = inspect.signature(tie_weights).parameters
    return "missing_keys" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


@contextlib.contextmanager
def _parameters_made_on(device: torch.device) -> Iterator[None]:
    """Inside, each ``nn.Parameter`` a module registers is made anew, empty, on
    ``device`` (its values are not kept); buffers are left where they are."""
    register = torch.nn.Module.register_parameter

    def register_there(module, name, param):
        if type(param) is torch.nn.Parameter and param.device != device:
            param = torch.nn.Parameter(torch.empty_like(param, device=device), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = register_there
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def loadable(model_class: type) -> type:
    """A subclass of ``model_class``, of the same name, whose ``__init__`` ends with
    ``post_init()`` where the class's own did not call it, and whose ``tie_weights``, where
    the class's own takes no arguments, takes transformers 5's and calls it without them.

    transformers 5's ``from_pretrained`` builds a model under the meta device and then
    loads its weights. A parameter made with an explicit ``device=`` escapes that (LLaDA's
    code makes each one with ``device="cpu"``: LLaDA-8B's 8B parameters would be made and
    randomly initialised on the host, then overwritten); the subclass's ``__init__``
    makes them on the meta device too when it runs under one (as transformers 4.x's
    ``low_cpu_mem_usage`` loading did, through accelerate). Buffers (a rotary table
    computed at init, not in the checkpoint) stay as the code makes them."""
    old_tie = not _takes_new_tie_arguments(model_class.tie_weights)

    def __init__(self, *args, **kwargs):
        building = torch.get_default_device()
        with _parameters_made_on(building) if building.type == "meta" else contextlib.nullcontext():
            model_class.__init__(self, *args, **kwargs)
        if not hasattr(self, "all_tied_weights_keys"):
            self.post_init()

    namespace = {"__init__": __init__, "__module__": model_class.__module__, "__qualname__": model_class.__qualname__}
    if old_tie:

        def tie_weights(self, missing_keys=None, recompute_mapping=True):
            return model_class.tie_weights(self)

        namespace["tie_weights"] = tie_weights
    return type(model_class.__name__, (model_class,), namespace)


def remote_model_class(config, name_or_path: str, from_pretrained_kwargs: dict) -> type:
    """The class a checkpoint's ``auto_map["AutoModel"]`` names, made :func:`loadable`
    (its code fetched as ``AutoModel.from_pretrained`` would fetch it)."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    source = {key: from_pretrained_kwargs[key] for key in _CODE_SOURCE_ARGUMENTS if key in from_pretrained_kwargs}
    return loadable(get_class_from_dynamic_module(config.auto_map["AutoModel"], name_or_path, **source))


@contextlib.contextmanager
def sdpa_backends_kept() -> Iterator[None]:
    """On exit, torch's process-wide sdpa kernel switches are as they were on entry:
    loading a model whose ``__init__`` flips them (LLaDA's turns the memory-efficient
    kernel off) leaves the other models' attention (the reward's) as the user set it."""
    switches = torch.backends.cuda
    enabled = {name: getattr(switches, f"{name}_sdp_enabled")() for name in _SDPA_BACKENDS}
    try:
        yield
    finally:
        for name, on in enabled.items():
            getattr(switches, f"enable_{name}_sdp")(on)
