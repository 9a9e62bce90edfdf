"""Where the fused op's time goes, kernel by kernel, and a tile sweep of the GEMM kernels.

    python bench/op_breakdown.py --n 512 2048 --d 1024 2048            # per-kernel table
    python bench/op_breakdown.py --n 512 --d 1024 --sweep              # + tile configs
    python bench/op_breakdown.py --n 2048 --d 2048 --dtype float32 --sweep   # + fused Adam tiles

Times are CUDA-event medians (``entrgi.benchmark.time_ms``); the floor of each kernel
is its ideal bytes over the measured copy bandwidth (or FLOPs over the bf16 peak). The
soft forward is also timed at two programs per SM along V ("S splits"), the split count
before it was rounded to whole waves, and the rejection sampler with its kept-set pass
at the per-row kernels' tile ("2048-token tile") instead of 1,024 tokens. "row_stats +
tile masses" is the statistics pass the op runs when it samples (the draws pick a tile
by them).
With ``--dtype float32`` (the guidance loop's phi) it also times the Adam step after a
stored dphi and the backward with the step fused in.
The GEMM kernels load every tile once per program that uses it: a V tile of phi once
per d block, a tile of E once per row block. Those loads come from L2 at best, so the
GEMM rows also give the bytes their programs load and store ("L2 GB") and the time that takes at
the L2 read bandwidth measured at the start ("at L2 ms"): a kernel near that time is
bound by L2, not by HBM or the tensor cores. GPU only.
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import torch
import triton
import triton.language as tl

from entrgi.benchmark import PEAK_BYTES_PER_S, PEAK_FLOP_PER_S, time_ms
from entrgi_kernels.adam import AdamUpdate, adam_step
from entrgi_kernels.launch import programs_to_fill
from entrgi_kernels.row_stats import ROW_BLOCK_V, row_stats
from entrgi_kernels.sampling import rejection_sample, sample_filtered
from entrgi_kernels.soft_embedding import (
    BACKWARD_GPU,
    BACKWARD_GPU_HALF_TILE,
    FORWARD_GPU,
    TileConfig,
    backward_config,
    soft_embedding_backward,
    soft_embedding_forward,
)
from entrgi_kernels.threshold import keep_threshold_keys

TAU, TOP_P = 0.7, 0.95


L2_PROBE_BYTES = 16 * 2**20  # well inside the L2 of an H100 (50 MB) or H200 (60 MB)
L2_PROBE_PASSES = 64


@triton.jit
def _l2_read_kernel(src_ptr, out_ptr, numel, passes, BLOCK: tl.constexpr):
    """Each program reads its strided share of ``src`` (numel a multiple of BLOCK) in
    ``passes`` passes, past L1 (.cg), and stores its (BLOCK,) fp32 sums."""
    program, programs = tl.program_id(0), tl.num_programs(0)
    offsets = tl.arange(0, BLOCK)
    total = tl.zeros((BLOCK,), tl.float32)
    for _ in range(passes):
        for start in range(program * BLOCK, numel, programs * BLOCK):
            total += tl.load(src_ptr + start + offsets, cache_modifier=".cg")
    tl.store(out_ptr + program * BLOCK + offsets, total)


def l2_read(src: torch.Tensor, passes: int, programs: int, block: int = 1024) -> torch.Tensor:
    """(programs, block) fp32 per-lane sums of ``passes`` reads of ``src`` (fp32, numel a
    multiple of ``block``): the L2 probe's kernel."""
    if src.dtype != torch.float32 or src.numel() % block:
        raise ValueError(f"src must be float32 with numel a multiple of {block}, got {src.dtype}, {src.numel()}")
    out = torch.empty(programs, block, device=src.device, dtype=torch.float32)
    _l2_read_kernel[(programs,)](src, out, src.numel(), passes, BLOCK=block, num_warps=4)
    return out


def l2_read_bandwidth(block: int = 1024) -> float:
    """Bytes per second read from an L2-resident fp32 buffer of about L2_PROBE_BYTES by
    eight programs per SM, each reading as many blocks as the others."""
    programs = programs_to_fill(torch.device("cuda"), 8)
    src = torch.randn(programs * block * max(1, L2_PROBE_BYTES // (programs * block * 4)), device="cuda")
    ms = _median(lambda: l2_read(src, L2_PROBE_PASSES, programs, block))
    return L2_PROBE_PASSES * src.numel() * 4 / (ms * 1e-3)


def _tile_counts(n: int, vocab: int, d: int, cfg: TileConfig) -> tuple[int, int, int]:
    """Row blocks, V tiles and d blocks of a GEMM kernel's grid."""
    return triton.cdiv(n, cfg.block_n), triton.cdiv(vocab, cfg.block_v), triton.cdiv(d, cfg.block_d)


def forward_l2_bytes(n: int, vocab: int, d: int, cfg: TileConfig, phi_size: int) -> float:
    """Bytes the soft forward's programs load: per (row block, d block) program and V
    tile of its chunk, a (block_n, block_v) tile of phi (``phi_size`` bytes an entry)
    and a (block_v, block_d) tile of the bf16 table; whole tiles (a row past N reads
    row 0)."""
    row_blocks, v_tiles, d_blocks = _tile_counts(n, vocab, d, cfg)
    return row_blocks * d_blocks * v_tiles * (cfg.block_n * cfg.block_v * phi_size + cfg.block_v * cfg.block_d * 2)


def backward_l2_bytes(n: int, vocab: int, d: int, cfg: TileConfig, phi_size: int, row_tile_bytes: int) -> float:
    """Bytes the soft backward's programs move: per (row block, V tile) program, a
    (block_n, block_d) tile of bf16 g and a (block_v, block_d) tile of the bf16 table per
    d block, then ``row_tile_bytes`` per entry of its (block_n, block_v) tile of phi
    (phi read + dphi written: 2 phi_size; with the Adam step fused, phi and both moments
    read and written); whole tiles."""
    row_blocks, v_tiles, d_blocks = _tile_counts(n, vocab, d, cfg)
    per_d_block = (cfg.block_n + cfg.block_v) * cfg.block_d * 2
    return row_blocks * v_tiles * (d_blocks * per_d_block + cfg.block_n * cfg.block_v * row_tile_bytes)


def _median(fn, repeats=20) -> float:
    return statistics.median(time_ms(fn, repeats, warmup=3))


def _floor_ms(nbytes: float, flops: float = 0.0) -> float:
    return max(nbytes / PEAK_BYTES_PER_S, flops / PEAK_FLOP_PER_S) * 1e3


def breakdown(n: int, vocab: int, d: int, dtype: torch.dtype) -> list[tuple[str, float, float, float | None]]:
    """(kernel, median ms, floor ms, bytes its programs load or None) per kernel of the op."""
    phi = (torch.randn(n, vocab, device="cuda") * 3).to(dtype)
    table = torch.randn(vocab, d, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn(n, d, device="cuda")
    seed = torch.zeros(1, device="cuda", dtype=torch.int64)
    stats = row_stats(phi, TAU, tiles=True)
    norm, entropy, argmax = stats.tempered, stats.entropy, stats.argmax
    keys = keep_threshold_keys(phi, norm, TAU, TOP_P, 0)
    soft, _ = soft_embedding_forward(phi, table, norm, argmax, entropy, argmax, TAU)
    phi_bytes, table_bytes = phi.numel() * phi.element_size(), table.numel() * 2
    gemm_flops = 2.0 * n * vocab * d
    # the forward's split count before whole waves: two programs per SM, rounded up
    row_blocks, _, d_blocks = _tile_counts(n, vocab, d, FORWARD_GPU)
    two_per_sm = triton.cdiv(programs_to_fill(phi.device, 2), row_blocks * d_blocks)
    size = phi.element_size()
    backward_cfg = backward_config(phi, None)
    forward_loads = _gemm_loads("forward", n, vocab, d, FORWARD_GPU, size)
    return [
        ("row_stats", _median(lambda: row_stats(phi, TAU)), _floor_ms(phi_bytes), None),
        ("row_stats + tile masses", _median(lambda: row_stats(phi, TAU, tiles=True)), _floor_ms(phi_bytes), None),
        ("threshold (top-p)", _median(lambda: keep_threshold_keys(phi, norm, TAU, TOP_P, 0)), _floor_ms(phi_bytes),
         None),
        ("sample", _median(lambda: sample_filtered(phi, keys, seed, TAU)), _floor_ms(phi_bytes), None),
        ("rejection sample", _median(lambda: rejection_sample(phi, stats, seed, TAU, TOP_P, 0)),
         _floor_ms(phi_bytes), None),
        (f"  {ROW_BLOCK_V}-token tile", _median(lambda: rejection_sample(phi, stats, seed, TAU, TOP_P, 0,
                                                                        block_v=ROW_BLOCK_V)),
         _floor_ms(phi_bytes), None),
        ("soft forward", _median(lambda: soft_embedding_forward(phi, table, norm, argmax, entropy, argmax, TAU)),
         _floor_ms(phi_bytes + table_bytes, gemm_flops), forward_loads),
        (f"  {two_per_sm} splits", _median(lambda: soft_embedding_forward(phi, table, norm, argmax, entropy, argmax,
                                                                          TAU, splits=two_per_sm)),
         _floor_ms(phi_bytes + table_bytes, gemm_flops), forward_loads),
        ("soft backward", _median(lambda: soft_embedding_backward(phi, table, grad, norm, soft, TAU)),
         _floor_ms(2 * phi_bytes + table_bytes, gemm_flops), _gemm_loads("backward", n, vocab, d, backward_cfg, size)),
    ] + (_adam_rows(phi, table, grad, norm, soft) if dtype == torch.float32 else [])  # fmt: skip


def _adam_updates(phi: torch.Tensor):
    """A factory of first Adam steps on fp32 rows shaped like phi (zero moments)."""
    moments = torch.zeros_like(phi), torch.zeros_like(phi)
    return lambda: AdamUpdate(*moments, step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)


def _adam_rows(phi, table, grad, norm, soft) -> list[tuple[str, float, float, float | None]]:
    """The guidance loop's Adam step on fp32 phi: after a stored dphi, or inside the backward."""
    param, dphi = phi.clone(), soft_embedding_backward(phi, table, grad, norm, soft, TAU)
    update = _adam_updates(phi)
    phi_bytes, table_bytes = phi.numel() * 4, table.numel() * 2
    fused = lambda: soft_embedding_backward(param, table, grad, norm, soft, TAU, adam=update())  # noqa: E731
    (n, vocab), d = phi.shape, table.shape[1]
    return [
        ("adam (separate)", _median(lambda: adam_step(param, dphi, update())), _floor_ms(7 * phi_bytes), None),
        ("soft bwd + adam", _median(fused), _floor_ms(6 * phi_bytes + table_bytes, 2.0 * phi.numel() * d),
         _gemm_loads("bwd + adam", n, vocab, d, backward_config(phi, update()), 4)),
    ]  # fmt: skip


def _gemm_loads(kind: str, n: int, vocab: int, d: int, cfg: TileConfig, phi_size: int) -> float:
    """Bytes the programs of a GEMM kernel of the op move (fp32 Adam moments with the step)."""
    if kind == "forward":
        return forward_l2_bytes(n, vocab, d, cfg, phi_size)
    row_tile_bytes = 6 * phi_size if kind == "bwd + adam" else 2 * phi_size  # phi, m, v read and written
    return backward_l2_bytes(n, vocab, d, cfg, phi_size, row_tile_bytes)


def sweep(n: int, vocab: int, d: int, dtype: torch.dtype) -> list[tuple[str, TileConfig, float]]:
    """Time every tile config of the grid below for the forward, the backward with dphi
    stored and, for fp32 phi, the backward with the Adam step fused (the guidance loop)."""
    phi = (torch.randn(n, vocab, device="cuda") * 3).to(dtype)
    table = torch.randn(vocab, d, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn(n, d, device="cuda")
    stats = row_stats(phi, TAU, tiles=True)
    norm, entropy, argmax = stats.tempered, stats.entropy, stats.argmax
    soft, _ = soft_embedding_forward(phi, table, norm, argmax, entropy, argmax, TAU)
    update = _adam_updates(phi)
    results = []
    # + half the rows over a 512-wide d block: each p feeds twice the MMA work, so the
    # forward computes half the exponentials (ptxas for sm_90: 16 ex2 per thread per V
    # tile instead of 32); two stages where three need more shared memory than an SM has
    wide_d = ((64, 64, 512, 8, 2), (64, 64, 512, 8, 3), (64, 32, 512, 8, 3))
    # + a 128 x 256 (rows x vocabulary) backward tile: the backward re-reads g once per V
    # tile and E once per row block, so a larger tile reads less from L2 per FLOP (85
    # against 64 FLOP per byte at 128 x 128; bf16 phi spills 52 / 32 B, two stages fit)
    wide_v = ((128, 256, 64, 8, 2), (256, 128, 64, 8, 2))
    grid = [*itertools.product((64, 128), (64, 128), (64, 128, 256), (4, 8), (3,)), *wide_d, *wide_v]
    for block_n, block_v, block_d, warps, stages in grid:
        cfg = TileConfig(block_n, block_v, block_d, warps, stages)
        kernels = [
            ("forward", lambda: soft_embedding_forward(phi, table, norm, argmax, entropy, argmax, TAU, config=cfg)),
            ("backward", lambda: soft_embedding_backward(phi, table, grad, norm, soft, TAU, config=cfg)),
        ]
        if dtype == torch.float32:
            kernels.append(("bwd + adam", lambda: soft_embedding_backward(phi, table, grad, norm, soft, TAU,
                                                                          adam=update(), config=cfg)))  # fmt: skip
        for name, fn in kernels:
            try:
                results.append((name, cfg, _median(fn, repeats=10)))
            except Exception as error:  # out of shared memory / registers for this tile
                print(f"{name} {cfg}: {type(error).__name__}")
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--d", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--vocab", type=int, default=152064)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--sweep", action="store_true", help="also time tile configs of the GEMM kernels")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"{torch.cuda.get_device_name()}  V={args.vocab} phi {args.dtype}  defaults: fwd {FORWARD_GPU} "
          f"bwd {BACKWARD_GPU}, fp32 phi or Adam {BACKWARD_GPU_HALF_TILE}")  # fmt: skip
    l2 = l2_read_bandwidth()
    print(f"L2 read bandwidth {l2 / 1e12:.2f} TB/s (about {L2_PROBE_BYTES >> 20} MiB read {L2_PROBE_PASSES} times)")
    size = dtype.itemsize
    for n, d in itertools.product(args.n, args.d):
        print(f"\nN={n} d={d}\n{'kernel':<20} {'median ms':>10} {'floor ms':>9} {'x floor':>8} {'L2 GB':>7} "
              f"{'at L2 ms':>9}")  # fmt: skip
        for name, ms, floor, loads in breakdown(n, args.vocab, d, dtype):
            l2_columns = "" if loads is None else f" {loads / 1e9:7.2f} {loads / l2 * 1e3:9.3f}"
            print(f"{name:<20} {ms:10.3f} {floor:9.3f} {ms / floor:8.1f}{l2_columns}")
        if args.sweep:
            results = sweep(n, args.vocab, d, dtype)
            for kind in ("forward", "backward", "bwd + adam"):
                best = sorted((r for r in results if r[0] == kind), key=lambda r: r[2])[:5]
                for _, cfg, ms in best:
                    loads = _gemm_loads(kind, n, args.vocab, d, cfg, size)
                    print(f"  best {kind:<8} {ms:8.3f} ms  {cfg}  L2 {loads / 1e9:.2f} GB, {loads / l2 * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
