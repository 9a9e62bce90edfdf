"""Argument checks shared by the public ops. Every error names the offending value."""

from __future__ import annotations

import math
from numbers import Real

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BACKENDS = ("auto", "torch", "triton")
# the kernels scale logits by 1/temperature in float32, which must stay finite
MIN_TEMPERATURE = 1.0 / torch.finfo(torch.float32).max


def check_sampling_args(temperature: float, top_p: float, top_k: int) -> None:
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        # a tensor would need a host read to pick the kernels' path
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
    if not (temperature == 0 or MIN_TEMPERATURE <= temperature < math.inf):
        raise ValueError(f"temperature must be 0 (greedy) or finite and >= {MIN_TEMPERATURE:.3g} (1/temperature "
                         f"scales the logits in float32), got {temperature}")  # fmt: skip
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {choices}")


def check_logits(name: str, phi: torch.Tensor) -> None:
    if not isinstance(phi, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(phi).__name__}")
    if phi.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {phi.dtype}")
    if phi.dim() < 1 or phi.shape[-1] < 2:
        raise ValueError(f"{name} must have shape (..., V) with V >= 2, got {tuple(phi.shape)}")


def check_embed_table(phi: torch.Tensor, embed_table: torch.Tensor, table_rows: torch.Tensor | None = None) -> None:
    """``embed_table`` (V, d) in phi's vocabulary, or (V_t, d) indexed through
    ``table_rows`` (V,) int32/int64 (values in [0, V_t) are checked by
    :func:`check_table_rows_range`, which reads them back)."""
    if not isinstance(embed_table, torch.Tensor):
        raise TypeError(f"embed_table must be a torch.Tensor, got {type(embed_table).__name__}")
    if embed_table.dim() != 2 or embed_table.shape[1] == 0:
        raise ValueError(f"embed_table must have shape (V, d) with d >= 1, got {tuple(embed_table.shape)}")
    if embed_table.dtype not in FLOAT_DTYPES:
        raise TypeError(f"embed_table must be float32, bfloat16 or float16, got {embed_table.dtype}")
    if embed_table.device != phi.device:
        raise ValueError(f"phi is on {phi.device} but embed_table is on {embed_table.device}")
    if table_rows is None:
        if embed_table.shape[0] != phi.shape[-1]:
            raise ValueError(
                f"vocabulary size mismatch: phi has V={phi.shape[-1]} but embed_table has {embed_table.shape[0]} rows"
            )
        return
    if not isinstance(table_rows, torch.Tensor) or table_rows.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"table_rows must be an int32/int64 tensor, got {getattr(table_rows, 'dtype', table_rows)}")
    if table_rows.shape != (phi.shape[-1],):
        raise ValueError(f"table_rows must have shape (V,) = ({phi.shape[-1]},), got {tuple(table_rows.shape)}")
    if table_rows.device != phi.device:
        raise ValueError(f"phi is on {phi.device} but table_rows is on {table_rows.device}")


def check_table_rows_range(table_rows: torch.Tensor, embed_table: torch.Tensor) -> None:
    """Every entry of ``table_rows`` names a row of ``embed_table``. Reads values back
    (host sync): call it at API boundaries, not inside a captured step."""
    low, high = table_rows.min().item(), table_rows.max().item()
    if low < 0 or high >= embed_table.shape[0]:
        raise ValueError(f"table_rows values must lie in [0, {embed_table.shape[0]}), got [{low}, {high}]")


def _rows_where(bad: torch.Tensor) -> str:
    """'k of n rows, the first at index (i, ...)' for a bool tensor ``bad`` of the rows'
    leading shape (a host sync)."""
    count, first = int(bad.sum()), bad.flatten().nonzero()[0, 0].item()
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), bad.shape))
    return f"{count} of {bad.numel()} rows, the first at index {index}"


def check_finite_table(embed_table: torch.Tensor) -> None:
    """Reject NaN / inf embeddings (they would reach every output row through soft).
    Reads values back (host sync)."""
    if not (finite := torch.isfinite(embed_table).all(-1)).all():
        raise ValueError(f"embed_table {tuple(embed_table.shape)} contains NaN or inf: {_rows_where(~finite)}")


def check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    """``generator`` is None or a ``torch.Generator`` on phi's device type."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but phi is on {device}")


def check_active(active: torch.Tensor | None, phi: torch.Tensor, name: str = "phi") -> None:
    """``active`` is None or a bool mask over the rows (leading dims) of ``phi``, called ``name``."""
    if active is None:
        return
    if not isinstance(active, torch.Tensor) or active.dtype != torch.bool:
        raise TypeError(f"active must be a bool tensor, got {getattr(active, 'dtype', type(active).__name__)}")
    if active.shape != phi.shape[:-1]:
        raise ValueError(f"active shape {tuple(active.shape)} != {name}'s leading shape {tuple(phi.shape[:-1])}")
    if active.device != phi.device:
        raise ValueError(f"{name} is on {phi.device} but active is on {active.device}")


def check_finite_rows(name: str, phi: torch.Tensor, temperature: float = 1.0) -> None:
    """Reject NaN, +inf (softmax is undefined there), rows without any finite logit and
    rows whose largest logit divided by ``temperature`` (> 0) overflows float32 (the
    softmax's shift); -inf entries are allowed (tokens with no mass). Reads values back
    (host sync): call it at API boundaries, not inside a captured step."""
    if (nan_rows := torch.isnan(phi).any(-1)).any():
        raise ValueError(f"{name} contains NaN: {_rows_where(nan_rows)}")
    if (inf_rows := torch.isposinf(phi).any(-1)).any():
        raise ValueError(f"{name} contains +inf ({_rows_where(inf_rows)}): logits must be finite or -inf")
    if phi.numel() and not (finite := torch.isfinite(phi).any(dim=-1)).all():
        raise ValueError(f"{name} has rows with no finite logit (all -inf; {_rows_where(~finite)}): "
                         "no valid mass to sample")  # fmt: skip
    if temperature > 0 and phi.numel() and (overflow := (phi.amax(-1).float() / temperature).isinf()).any():
        bound = temperature * torch.finfo(torch.float32).max
        raise ValueError(f"{name} / temperature overflows float32 ({_rows_where(overflow)}): at temperature "
                         f"{temperature} a row's largest logit must be below {bound:.3g} in magnitude")  # fmt: skip


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` -> ``triton`` on CUDA when Triton imports, else ``torch``; ``triton``
    off CUDA needs the interpreter (``TRITON_INTERPRET=1``)."""
    check_choice("backend", backend, BACKENDS)
    if backend == "triton":
        from entrgi_kernels.launch import can_launch

        if not can_launch(device):
            raise ValueError(
                f"backend='triton' needs CUDA tensors, got {device} (on a CPU, TRITON_INTERPRET=1 set before "
                "triton is imported runs the kernels in Triton's interpreter: slow, for tests)"
            )
    if backend != "auto":
        return backend
    if device.type == "cuda":
        from entrgi.ops import triton_backend

        if triton_backend.available():
            return "triton"
    return "torch"


def check_optimizer_over(optimizer, phi: torch.Tensor, temperature: float) -> None:
    """``guided_embedding(optimizer=)``: the optimizer must own phi, and phi must carry a gradient."""
    param = getattr(optimizer, "param", None)
    if param is None or param.data_ptr() != phi.data_ptr() or param.shape != phi.shape:
        raise ValueError(f"optimizer must be a LogitAdam over phi itself (shape {tuple(phi.shape)})")
    if not phi.requires_grad:
        raise ValueError("optimizer= needs phi to require grad: its backward takes the optimizer's step")
    if temperature == 0.0:
        raise ValueError("optimizer= with temperature 0: the greedy embedding has no gradient to step on")
