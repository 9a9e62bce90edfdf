"""Launch geometry shared by the kernels.

Kernels split the vocabulary across programs when the rows alone would not fill the
GPU (flash-decoding): each program reduces one chunk of V and a small kernel combines
the chunks' partials in a fixed order (deterministic, no atomics).
"""

from __future__ import annotations

import functools
import os

import torch
import triton

# Under TRITON_INTERPRET=1 kernels run on the CPU one program at a time: callers pick
# small tiles there (and work around the interpreter's 16-bit dots).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Every launch passes enable_fp_fusion=FP_FUSION: a * b + c contracted into one fused
# multiply-add, as Triton 3.6-3.9 do by default, the way the kernels were checked and
# timed on GPUs. Triton 3.9 warns when a launch leaves it unset (3.10 stops contracting
# by default); stated here, the kernels' rounding does not change with the version.
FP_FUSION = True


def can_launch(device: torch.device) -> bool:
    """Whether the kernels can launch on tensors of ``device``: CUDA, the interpreter, or
    a Triton driver someone set active (bench/kernel_resources.py's compile-only one)."""
    if device.type == "cuda" or INTERPRET:
        return True
    from triton.runtime.driver import driver

    return driver._active is not None


@functools.lru_cache(maxsize=None)
def programs_to_fill(device: torch.device, per_sm: int) -> int:
    """``per_sm`` programs per streaming multiprocessor (4 off the GPU, where the
    interpreter runs programs one at a time)."""
    if device.type != "cuda":
        return 4
    return per_sm * torch.cuda.get_device_properties(device).multi_processor_count


def vocab_chunks(vocab: int, block_v: int, max_splits: int, splits: int | None = None) -> tuple[int, int]:
    """(splits, chunk): ``chunk`` entries of V per program, a multiple of ``block_v``,
    with at most ``max_splits`` programs per row (or ``splits`` when given)."""
    if splits is not None and splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    wanted = max(1, min(triton.cdiv(vocab, block_v), splits or max_splits))
    chunk = triton.cdiv(triton.cdiv(vocab, wanted), block_v) * block_v
    return triton.cdiv(vocab, chunk), chunk


def fewest_waves_splits(tiles: int, max_splits: int, slots: int) -> int:
    """Split count in [ceil(max_splits / 2), max_splits] for a grid of ``tiles`` x
    splits equal programs of which ``slots`` run at once: the one whose waves take the
    least time, ceil(tiles * s / slots) / s in units of one whole-V program (the fewest
    splits among equals). A last wave that holds a few programs costs as much as a
    full one: 16 tiles over 17 splits on 132 SMs make 272 programs, three waves of
    which the last holds 8; 16 splits make two full waves, 29% less time."""
    low = max(1, triton.cdiv(max_splits, 2))
    return min(range(low, max_splits + 1), key=lambda s: (triton.cdiv(tiles * s, slots) / s, s))
