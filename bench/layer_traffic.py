"""What the models' elementwise work moves, counted on the meta device (no GPU; not a
timing): the reward's forward + backward as a guidance step calls it and the
denoiser's forward, at a step-suite preset's shapes, with the layers run stock, lean
(``torch`` backend) or fused (``triton``, what ``auto`` picks on CUDA).

Every ATen op the models run is counted with the bytes of its tensor inputs and
outputs (a kernel reads and writes each at least once; a broadcast operand once, an
embedding lookup the rows it gathers); views and uninitialised allocations are not
launches and are left out (a filled one, ``zeros`` or ``arange``, is a launch). The
fused layer ops cannot run on the meta device: they are counted as the kernels they
launch, each reading and writing its tensors once.
Ops fall into three groups:

- projections: ``mm`` / ``addmm`` (the linear layers' GEMMs; fused, a gated MLP's gate and
  up projections run as one, and so do an attention's q, k and v projections, and the
  down projection accumulates into the residual in place, ``addmm_``),
  and a ``bmm`` with a batch-broadcast operand (a shared weight: the output head on
  the response rows);
- attention: ``scaled_dot_product_attention``, counted as the fused kernel CUDA runs
  (forward: reads q, k, v and the mask, writes the output; backward: reads those and
  the output's gradient, writes dq, dk, dv), not as the math path the meta device has;
  what sdpa does to a mask before that kernel on every call (a bool mask made additive,
  rows padded to a stride of 8), and the copy its backward makes of an output gradient
  not laid out (B, T, H, D) as the output is, count as elementwise;
- elementwise: everything else (norms, rotary embedding, gated activation, residual
  adds, casts, copies), and the fused kernels.

    python bench/layer_traffic.py                   # both presets
    python bench/layer_traffic.py --preset 4xK4-1.7b
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import math
import os
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# The fused kernels never launch here (meta stand-ins count them); the interpreter flag
# lets the triton backend accept the meta device's tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")

import entrgi.lean  # noqa: E402
import entrgi.normed_attention  # noqa: E402
import entrgi.sdpa  # noqa: E402
from entrgi.layers import swapped_attributes  # noqa: E402
from entrgi.lean import ROTARY  # noqa: E402
from entrgi.benchmark import PEAK_BYTES_PER_S  # noqa: E402
from entrgi.step_benchmark import PRESETS, StepOptions, build_models  # noqa: E402
from entrgi.step_floor import DTYPE, META, denoiser_flops, reward_call  # noqa: E402
from entrgi_kernels import rms_norm, rotary, silu_gate  # noqa: E402

MODES = ("stock", "lean", "fused")
PROJECTIONS = {"mm", "addmm", "addmm_", "bmm (shared weight)"}
ATTENTION = {"attention forward", "attention backward"}
NOT_LAUNCHES = {
    "view", "_unsafe_view", "t", "transpose", "expand", "slice", "unsqueeze", "squeeze", "as_strided", "detach",
    "alias", "permute", "select", "split", "split_with_sizes", "unbind", "lift_fresh", "empty", "empty_strided", "new_empty",
    "new_empty_strided", "empty_like", "empty_permuted",
}  # fmt: skip
WRITE_ONLY = {"copy_", "fill_", "zero_"}  # in-place ops that write their first argument without reading it


def distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of ``t``'s distinct elements (a broadcast dimension has stride 0)."""
    return t.element_size() * math.prod(size for size, stride in zip(t.shape, t.stride()) if stride != 0)


def op_name(func, tensors: list[torch.Tensor]) -> str:
    name = func.overloadpacket.__name__
    if name == "bmm" and any(0 in t.stride() for t in tensors[:2]):
        return "bmm (shared weight)"
    return name


def group(op: str) -> str:
    if op in PROJECTIONS:
        return "projections"
    return "attention" if op in ATTENTION else "elementwise"


class Traffic(TorchDispatchMode):
    """Launches and bytes per op while active; :meth:`add` counts a fused kernel (only
    while active too: a cached prefix is built outside the counted call)."""

    def __init__(self):
        super().__init__()
        self.launches: collections.Counter = collections.Counter()
        self.nbytes: collections.Counter = collections.Counter()
        self.active = False

    def __enter__(self):
        self.active = True
        return super().__enter__()

    def __exit__(self, *exc):
        self.active = False
        return super().__exit__(*exc)

    def add(self, name: str, tensors) -> None:
        if not self.active:
            return
        self.launches[name] += 1
        self.nbytes[name] += sum(distinct_bytes(t) for t in tensors)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in NOT_LAUNCHES:
            return out
        if func.overloadpacket.__name__ == "embedding":  # reads the rows it writes, not the table
            self.add("embedding", [args[1], out, out])
            return out
        if func.overloadpacket.__name__ in WRITE_ONLY:  # the destination (args[0], the output too) is not read
            args = args[1:]
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        if tensors:  # an op on scalars and dtypes alone (promote_types) runs on the host
            self.add(op_name(func, tensors), tensors)
        return out

    def by_group(self) -> dict[str, tuple[int, float]]:
        totals = {name: [0, 0.0] for name in ("projections", "attention", "elementwise")}
        for op, launches in self.launches.items():
            totals[group(op)][0] += launches
            totals[group(op)][1] += self.nbytes[op]
        return {name: (launches, nbytes) for name, (launches, nbytes) in totals.items()}


@contextlib.contextmanager
def fused_kernels_counted(traffic: Traffic) -> Iterator[None]:
    """The fused layer ops' kernels as meta stand-ins that allocate their outputs and
    count what they read and write."""

    def norm_forward(x, weight, eps, branch=None, sum_copy=None):  # x: (outer, inner, width) rows
        rows = x.shape[0] * x.shape[1]
        y = torch.empty(rows, x.shape[-1], dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
        inv_rms = torch.empty(rows, device=x.device)
        total = None if branch is None else torch.empty(rows, x.shape[-1], dtype=x.dtype, device=x.device)
        added = [t for t in (branch, total, sum_copy) if t is not None]
        traffic.add("triton rms_norm forward", [x, weight, y, inv_rms, *added])
        return y, inv_rms, total

    def norm_backward(grad, x, weight, inv_rms, residual_grad=None):
        grad_x = torch.empty(grad.shape, dtype=x.dtype, device=x.device)
        added = [] if residual_grad is None else [residual_grad]
        traffic.add("triton rms_norm backward", [grad, x, weight, inv_rms, grad_x, *added])
        return grad_x

    def gate_forward(gate, up):
        out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
        traffic.add("triton silu_gate forward", [gate, up, out])
        return out

    def gate_backward(grad, gate, up, grad_gate, grad_up):
        traffic.add("triton silu_gate backward", [grad, gate, up, grad_gate, grad_up])

    def rotate(q, k, cos, sin, q_out, k_out, backward=False, norms=None):
        # with the head norms: their weights and 1 / rms per row, and backward the forward's q and k
        normed = [] if norms is None else [t for t in (*norms[:2], *norms[3:]) if t is not None]
        name = "triton rotary" if norms is None else "triton normed rotary"
        traffic.add(f"{name} {'backward' if backward else 'forward'}", [q, k, cos, sin, q_out, k_out, *normed])
        return q_out, k_out

    patches = [
        (rms_norm, "rms_norm_forward", norm_forward),
        (rms_norm, "rms_norm_backward", norm_backward),
        (silu_gate, "silu_gate_forward", gate_forward),
        (silu_gate, "silu_gate_backward", gate_backward),
        (rotary, "rotary", rotate),
    ]
    with swapped_attributes(patches):
        yield


class _Attention(torch.autograd.Function):
    """Scaled-dot-product attention as one fused kernel each way, counted into
    ``traffic`` (meta outputs: no numbers)."""

    @staticmethod
    def forward(ctx, traffic, query, key, value, mask):
        batch, heads, length, _ = query.shape  # laid out (B, T, H, D_v), as the memory-efficient kernel writes it
        out = query.new_empty(batch, length, heads, value.shape[-1]).transpose(1, 2)
        traffic.add("attention forward", [query, key, value, *([] if mask is None else [mask]), out])
        ctx.traffic, ctx.mask = traffic, mask
        ctx.save_for_backward(query, key, value, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, out = ctx.saved_tensors
        # laid out (B, T, H, D), whatever the inputs' layout, as PyTorch's memory-efficient backward writes them
        grads = tuple(torch.empty_permuted(t.shape, (0, 2, 1, 3), dtype=t.dtype, device=t.device)
                      for t in (query, key, value))  # fmt: skip
        if not grad.transpose(1, 2).is_contiguous():  # it reads dL/d(out) in (B, T, H, D) order, copying any other
            laid_out = torch.empty_permuted(grad.shape, (0, 2, 1, 3), dtype=grad.dtype, device=grad.device)
            ctx.traffic.add("attention output-gradient copy", [grad, laid_out])
            grad = laid_out
        mask = [] if ctx.mask is None else [ctx.mask]
        ctx.traffic.add("attention backward", [query, key, value, *mask, out, grad, *grads])
        return None, *grads, None


class _FusedAttention(torch.overrides.TorchFunctionMode):
    def __init__(self, traffic: Traffic):
        super().__init__()
        self.traffic = traffic

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is not torch.nn.functional.scaled_dot_product_attention:
            return func(*args, **(kwargs or {}))
        kwargs = dict(kwargs or {})
        query, key, value = args[:3]
        mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
        if kwargs.get("enable_gqa"):  # the kernel reads the shared heads; the output has the query's
            key, value = (t.repeat_interleave(query.shape[-3] // t.shape[-3], dim=-3) for t in (key, value))
        if mask is not None and mask.dtype == torch.bool:  # sdpa makes it additive on every call
            additive = torch.empty(mask.shape, dtype=query.dtype, device=mask.device)
            self.traffic.add("attention mask to additive", [mask, additive])
            mask = additive
        if mask is not None and any(stride % 8 for stride in mask.stride()[:-1]):  # and pads rows to an aligned stride
            keys = mask.shape[-1]
            padded = mask.new_empty(*mask.shape[:-1], -(-keys // 8) * 8)[..., :keys]
            self.traffic.add("attention mask padding", [mask, padded])
            mask = padded
        return _Attention.apply(self.traffic, query, key, value, mask)


def _accept(*args, **kwargs) -> bool:
    return True


def _lean_swaps(model: torch.nn.Module, backend: str) -> list[tuple[object, str, object]]:
    """``model``'s lean forwards, (triton) normed-rotary attention forwards, fused rotary
    functions and folded sdpa attention as attribute swaps, accepted unchecked (meta
    tensors hold no numbers)."""
    checks = ("_reproduces", "_projections_reproduce", "_layer_reproduces", "_rotary_reproduces")
    unchecked = [(entrgi.lean, check, _accept) for check in checks] + [
        (entrgi.sdpa, "folded_sdpa_reproduces", _accept),
        (entrgi.normed_attention, "_normed_attention_reproduces", _accept),
    ]
    with swapped_attributes(unchecked):
        lean = entrgi.lean.lean_forwards(model, backend) + entrgi.normed_attention.normed_attention_forwards(
            model, backend
        )
        forwards = [(module, "forward", forward) for module, forward in lean]
        rotary = [(module, ROTARY, fused) for module, fused in entrgi.lean.rotary_swaps(model, backend)]
        folded = [entrgi.sdpa.folded_sdpa_swap()] if entrgi.sdpa.folded_sdpa_fits(model, backend) else []
        return forwards + rotary + folded


def count(preset: str, mode: str, new_tokens: int = 128) -> dict[str, Traffic]:
    """Traffic of one reward forward + backward (prefix cached) and one denoiser
    forward of ``preset``, their layers run in ``mode``."""
    traffic = {"reward fwd+bwd": Traffic(), "denoiser forward": Traffic()}
    stock = StepOptions(reward_cache_prefix=True, reward_lean=False, denoiser_fused=False)
    denoiser, reward = build_models(preset, META, DTYPE, stock)
    rows = PRESETS[preset][2] * PRESETS[preset][3]
    for part, model in (("reward fwd+bwd", reward.model), ("denoiser forward", denoiser.model)):
        swaps = [] if mode == "stock" else _lean_swaps(model, "torch" if mode == "lean" else "triton")
        stand_ins = fused_kernels_counted(traffic[part]) if mode == "fused" else contextlib.nullcontext()
        with stand_ins, swapped_attributes(swaps):
            if part == "reward fwd+bwd":
                call = reward_call(reward, rows, new_tokens)  # builds the cached prefix: not counted
                with traffic[part], _FusedAttention(traffic[part]):
                    call()
            else:
                with traffic[part], _FusedAttention(traffic[part]):
                    denoiser_flops(denoiser, rows, new_tokens)
    return traffic


def format_traffic(preset: str, counts: dict[str, dict[str, Traffic]]) -> str:
    lines = [f"| {preset} | group | " + " | ".join(f"{m} launches | {m} GB" for m in MODES) + " | GB saved, fused vs lean "
             "| ms at 3.0 TB/s |", "|---|---|" + "---|---|" * len(MODES) + "---|---|"]  # fmt: skip
    for part in counts["stock"]:
        groups = {mode: counts[mode][part].by_group() for mode in MODES}
        for name in groups["stock"]:
            cells = " | ".join(f"{groups[m][name][0]:,} | {groups[m][name][1] / 1e9:.2f}" for m in MODES)
            saved = (groups["lean"][name][1] - groups["fused"][name][1]) / 1e9
            lines.append(f"| {part} | {name} | {cells} | {saved:.2f} | {saved * 1e12 / PEAK_BYTES_PER_S:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", nargs="+", default=[p for p in PRESETS if p != "tiny"], choices=list(PRESETS))
    args = parser.parse_args()
    for preset in args.preset:
        print(format_traffic(preset, {mode: count(preset, mode) for mode in MODES}) + "\n")


if __name__ == "__main__":
    main()
