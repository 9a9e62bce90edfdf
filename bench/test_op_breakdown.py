"""bench/op_breakdown.py's load model of the GEMM kernels, against counts by hand at the
default tiles, and its L2 probe kernel, against a sum (interpreter or GPU)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import op_breakdown  # noqa: E402
from entrgi_kernels.soft_embedding import BACKWARD_GPU, FORWARD_GPU, TileConfig  # noqa: E402

VOCAB = 152_064


def test_forward_loads_a_phi_tile_per_d_block_and_a_table_tile_per_row_block():
    # 4 row blocks x 4 d blocks x 2,376 V tiles, each a 128 x 64 bf16 phi tile (16 KiB)
    # and a 64 x 256 bf16 table tile (32 KiB)
    assert op_breakdown.forward_l2_bytes(512, VOCAB, 1024, FORWARD_GPU, 2) == 4 * 4 * 2376 * 49152
    # twice the rows per block: the table term halves, the phi term stays
    wide = TileConfig(256, 64, 256, 8, 2)
    assert op_breakdown.forward_l2_bytes(512, VOCAB, 1024, wide, 2) == 2 * 4 * 2376 * (32768 + 32768)


def test_backward_gemm_reads_64_flops_per_byte_at_the_default_tile():
    n, d = 512, 1024
    gemm_only = op_breakdown.backward_l2_bytes(n, VOCAB, d, BACKWARD_GPU, 2, row_tile_bytes=0)
    assert gemm_only == 4 * 1188 * 16 * (128 + 128) * 64 * 2
    assert 2 * n * VOCAB * d / gemm_only == 64
    with_rows = op_breakdown.backward_l2_bytes(n, VOCAB, d, BACKWARD_GPU, 2, row_tile_bytes=4)
    assert with_rows - gemm_only == n * VOCAB * 4  # phi read and dphi written, bf16


def test_gemm_loads_count_adam_moments_with_the_fused_step():
    cfg = TileConfig(64, 128, 64, 8, 3)
    plain = op_breakdown._gemm_loads("backward", 256, 4096, 512, cfg, 4)
    fused = op_breakdown._gemm_loads("bwd + adam", 256, 4096, 512, cfg, 4)
    assert fused - plain == 256 * 4096 * 16  # two fp32 moments read and written


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="runs the probe kernel: needs the Triton interpreter or a GPU")  # fmt: skip
def test_l2_probe_reads_every_element_once_per_pass():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    src = torch.randn(4 * 2 * 16, device=device)
    out = op_breakdown.l2_read(src, passes=3, programs=2, block=16)
    # program p reads the blocks p, p + 2, p + 4, ... of 16 elements
    expected = 3 * src.view(-1, 2, 16).sum(0)
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="multiple of 16"):
        op_breakdown.l2_read(src[:40], passes=1, programs=2, block=16)
