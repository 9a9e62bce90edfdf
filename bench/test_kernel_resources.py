"""Every Triton kernel compiles for sm_90 (H100 / H200) with the GPU tile configs, on
this machine, without a GPU: ``bench/kernel_resources.py`` in a subprocess (the
kernels must be compiled, so TRITON_INTERPRET is unset there)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).with_name("kernel_resources.py")
try:
    import triton

    PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
except ImportError:
    PTXAS = None

needs_ptxas = pytest.mark.skipif(PTXAS is None or not PTXAS.exists(), reason="needs Triton's bundled ptxas")


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=900)


def _report():
    """bench/kernel_resources.py as a module (a script beside this file, not a package)."""
    sys.path.insert(0, str(TOOL.parent))
    try:
        import kernel_resources
    finally:
        sys.path.remove(str(TOOL.parent))
    return kernel_resources


def _table(stdout: str) -> list[dict[str, str]]:
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[1:]]


@needs_ptxas
def test_every_kernel_compiles_for_sm90_within_registers_and_shared_memory():
    result = _run([str(TOOL), "--max-spill-bytes", "128"])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    rows = _table(result.stdout)  # exit 0: every kernel of kernels/ is among them
    assert {"_soft_partial_kernel", "_digit_histogram_partial_kernel"} <= {r["kernel (sm_90)"] for r in rows}
    # the guidance loop's backward (fp32 phi, Adam fused) spills nothing at all
    backward = [r for r in rows if r["kernel (sm_90)"] == "_soft_embedding_bwd_kernel"]
    guidance = [r for r in backward if "ADAM=True" in r["specialisation"]]
    assert len(guidance) == 2 and all(r["spill stores B"] == "0" for r in guidance)  # fp32 and bf16 moments
    # the GEMM loops load without masks where V and D fill whole tiles: fewer instructions
    for name in ("_soft_partial_kernel", "_soft_embedding_bwd_kernel"):
        bf16 = [r for r in rows if r["kernel (sm_90)"] == name and "bf16" in r["specialisation"]
                and "ROW_LIST=False" in r["specialisation"] and "GATHER=False" in r["specialisation"]]  # fmt: skip
        loops = {flag: [int(r["loop instrs"]) for r in bf16 if f"EVEN={flag}" in r["specialisation"]]
                 for flag in (True, False)}  # fmt: skip
        assert loops[True] and loops[False] and max(loops[True]) < min(loops[False]), (name, loops)
    # every pass over the vocabulary loops over its tiles; the combines do not
    partials = [r for r in rows if r["kernel (sm_90)"].endswith("_partial_kernel")]
    assert partials and all(int(r["loop instrs"]) > 20 for r in partials)
    # the rejection sampler's pass over phi (what lies above each draw) and the row
    # statistics that give its draws their tile masses: one register layout through the
    # loop; the kept-set pass fits at least three 8-warp blocks per SM
    above = [r for r in rows if r["kernel (sm_90)"] == "_mass_above_partial_kernel"]
    assert above and all(r["loop converts"] == "0" and int(r["blocks/SM"]) >= 3 for r in above)
    stats = [r for r in rows if r["kernel (sm_90)"] == "_row_stats_partial_kernel"]
    assert any("TILES=True" in r["specialisation"] for r in stats) and all(r["loop converts"] == "0" for r in stats)
    # its rescale and argmax search run only in the iterations where a tile raises the
    # running maximum: a block of the loop that the others skip
    assert all(int(r["of which conditional"]) > int(r["loop instrs"]) // 4 for r in stats)


def test_longest_loop_counts_the_body_of_the_longest_backward_branch():
    longest_loop = _report().longest_loop
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   FFMA R2, R2, R3, R4 ;
        /*0020*/                   MUFU.EX2 R2, R2 ;
        /*0030*/               @P0 BRA `(.L_x_1) ;
.L_x_2:
        /*0040*/                   IADD3 R5, R5, 0x1, RZ ;
        /*0050*/              @!P1 BRA `(.L_x_2) ;
        /*0060*/                   BRA `(.L_x_3) ;
.L_x_3:
        /*0070*/                   EXIT ;
"""
    assert longest_loop(sass) == (3, 0)  # the forward branch to .L_x_3 is no loop
    assert longest_loop("        /*0000*/                   EXIT ;") == (0, 0)


def test_longest_loop_counts_apart_what_a_predicated_branch_inside_it_skips():
    longest_loop = _report().longest_loop
    sass = """
.L_x_1:
        /*0000*/                   FMNMX R2, R2, R3, !PT ;
        /*0010*/              @!P5 BRA `(.L_x_2) ;
        /*0020*/                   MUFU.EX2 R4, R4 ;
        /*0030*/                   FMUL R5, R5, R4 ;
.L_x_2:
        /*0040*/                   FFMA R6, R6, R7, R8 ;
        /*0050*/                   BRA `(.L_x_3) ;
        /*0060*/                   FADD R9, R9, R9 ;
.L_x_3:
        /*0070*/               @P0 BRA `(.L_x_1) ;
        /*0080*/               @P1 BRA `(.L_x_4) ;
.L_x_4:
        /*0090*/                   EXIT ;
"""
    # 8 in the loop; the two behind @!P5 are conditional, the one behind the
    # unconditional BRA is not (no iteration runs it), nor is a branch past the loop
    assert longest_loop(sass) == (8, 2)


def test_loop_conversions_count_only_what_loops_hold():
    loop_conversions = _report().loop_conversions
    ttgir = """
  tt.func public @k() {
    %a = ttg.convert_layout %x : tensor<64xf32, #blocked1> -> tensor<64xf32, #blocked>
    %r:2 = scf.for %i = %c0 to %n step %c64 iter_args(%s = %a) -> (tensor<64xf32, #blocked>)  : i32 {
      %b = ttg.convert_layout %s : tensor<64xf32, #blocked> -> tensor<64xf32, #blocked1>
      %q = scf.for %j = %c0 to %m step %c1 iter_args(%t = %b) -> (tensor<64xf32, #blocked1>)  : i32 {
        %c = ttg.convert_layout %t : tensor<64xf32, #blocked1> -> tensor<64xf32, #blocked>
        scf.yield %t : tensor<64xf32, #blocked1>
      } loc(#loc3)
      scf.yield %s : tensor<64xf32, #blocked>
    } loc(#loc2)
    %d = ttg.convert_layout %r : tensor<64xf32, #blocked> -> tensor<64xf32, #blocked1>
    tt.return
  } loc(#loc)
"""
    assert loop_conversions(ttgir) == 2  # %b and %c; %a and %d lie outside the loops


@needs_ptxas
def test_the_report_sees_the_spills_of_the_full_tile_with_adam():
    """The backward at BACKWARD_GPU (the bf16 tile) with the Adam epilogue spills KBs:
    the reason that path runs BACKWARD_GPU_HALF_TILE, and proof the report can fail."""
    script = f"""
import sys; sys.path.insert(0, {str(TOOL.parent)!r})
import torch
from kernel_resources import compile_only, resources
from entrgi_kernels.adam import AdamUpdate
from entrgi_kernels.row_stats import SoftmaxNorm
from entrgi_kernels.soft_embedding import BACKWARD_GPU, soft_embedding_backward
n, vocab, d = 128, 4096, 1024
phi = torch.randn(n, vocab)
adam = AdamUpdate(torch.zeros(n, vocab), torch.zeros(n, vocab), 1, 0.5, 0.9, 0.999, 1e-8)
table = torch.randn(vocab, d, dtype=torch.bfloat16)
with compile_only(90) as compiled:
    norm = SoftmaxNorm(torch.zeros(n), torch.zeros(n))
    soft_embedding_backward(phi, table, torch.randn(n, d), norm, torch.zeros(n, d), 0.7, adam=adam, config=BACKWARD_GPU)
print(resources(*compiled[-1]).spill_stores)
"""
    result = _run(["-c", script])
    assert result.returncode == 0, result.stderr[-4000:]
    assert int(result.stdout.split()[-1]) > 1000


@needs_ptxas
def test_a_launch_that_leaves_fp_contraction_to_triton_fails_the_report(tmp_path):
    """Every launch states enable_fp_fusion (kernels/launch.py): a kernel launched
    without it is named, and nothing is compiled for it."""
    script = tmp_path / "launch.py"  # a file: Triton reads a kernel's source
    script.write_text(f"""
import sys; sys.path.insert(0, {str(TOOL.parent)!r})
import torch, triton, triton.language as tl
from kernel_resources import compile_only

@triton.jit
def _scale_kernel(x_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(x_ptr + offsets, tl.load(x_ptr + offsets) * 2.0)

x = torch.randn(16)
with compile_only(90) as compiled:
    _scale_kernel[(1,)](x, BLOCK=16, enable_fp_fusion=True)
    print(len(compiled), "ptxas" in compiled[0][3])
    _scale_kernel[(1,)](x, BLOCK=16)
""")
    result = _run([str(script)])
    assert result.returncode != 0
    assert result.stdout.split() == ["1", "True"]  # the stated launch compiled, its ptxas log caught
    assert "_scale_kernel launched without enable_fp_fusion" in result.stderr


def test_blocks_per_sm_take_the_tightest_limit():
    report = _report()
    h100 = report.SM_LIMITS[90]
    kernel = lambda warps, registers, shared: report.KernelResources("k", "", warps, 3, registers, 0, 0, 0, shared)  # noqa: E731
    assert kernel(4, 255, 96 * 1024).blocks_per_sm(h100) == 2  # registers: 8192 per warp x 4 -> 2 of 65,536
    assert kernel(8, 80, 0).blocks_per_sm(h100) == 3  # 80 x 32 = 2560 per warp x 8 -> 3
    assert kernel(4, 32, 100 * 1024).blocks_per_sm(h100) == 2  # shared: 101 KiB with the reserved 1 KiB
    assert kernel(1, 16, 0).blocks_per_sm(h100) == 32  # the block cap
    assert kernel(16, 32, 0).blocks_per_sm(h100) == 4  # 64 warps
