"""Memory-lean, fused autograd for a model's RMSNorms, SiLU-gated MLPs and rotary
position embedding.

Guidance differentiates the reward with respect to its input embeddings only, so what
autograd keeps between the reward's forward and backward is activation memory, per
token and layer. Stock transformers code (Llama / Qwen / Mistral families) keeps, for
each RMSNorm, a float32 copy of its input (twice the bfloat16 input) and, for each gated
MLP, ``gate``, ``up`` and ``silu(gate)``. Here an RMSNorm keeps its input in its own
dtype and one 1/rms per row, and the gated product keeps ``gate`` and ``up`` and
recomputes ``silu(gate)`` in the backward (one elementwise op). For a Qwen3-1.7B layer
over 16 x 200 bfloat16 tokens that is 172 MiB kept instead of 253 MiB (counted with
saved-tensor hooks on CPU, :func:`kept_bytes`; ``bench/reward_memory.py``; attention's
own tensors unchanged). On CUDA the swapped forwards also run fused: one Triton kernel
per norm or gate, forward and backward (:mod:`entrgi.ops.layer_ops`), instead of the
stock code's chains of elementwise launches, the gate and up projections, and an
attention's q, k and v projections, as one GEMM each way (:class:`StackedLinear`,
:class:`_StackedProjections`, :func:`entrgi.ops.layer_ops.merged_silu_gate`); a
pre-norm decoder layer's residual adds run inside its norms' kernels and its MLP's
down projection (:func:`_lean_decoder_layer`); and the modelling module's
``apply_rotary_pos_emb`` is swapped for one kernel for queries and keys together
(:func:`rotary_swaps`; a module-level function, so the swap holds for every model of
that family while :meth:`entrgi.layers.LayerRunner.active` runs; an attention that
normalises its query and key heads first runs those norms in the same kernel,
:mod:`entrgi.normed_attention`). LLaDA's own blocks, whose modules are named otherwise,
get the same treatment in :mod:`entrgi.lean_llada` (its norms are swapped here).

Exactness: each module is swapped only after its lean forward reproduced its own
forward on a random input (:func:`lean_forwards`). The ``torch`` backend applies the
ATen ops autograd applies to the stock code, in its order: bit-identical forwards, and
gradients bit for bit in bfloat16 (tested on CPU); in float32, where the norm's input
needs no cast, up to the order in which autograd adds the residual branch's gradient.
The ``triton`` backend rounds where the stock code rounds but sums a norm's row in
another order: its forward must agree to within ``FUSED_ULPS`` eps of the output's
largest magnitude (:mod:`entrgi.swap_checks`, which also warns of the modules left
stock). Used for layers neither compiled nor checkpointed
(:class:`entrgi.layers.LayerRunner`).
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Callable

import torch
import torch.nn.functional as F

from entrgi.ops.layer_ops import (
    add_rms_norm, add_rms_norm_writable, fits_fused_rotary, merged_silu_gate, rms_norm, rms_norm_with_residual,
    rotary_embedding, silu_gate,
)  # fmt: skip
from entrgi.ops.validation import resolve_backend
from entrgi.swap_checks import (
    Agreement, file_by_check, random_input, random_query_key, random_rotary, swapped_agrees, warn_kept_stock,
)  # fmt: skip

ROTARY = "apply_rotary_pos_emb"  # the modelling modules' rotary function (Llama / Qwen / Mistral / Dream)


def norm_epsilon(module: torch.nn.Module) -> float | None:
    """An RMSNorm module's epsilon: transformers' ``variance_epsilon``, or the ``eps`` of
    LLaDA's (OLMo's) ``RMSLayerNorm`` without a bias; None for another module."""
    eps = getattr(module, "variance_epsilon", None)
    if eps is None and type(module).__name__ == "RMSLayerNorm" and getattr(module, "bias", None) is None:
        eps = getattr(module, "eps", None)
    return eps if isinstance(eps, float) else None


def lean_rms_norm(module: torch.nn.Module, backend: str) -> Callable | None:
    """A forward for an RMSNorm module (a frozen 1-D ``weight``, a float epsilon:
    :func:`norm_epsilon`) by :func:`rms_norm`; None for another module."""
    eps, weight = norm_epsilon(module), getattr(module, "weight", None)
    if eps is None or not isinstance(weight, torch.nn.Parameter) or weight.dim() != 1:
        return None
    if weight.requires_grad:  # a trained norm needs its weight's gradient: left as it is
        return None
    return lambda hidden_states: rms_norm(hidden_states, module.weight, eps, backend)


class StackedLinear:
    """Linear layers reading one input, run as one GEMM: their weights (and biases)
    stacked along the output rows into one tensor, and each layer's own parameter
    re-pointed to its slice of it, so the stack costs no memory and the layers' values
    are unchanged. ``current()`` checks, on the host, that every layer still reads
    its slice (a later ``model.to(...)`` or ``load_state_dict(assign=True)`` gives them
    new storage, and the caller then runs the layers one by one)."""

    def __init__(self, linears: list[torch.nn.Linear]):
        self.linears = linears
        self.weight = torch.cat([linear.weight.detach() for linear in linears])
        has_bias = linears[0].bias is not None
        self.bias = torch.cat([linear.bias.detach() for linear in linears]) if has_bias else None
        start = 0
        for linear in linears:
            rows = linear.out_features
            linear.weight.data = self.weight[start : start + rows]
            if has_bias:
                linear.bias.data = self.bias[start : start + rows]
            start += rows
        self._storages = self._storage_ptrs()

    @staticmethod
    def fits(linears: list[torch.nn.Linear]) -> bool:
        """Frozen plain parameters of one dtype and device, one input width, biases on
        all or none."""
        params = [p for linear in linears for p in (linear.weight, linear.bias) if p is not None]
        if any(type(p) is not torch.nn.Parameter or p.requires_grad for p in params):
            return False  # a quantised or trained layer keeps its own weights
        one_kind = len({(p.dtype, p.device) for p in params}) == 1
        one_input = len({linear.in_features for linear in linears}) == 1
        return one_kind and one_input and len({linear.bias is None for linear in linears}) == 1

    def _storage_ptrs(self) -> list[int]:
        return [p.untyped_storage().data_ptr() for linear in self.linears for p in (linear.weight, linear.bias)
                if p is not None]  # fmt: skip

    def current(self) -> bool:
        return self._storage_ptrs() == self._storages

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class GatedLinears:
    """``down(silu(gate(x)) * up(x))`` of three linear layers with the lean gate; with the
    triton backend the gate and up projections run as one GEMM (:class:`StackedLinear`,
    while the layers still read their slices of it), and :meth:`add_into` adds the
    output to a tensor inside the down projection's GEMM."""

    def __init__(self, gate: torch.nn.Linear, up: torch.nn.Linear, down: torch.nn.Linear, backend: str):
        self.gate, self.up, self.down, self.backend = gate, up, down, backend
        self.stacked = StackedLinear([gate, up]) if backend == "triton" and StackedLinear.fits([gate, up]) else None

    def gated(self, x: torch.Tensor) -> torch.Tensor:
        if self.stacked is not None and self.stacked.current():
            return merged_silu_gate(self.stacked(x), self.backend)
        return silu_gate(self.gate(x), self.up(x), self.backend)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.gated(x))

    def adds_into(self, dtype: torch.dtype) -> bool:
        """Whether :meth:`add_into` computes what calling the layers gives, for inputs and
        output of ``dtype``: a plain bias-free down projection of that dtype, without hooks
        or another forward (host checks)."""
        down = self.down
        plain = type(down) is torch.nn.Linear and down.bias is None and down.weight.dtype == dtype
        return plain and runs_as_built(down, None)

    def add_into(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` (rows, width) += the gated layers of ``x`` (..., width), accumulated by
        the down projection's GEMM in place (one rounding, where the stock code rounds the
        projection and then the sum); returns ``out``."""
        gated = self.gated(x)
        return out.addmm_(gated.reshape(-1, gated.shape[-1]), self.down.weight.t())


class _LeanGatedMlp(GatedLinears):
    """The forward of a SiLU-gated MLP module (``gate_proj``, ``up_proj``, ``down_proj``,
    ``act_fn``) by :class:`GatedLinears`."""

    def __init__(self, module: torch.nn.Module, backend: str):
        super().__init__(module.gate_proj, module.up_proj, module.down_proj, backend)
        self.module = module

    def adds_into(self, dtype: torch.dtype) -> bool:
        """As :meth:`GatedLinears.adds_into`, the MLP module itself also without hooks or
        another forward."""
        return super().adds_into(dtype) and runs_as_built(self.module, self)


def runs_as_built(module: torch.nn.Module, forward: Callable | None) -> bool:
    """No hooks on ``module``, and its forward is its class's or ``forward``."""
    if module._forward_hooks or module._forward_pre_hooks:
        return False
    return module.__dict__.get("forward", forward) is forward


def _lean_gated_mlp(module: torch.nn.Module, backend: str) -> _LeanGatedMlp | None:
    projections = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(p, torch.nn.Linear) for p in projections) or not hasattr(module, "act_fn"):
        return None
    return _LeanGatedMlp(module, backend)


QKV = ("q_proj", "k_proj", "v_proj")  # a Llama-family attention's projections, called in this order on one input


class _StackedProjections:
    """Forwards for an attention's q, k and v projections that run them as one GEMM:
    q's call computes all three on its input and keeps k's and v's slices for the k and
    v calls on that same tensor (the models' attention computes q, k then v from one
    hidden state); a call on another tensor, or once the layers' storage moved
    (:meth:`StackedLinear.current`), runs its own layer. The slices are views, so their
    gradients meet in one buffer (the split's backward) before one GEMM."""

    def __init__(self, linears: list[torch.nn.Linear]):
        self.stacked = StackedLinear(linears)
        self.sizes = [linear.out_features for linear in linears]
        self.pending: tuple[torch.Tensor, dict[int, torch.Tensor]] | None = None

    def forward(self, index: int) -> Callable:
        linear = self.stacked.linears[index]

        def run(x):
            if index == 0:
                self.pending = None
                if self.stacked.current():
                    query, *rest = self.stacked(x).split(self.sizes, dim=-1)
                    self.pending = (x, dict(enumerate(rest, start=1)))
                    return query
            elif self.pending is not None and self.pending[0] is x and index in self.pending[1]:
                part = self.pending[1].pop(index)
                if not self.pending[1]:
                    self.pending = None
                return part
            return type(linear).forward(linear, x)

        return run


def _stacked_attention(module: torch.nn.Module, backend: str) -> list[tuple[torch.nn.Module, Callable]]:
    """(projection, forward) for the q, k and v projections of a Llama-family attention
    (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` and ``head_dim``) with the triton
    backend, run as one GEMM (:class:`_StackedProjections`); [] otherwise."""
    linears = [getattr(module, name, None) for name in QKV]
    if backend != "triton" or not all(isinstance(linear, torch.nn.Linear) for linear in linears):
        return []
    if not isinstance(getattr(module, "o_proj", None), torch.nn.Linear) or not isinstance(
        getattr(module, "head_dim", None), int
    ):
        return []
    if any("forward" in linear.__dict__ for linear in linears) or not StackedLinear.fits(linears):
        return []
    stacked = _StackedProjections(linears)
    return [(linear, stacked.forward(index)) for index, linear in enumerate(linears)]


LAYER_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")  # a pre-norm decoder layer's


def _lean_decoder_layer(
    module: torch.nn.Module, backend: str, mlp_forward: _LeanGatedMlp | None = None
) -> Callable | None:
    """A forward for a pre-norm decoder layer (``LAYER_PARTS``: x + attn(norm(x)), then
    h + mlp(norm(h)), as Llama / Qwen / Mistral layers compute it) whose residual adds
    run inside other kernels: the first norm hands x back as the residual, whose
    gradient its backward kernel adds (:func:`rms_norm_with_residual`); the second norm
    takes the attention's output and the residual and writes their sum
    (:func:`add_rms_norm`); and with ``mlp_forward``, the layer's gated MLP's lean
    forward, the MLP's down projection accumulates into that sum in place
    (:meth:`_LeanGatedMlp.add_into`, with :func:`add_rms_norm_writable`'s writable sum).
    The triton backend only. None where the layer lacks the parts, its norms are not
    lean ones or its attention has no even ``head_dim``. Keyword arguments reach the
    attention as the stock layer hands them over;
    a call with other positional ones runs the stock forward."""
    parts = [getattr(module, name, None) for name in LAYER_PARTS]
    if backend != "triton" or any(not isinstance(part, torch.nn.Module) for part in parts):
        return None
    first_norm, attention, second_norm, mlp = parts
    if lean_rms_norm(first_norm, backend) is None or lean_rms_norm(second_norm, backend) is None:
        return None
    head_dim = getattr(attention, "head_dim", None)
    if not isinstance(head_dim, int) or head_dim % 2:  # its check draws rotary angles of this size
        return None
    first_eps, second_eps = norm_epsilon(first_norm), norm_epsilon(second_norm)

    def forward(hidden_states, *args, **kwargs):
        if args:
            return type(module).forward(module, hidden_states, *args, **kwargs)
        normed, residual = rms_norm_with_residual(hidden_states, first_norm.weight, first_eps, backend)
        attended = attention(hidden_states=normed, **kwargs)[0]
        return residual_norm_mlp(residual, attended, second_norm.weight, second_eps, mlp, mlp_forward)

    return forward


def residual_norm_mlp(
    residual: torch.Tensor, attended: torch.Tensor, norm_weight: torch.Tensor, eps: float, mlp: Callable,
    gated: GatedLinears | None,
) -> torch.Tensor:  # fmt: skip
    """A pre-norm layer's second half by the fused kernels: ``h = residual + attended``
    and its RMSNorm in one kernel (:func:`add_rms_norm`), then ``h + mlp(norm(h))``. With
    ``gated``, the MLP's lean forward, where it adds into h's dtype, the last add runs
    inside its down projection's GEMM (:meth:`GatedLinears.add_into`, on
    :func:`add_rms_norm_writable`'s writable sum); else ``mlp`` runs and h is added."""
    second = (norm_weight, eps, "triton")
    if gated is None or not gated.adds_into(residual.dtype):
        normed, total = add_rms_norm(residual, attended, *second)
        return total + mlp(normed)
    normed, total = add_rms_norm_writable(residual, attended, *second)
    return gated.add_into(normed, total).view(residual.shape)


def _layer_reproduces(module: torch.nn.Module, lean: Callable) -> Agreement:
    """Whether ``lean`` gives the layer's own output on a random (2, 3, width) input with
    random rotary angles and no mask (:func:`reproduces_with_fused_norms`: what differs is
    where the residual adds run, and the lean MLP's gate and GEMMs). Raises one of
    ``CALL_MISFITS`` where the layer needs other arguments."""
    first_norm, attention, second_norm, _ = (getattr(module, name) for name in LAYER_PARTS)
    width, dtype = first_norm.weight.shape[0], first_norm.weight.dtype
    x = random_input(module, width, dtype)
    rotary = random_rotary(attention.head_dim, dtype, torch.Generator(x.device).manual_seed(1))
    return reproduces_with_fused_norms(module, lean, [first_norm, second_norm], x, attention_mask=None,
                                       position_embeddings=rotary)  # fmt: skip


def reproduces_with_fused_norms(module: torch.nn.Module, lean: Callable, norms: list[torch.nn.Module], *args,
                                **kwargs) -> Agreement:  # fmt: skip
    """Whether ``lean(*args, **kwargs)`` gives ``module(*args, **kwargs)`` (within
    ``FUSED_ULPS``), the RMSNorm modules ``norms`` run by the fused kernel in both, so
    that what is compared is the rest of the fusion."""
    from entrgi.layers import swapped_attributes

    swaps = [(norm, "forward", lean_rms_norm(norm, "triton")) for norm in norms]
    with torch.no_grad():
        with swapped_attributes(swaps):
            want = module(*args, **kwargs)
        return swapped_agrees(want, lambda: lean(*args, **kwargs))


def _reproduces(module: torch.nn.Module, lean: Callable, width: int, dtype: torch.dtype, exact: bool) -> Agreement:
    """Whether ``lean`` gives ``module``'s own output on a random (2, 3, width) input."""
    x = random_input(module, width, dtype)
    with torch.no_grad():
        return swapped_agrees(module.forward(x), lambda: lean(x), exact)


def _projections_reproduce(projections: list[tuple[torch.nn.Linear, Callable]]) -> Agreement:
    """Whether stacked projection forwards, called in order on one random input as the
    attention calls them, give each projection's own output (within ``FUSED_ULPS``)."""
    first = projections[0][0]
    x = random_input(first, first.in_features, first.weight.dtype)
    with torch.no_grad():
        want = tuple(type(linear).forward(linear, x) for linear, _ in projections)
        return swapped_agrees(want, lambda: tuple(forward(x) for _, forward in projections))


def fused_rotary(original: Callable) -> Callable:
    """``original``'s signature; the fused op where the call fits it (the models'
    layout: unsqueeze_dim 1, a power-of-two head size, one dtype: with cos and sin of
    float32 the stock code's result is float32), else ``original``."""

    def apply(q, k, cos, sin, *args, **kwargs):
        if args or kwargs.get("unsqueeze_dim", 1) != 1 or set(kwargs) - {"unsqueeze_dim"}:
            return original(q, k, cos, sin, *args, **kwargs)
        if not fits_fused_rotary(q, k, cos, sin) or cos.dtype != q.dtype:
            return original(q, k, cos, sin)
        return rotary_embedding(q, k, cos, sin, "triton")

    return apply


def _rotary_reproduces(original: Callable, fused: Callable, head_dim: int, dtype, device) -> Agreement:
    generator = torch.Generator(device).manual_seed(0)
    q, k = random_query_key(head_dim, dtype, generator)
    cos, sin = random_rotary(head_dim, dtype, generator)
    with torch.no_grad():
        return swapped_agrees(original(q, k, cos, sin), lambda: fused(q, k, cos, sin))


def rotary_swaps(model: torch.nn.Module, backend: str = "auto") -> list[tuple[ModuleType, Callable]]:
    """(modelling module, fused rotary function) for each Python module that defines
    the ``apply_rotary_pos_emb`` one of ``model``'s attention layers calls, when the
    backend resolves to ``triton`` (``torch``: the stock function already runs) and the
    fused function reproduces the module's own (within ``FUSED_ULPS``) on a random input
    of every head size and dtype among that module's attention layers: the swap holds
    for all of them, so one that fails keeps the stock function for all (named in a
    warning). A host sync per check: call once, at load time."""
    parameter = next(model.parameters(), None)
    if parameter is None or resolve_backend(backend, parameter.device) != "triton":
        return []
    fused_of: dict[str, tuple[ModuleType, Callable]] = {}  # by modelling module name
    checked: dict[tuple[str, int, torch.dtype], Agreement] = {}  # by (that name, head size, dtype)
    for module in model.modules():
        python_module = sys.modules.get(type(module).__module__)
        original = getattr(python_module, ROTARY, None)
        head_dim = getattr(module, "head_dim", None)
        if not callable(original) or not isinstance(head_dim, int) or head_dim % 2:
            continue
        name, dtype = python_module.__name__, next(module.parameters(), parameter).dtype
        _, fused = fused_of.setdefault(name, (python_module, fused_rotary(original)))
        if (name, head_dim, dtype) not in checked:
            checked[name, head_dim, dtype] = _rotary_reproduces(original, fused, head_dim, dtype, parameter.device)
    failed = [(name, agreement) for (name, _, _), agreement in checked.items() if not agreement]
    warn_kept_stock([(f"{name}.{ROTARY}", agreement) for name, agreement in failed], "the fused rotary embedding")
    stock = {name for name, _ in failed}
    return [swap for name, swap in fused_of.items() if name not in stock]


def lean_forwards(model: torch.nn.Module, backend: str = "auto") -> list[tuple[torch.nn.Module, Callable]]:
    """(module, lean forward) for each of ``model``'s RMSNorms, SiLU-gated MLPs and (triton)
    attention projections and pre-norm decoder layers whose lean forward reproduces the
    module's own on a random input (a host sync per module: call once, at load time).
    ``backend`` (``auto``: Triton on CUDA | ``torch`` | ``triton``) runs the lean
    forwards; see the module docstring for what reproduces means for each. Modules that
    fit but do not reproduce are named in one warning (:func:`warn_kept_stock`). Other
    modules are left out, and so is one whose forward a hook
    library replaced on the instance (e.g. accelerate's offloading, which loads the
    weights inside that forward). With the triton backend a gated MLP's gate and up
    weights are stacked here, once (:class:`StackedLinear`: the layers' parameters are
    re-pointed into the stack, their values unchanged), and so are a Llama-family
    attention's q, k and v weights, whose three projections then each get a forward
    (:class:`_StackedProjections`)."""
    parameter = next(model.parameters(), None)
    if parameter is None:
        return []
    backend = resolve_backend(backend, parameter.device)
    found, kept_stock = [], []
    mlps: dict[torch.nn.Module, _LeanGatedMlp] = {}  # built with their decoder layer, which visits first
    for module in model.modules():
        if "forward" in module.__dict__:
            continue
        if projections := _stacked_attention(module, backend):
            if agreement := _projections_reproduce(projections):
                found += projections
            else:
                kept_stock.append((f"{type(module).__name__} projections", agreement))
            continue
        mlp = getattr(module, "mlp", None)
        if isinstance(mlp, torch.nn.Module) and mlp not in mlps and "forward" not in mlp.__dict__:
            if (gated := _lean_gated_mlp(mlp, backend)) is not None:
                mlps[mlp] = gated
        if (layer := _lean_decoder_layer(module, backend, mlps.get(mlp))) is not None:
            file_by_check(module, layer, _layer_reproduces, found, kept_stock)
            continue
        if (lean := lean_rms_norm(module, backend)) is not None:
            width, dtype = module.weight.shape[0], module.weight.dtype
        elif (lean := mlps.pop(module, None) or _lean_gated_mlp(module, backend)) is not None:
            width, dtype = module.gate_proj.in_features, module.gate_proj.weight.dtype
        else:
            continue
        exact = backend == "torch"
        file_by_check(module, lean, lambda m, f: _reproduces(m, f, width, dtype, exact), found, kept_stock)
    warn_kept_stock(kept_stock, f"the lean ({backend}) forward")
    return found


def kept_bytes(run: Callable[[], object], model: torch.nn.Module) -> int:
    """Bytes of the distinct storages, other than ``model``'s parameters, that autograd
    keeps for the backward while ``run()`` executes (saved-tensor hooks: any device)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(kept.values())
