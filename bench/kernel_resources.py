"""Compile every Triton kernel the ops launch for a CUDA GPU, on a machine without one,
and report each kernel's registers, spills, shared memory, warps, resident blocks per SM,
the machine instructions of its hot loop and the layout conversions inside its loops.

    python bench/kernel_resources.py                         # sm_90 (H100 / H200)
    python bench/kernel_resources.py --arch 80               # A100
    python bench/kernel_resources.py --max-spill-bytes 128   # also fail on spills

The public ops run on CPU tensors at the GPU tile configs and an H100's SM count
(``TRITON_INTERPRET`` must be unset) while a stand-in Triton driver names the target
and turns every launch into a compile-only warm-up; the ``ptxas -v`` log of Triton's
own compile (its ptxas and options for the target: triton 3.9 assembles sm_90 with
CUDA 13's) reports registers and spills, ``nvdisasm`` the instructions one thread issues
per iteration of the kernel's longest loop (a static count: what bounds a
compute-bound pass; blocks inside it that a branch can skip are also counted apart,
so the loop minus them is the common iteration's cost), and Triton's GPU IR the register-layout conversions its loops
run (each moves a tile through shared memory between barriers, where a layout the
compiler could not carry through the loop meets another). This catches before a GPU
is at hand what the interpreter cannot: code the compiler rejects, register spills,
shared memory beyond the chip. Exits nonzero when a kernel of ``kernels/`` was never
compiled, one needs more shared memory than the chip has, one spills more than
``--max-spill-bytes``, or a launch leaves its floating-point contraction to Triton's
default (``enable_fp_fusion``, which Triton 3.10 changes).
Kernel outputs are never computed: the ops go on with zeroed integer outputs and
unset floats, so only the launches matter, not the values.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

import entrgi
from entrgi.ops import entropy_confidence
from entrgi.ops.layer_ops import (
    add_rms_norm, add_rms_norm_writable, merged_silu_gate, normed_rotary_embedding, rms_norm, rms_norm_with_residual,
    rotary_embedding, silu_gate,
)  # fmt: skip
from entrgi.ops.step import STEP_ALGS
from entrgi.optim import LogitAdam
from entrgi_kernels import row_stats, soft_embedding
from entrgi_kernels.launch import INTERPRET

KERNELS_DIR = Path(__file__).resolve().parents[1] / "kernels"
SPLIT_MODULES = (row_stats, soft_embedding)  # size every split-V grid from the SM count
STREAMING_MULTIPROCESSORS = 132  # an H100 SXM
VOCAB, DIM, ROWS = 152_064, 1024, 64
PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")


@dataclass(frozen=True)
class SmLimits:
    """Resources of one SM of a compute capability (CUDA programming guide, technical
    specifications): shared bytes one block may opt into and the SM holds, resident
    warps and blocks, 32-bit registers."""

    block_shared: int
    sm_shared: int
    warps: int
    blocks: int
    registers: int = 65_536


RESERVED_SHARED_PER_BLOCK = 1024
SM_LIMITS = {
    80: SmLimits(block_shared=166_912, sm_shared=167_936, warps=64, blocks=32),
    86: SmLimits(block_shared=101_376, sm_shared=102_400, warps=48, blocks=16),
    89: SmLimits(block_shared=101_376, sm_shared=102_400, warps=48, blocks=24),
    90: SmLimits(block_shared=232_448, sm_shared=233_472, warps=64, blocks=32),
}
SASS_LABEL = re.compile(r"^(\.L_x_\d+):")
SASS_INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]+\*/\s")
SASS_BRANCH = re.compile(r"\bBRA\b.*?(\.L_x_\d+)")
SASS_PREDICATED = re.compile(r"\*/\s+@!?U?P\w*\s")
TTGIR_LOOP = re.compile(r"\bscf\.for\b.*\{$")


@dataclass(frozen=True)
class KernelResources:
    """One compiled kernel; spill and stack sizes are bytes per thread."""

    name: str
    specialisation: str
    num_warps: int
    num_stages: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int
    loop_instructions: int = 0
    loop_conditional: int = 0  # of the loop's instructions, those in blocks a branch can skip
    loop_conversions: int = 0

    def blocks_per_sm(self, limits: SmLimits) -> int:
        """Resident blocks per SM that registers, shared memory, warps and the block cap
        allow (registers allocated per warp in units of 256; the system keeps 1 KiB of
        shared memory per block)."""
        per_warp = -(-self.registers * 32 // 256) * 256
        by_registers = limits.registers // (per_warp * self.num_warps)
        by_shared = limits.sm_shared // (self.shared + RESERVED_SHARED_PER_BLOCK)
        return min(by_registers, by_shared, limits.warps // self.num_warps, limits.blocks)


class _CompileOnlyDriver:
    """The parts of a Triton driver that ``JITFunction.run`` reads, for a GPU that is not here."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def _specialisation(source) -> str:
    """'first_ptr dtype; NAME=value ...': what tells a kernel's compiled variants apart
    (the first argument's dtype and the constexpr values, integers equal to 1 included)."""
    names = list(source.signature)
    constants = " ".join(f"{names[key[0]]}={value}" for key, value in sorted(source.constants.items()))
    return f"{names[0]} {source.signature[names[0]]}; {constants}"


@contextlib.contextmanager
def compile_only(arch: int):
    """Within: every kernel launch compiles for sm_``arch`` and launches nothing; yields
    the list that collects (kernel name, specialisation, compiled kernel, ptxas log).
    Every kernel is compiled afresh (not read from Triton's cache), so that its ptxas
    log is printed, and caught; a launch served from the in-memory cache has none."""
    if INTERPRET:
        raise RuntimeError("unset TRITON_INTERPRET: the kernels must be compiled, not interpreted")
    compiled = []
    launch = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        if "enable_fp_fusion" not in kwargs:  # else its rounding would follow the Triton version's default
            raise RuntimeError(f"{self.fn.__name__} launched without enable_fp_fusion=FP_FUSION (kernels/launch.py)")
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, _specialisation(kernel.src), kernel, log.getvalue()))
        for arg in args:  # outputs read later as indices must be in range
            if isinstance(arg, torch.Tensor) and not arg.is_floating_point():
                arg.zero_()
        return kernel

    previous = driver._active  # None without a GPU: reset_active() would look for one
    fill = {module: module.programs_to_fill for module in SPLIT_MODULES}
    driver.set_active(_CompileOnlyDriver(arch))
    JITFunction.run = run
    for module in SPLIT_MODULES:  # split V as on a GPU (off one, launch.py keeps one program per row)
        module.programs_to_fill = lambda device, per_sm: per_sm * STREAMING_MULTIPROCESSORS
    try:
        with knobs.compilation.scope(), knobs.nvidia.scope():
            knobs.compilation.always_compile = True
            knobs.nvidia.dump_ptxas_log = True
            yield compiled
    finally:
        JITFunction.run = launch
        driver.set_active(previous)
        for module, programs_to_fill in fill.items():
            module.programs_to_fill = programs_to_fill


def exercise_ops() -> None:
    """Every launch path of the ops: guided_embedding (each mode, bf16, fp16 and fp32
    phi, with and without active rows, a gathered table, a vocabulary that does not fill
    whole tiles, the backward with and without the fused Adam step, bf16 moments),
    sample_step (each alg, greedy too), entropy_confidence, LogitAdam (stored and
    recomputed moments), and the layer ops a reward's and a denoiser's layers run
    (rms_norm at a Qwen head's, Qwen3-1.7B's and Qwen2-7B's widths, silu_gate at
    Qwen3-1.7B's width and merged_silu_gate at Qwen3-0.6B's (another block), add_rms_norm,
    add_rms_norm_writable and rms_norm_with_residual (the residual-add variants), rotary_embedding
    and normed_rotary_embedding (its variant with the head norms); forward and backward)."""
    table = torch.randn(VOCAB, DIM, dtype=torch.bfloat16)
    table_rows = torch.arange(VOCAB)
    active = torch.arange(ROWS) % 3 > 0
    grad = torch.randn(ROWS, DIM, dtype=torch.bfloat16)
    sampling = dict(temperature=0.7, top_p=0.95, top_k=50)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        phi = torch.randn(ROWS, VOCAB).to(dtype)
        variants = (("entrgi", active, None), ("entrgi", None, None), ("expectation", active, None),
                    ("entrgi", None, table_rows))  # fmt: skip
        for mode, rows, gather in variants:
            leaf = phi.clone().requires_grad_(True)
            out = entrgi.guided_embedding(leaf, table, mode=mode, backend="triton", active=rows, table_rows=gather,
                                          **sampling)  # fmt: skip
            out.embeds.backward(grad)
        entrgi.guided_embedding(phi, table, backend="triton", temperature=0.0)
        for alg in STEP_ALGS:
            for temperature in (0.7, 0.0):
                entrgi.sample_step(phi, phi * 0.5, alg=alg, backend="triton", active=active,
                                   **{**sampling, "temperature": temperature})  # fmt: skip
        entropy_confidence(phi, temperature=0.7, backend="triton", active=active)
    odd = torch.randn(ROWS, VOCAB - 16).to(torch.bfloat16).requires_grad_(True)  # not whole tiles: masked loads
    entrgi.guided_embedding(odd, table[:-16], backend="triton", **sampling).embeds.backward(grad)
    for moment_dtype in (torch.float32, torch.bfloat16):
        phi = torch.randn(ROWS, VOCAB, requires_grad=True)
        optimizer = LogitAdam(phi, lr=0.5, active=active, backend="triton", moment_dtype=moment_dtype)
        out = entrgi.guided_embedding(phi, table, backend="triton", active=active, optimizer=optimizer, **sampling)
        out.embeds.backward(grad)
        optimizer.step(torch.randn_like(phi))
    for gather in (None, table_rows):  # Adam recomputed from bf16 initial logits (no moments stored)
        initial = torch.randn(ROWS, VOCAB).to(torch.bfloat16)
        phi = initial.float().requires_grad_(True)
        optimizer = LogitAdam(phi, lr=0.5, active=active, backend="triton", replay_from=initial, max_steps=2)
        for _ in range(2):  # Triton specialises an int argument of 1: steps 1 and 2 compile apart
            out = entrgi.guided_embedding(phi, table, backend="triton", active=active, optimizer=optimizer,
                                          table_rows=gather, **sampling)  # fmt: skip
            out.embeds.backward(grad)
    for dtype in (torch.bfloat16, torch.float32):
        for width in (128, 2048, 3584):
            x = torch.randn(ROWS, width).to(dtype).requires_grad_(True)
            rms_norm(x, torch.randn(width).to(dtype), 1e-6, backend="triton").backward(torch.randn_like(x))
        residual, branch = (torch.randn(ROWS, 2048).to(dtype).requires_grad_(True) for _ in range(2))
        torch.autograd.backward(  # the norm kernels' residual-add variants
            [*add_rms_norm(residual, branch, torch.randn(2048).to(dtype), 1e-6, backend="triton"),
             *add_rms_norm_writable(residual, branch, torch.randn(2048).to(dtype), 1e-6, backend="triton"),
             *rms_norm_with_residual(residual, torch.randn(2048).to(dtype), 1e-6, backend="triton")],
            [torch.randn_like(residual) for _ in range(6)],
        )  # fmt: skip
        gate, up = (torch.randn(ROWS, 6144).to(dtype).requires_grad_(True) for _ in range(2))
        silu_gate(gate, up, backend="triton").backward(torch.randn_like(gate))
        gate_up = torch.randn(ROWS, 2 * 3072).to(dtype).requires_grad_(True)
        merged_silu_gate(gate_up, backend="triton").backward(torch.randn(ROWS, 3072).to(dtype))
        q, k = (torch.randn(2, ROWS, heads, 128).to(dtype).transpose(1, 2).requires_grad_(True) for heads in (16, 8))
        cos = torch.randn(2, ROWS, 128).to(dtype)
        weight = torch.randn(128).to(dtype)
        for rotated in (
            rotary_embedding(q, k, cos, cos, backend="triton"),
            rotary_embedding(q, k, cos.float(), cos.float(), backend="triton"),  # LLaDA's float32 rotation
            normed_rotary_embedding(q, k, cos, cos, weight, weight, 1e-6, backend="triton"),
        ):
            torch.autograd.backward(rotated, [torch.randn_like(q), torch.randn_like(k)])


def declared_kernels() -> set[str]:
    """Names of the ``@triton.jit`` functions in kernels/ that end in ``_kernel`` (the
    launched ones; the others are inlined helpers)."""
    names = set()
    for path in KERNELS_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel"):
                names.add(node.name)
    return names


def longest_loop(sass: str) -> tuple[int, int]:
    """(instructions in the longest loop body of ``nvdisasm`` output, a branch back to an
    earlier label: a thread's static cost of one hot-loop iteration; of which a
    predicated forward branch inside the body can skip: conditional blocks, such as a
    rescale that runs only when a tile raises the running maximum). (0, 0) without a
    loop."""
    labels: dict[str, int] = {}
    branches: list[tuple[int, str, bool]] = []  # (instructions up to and with the branch, target, predicated)
    count = 0
    for line in sass.splitlines():
        label = SASS_LABEL.match(line)
        if label:
            labels[label.group(1)] = count
        elif SASS_INSTRUCTION.match(line):
            count += 1
            branch = SASS_BRANCH.search(line)
            if branch:
                branches.append((count, branch.group(1), bool(SASS_PREDICATED.search(line))))
    loops = [(labels[target], at) for at, target, _ in branches if labels.get(target, at) < at]
    if not loops:
        return 0, 0
    start, end = max(loops, key=lambda loop: loop[1] - loop[0])
    skippable: set[int] = set()
    for at, target, predicated in branches:
        if predicated and start < at and at <= labels.get(target, -1) <= end:
            skippable.update(range(at, labels[target]))
    return end - start, len(skippable)


def loop_conversions(ttgir: str) -> int:
    """``ttg.convert_layout`` operations inside the ``scf.for`` loops of a kernel's Triton
    GPU IR (nested loops count once)."""
    count, open_loops = 0, []  # the indentation of each loop whose body is being read
    for line in ttgir.splitlines():
        text, indent = line.strip(), len(line) - len(line.lstrip())
        if open_loops and text.startswith("}") and indent == open_loops[-1]:
            open_loops.pop()
        elif TTGIR_LOOP.search(text):
            open_loops.append(indent)
        elif open_loops and "ttg.convert_layout" in text:
            count += 1
    return count


def _sass(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as binary:
        binary.write(cubin)
        binary.flush()
        return subprocess.run([knobs.nvidia.nvdisasm.path, "-c", binary.name], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip


def resources(name: str, specialisation: str, kernel, ptxas_log: str) -> KernelResources:
    """Registers and spills as the ``ptxas -v`` log of the kernel's compile reports them;
    the hot loop's size from the kernel's machine code, its loops' layout conversions
    from its Triton GPU IR."""
    frame, registers = PTXAS_FRAME.search(ptxas_log), PTXAS_REGISTERS.search(ptxas_log)
    if frame is None or registers is None:
        raise RuntimeError(f"no register and spill report in the ptxas log of {name} ({specialisation}): {ptxas_log!r}")
    stack, stores, loads = (int(x) for x in frame.groups())
    registers = int(registers.group(1))
    meta = kernel.metadata
    return KernelResources(name, specialisation, meta.num_warps, meta.num_stages, registers, stores, loads, stack,
                           meta.shared, *longest_loop(_sass(kernel.asm["cubin"])),
                           loop_conversions(kernel.asm["ttgir"]))  # fmt: skip


def collect(arch: int) -> list[KernelResources]:
    """Compile every launch of :func:`exercise_ops` for sm_``arch``: one row per distinct
    compiled kernel, sorted by name."""
    with compile_only(arch) as compiled:
        exercise_ops()
    unique = {}
    for entry in compiled:  # the first launch of a kernel compiled it and has its log
        unique.setdefault(id(entry[2]), entry)
    return sorted((resources(*entry) for entry in unique.values()), key=lambda r: (r.name, r.specialisation))


def markdown(rows: list[KernelResources], arch: int) -> str:
    limits = SM_LIMITS[arch]
    lines = [
        f"| kernel (sm_{arch}) | specialisation | warps | stages | registers | spill stores B | spill loads B "
        "| stack B | shared KiB | blocks/SM | loop instrs | of which conditional | loop converts |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r.name} | {r.specialisation} | {r.num_warps} | {r.num_stages} | {r.registers} "
                     f"| {r.spill_stores} | {r.spill_loads} | {r.stack} | {r.shared / 1024:.1f} "
                     f"| {r.blocks_per_sm(limits)} | {r.loop_instructions} | {r.loop_conditional} "
                     f"| {r.loop_conversions} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SM_LIMITS),
                        help="compute capability x 10 (90: H100/H200)")  # fmt: skip
    parser.add_argument("--max-spill-bytes", type=int, default=None,
                        help="fail when a kernel spills more than this many bytes per thread")  # fmt: skip
    args = parser.parse_args()
    rows = collect(args.arch)
    print(f"triton {triton.__version__}, torch {torch.__version__}\n")
    print(markdown(rows, args.arch))
    missing = declared_kernels() - {r.name for r in rows}
    if missing:
        sys.exit(f"never compiled (add a launch path to exercise_ops): {sorted(missing)}")
    too_large = sorted({r.name for r in rows if r.shared > SM_LIMITS[args.arch].block_shared})
    if too_large:
        sys.exit(f"kernels needing more shared memory than sm_{args.arch} has: {too_large}")
    if args.max_spill_bytes is not None:
        spilling = sorted({f"{r.name} ({r.specialisation})" for r in rows if r.spill_stores > args.max_spill_bytes})
        if spilling:
            sys.exit(f"kernels spilling more than {args.max_spill_bytes} bytes per thread: {spilling}")


if __name__ == "__main__":
    main()
