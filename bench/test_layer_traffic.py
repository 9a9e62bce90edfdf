"""bench/layer_traffic.py counts the models' traffic per group of ops on the meta device:
fusing the norms and gates shrinks the elementwise group, and stacking each MLP's gate
and up projections and each attention's q, k and v projections takes three GEMMs per
layer off the forward and three off the backward (with the adds of their input
gradients, for one concatenation); folded sdpa attention reads the key / value heads
unrepeated and prepares the mask once; the residual adds run inside the norms' kernels and the down projection's GEMM."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import layer_traffic  # noqa: E402

import entrgi.lean  # noqa: E402
import entrgi.normed_attention  # noqa: E402


def test_fused_layers_move_less_than_lean_and_stock_ones(monkeypatch):
    counts = {mode: layer_traffic.count("tiny", mode) for mode in layer_traffic.MODES}
    for part in ("reward fwd+bwd", "denoiser forward"):
        groups = {mode: counts[mode][part].by_group() for mode in layer_traffic.MODES}
        assert groups["stock"]["attention"] == groups["lean"]["attention"]
        # folded: one kernel each way still (it reads the key / value heads unrepeated and
        # the mask once per query head: fewer bytes at the presets' sizes, not at these)
        assert groups["fused"]["attention"][0] == groups["lean"]["attention"][0]
        assert groups["stock"]["projections"] == groups["lean"]["projections"]
        lean_gemms, lean_bytes = groups["lean"]["projections"]
        fused_gemms, fused_bytes = groups["fused"]["projections"]
        layers = 2  # the tiny preset's models
        assert fused_gemms == lean_gemms - layers * (6 if part == "reward fwd+bwd" else 3)
        assert fused_bytes < lean_bytes  # the stacked GEMM reads its input once
        launches, nbytes = zip(*(groups[mode]["elementwise"] for mode in layer_traffic.MODES))
        assert nbytes[2] < nbytes[1] <= nbytes[0] and launches[2] < launches[0]
    # stacked, the backward adds no input gradients of the projections: per layer one add
    # fewer for gate and up, and for q, k and v two fewer and one concatenation more
    monkeypatch.setattr(entrgi.lean.StackedLinear, "fits", staticmethod(lambda linears: False))
    unstacked = layer_traffic.count("tiny", "fused")["reward fwd+bwd"].launches
    stacked = counts["fused"]["reward fwd+bwd"].launches
    assert stacked["add"] == unstacked["add"] - 2 * 3 and stacked["cat"] == unstacked["cat"] + 2
    assert stacked["mm"] == unstacked["mm"] - 2 * 6
    fused = counts["fused"]["reward fwd+bwd"].launches
    # every norm runs one kernel forward and one backward (the final norm's too)
    assert fused["triton rms_norm forward"] == fused["triton rms_norm backward"] > 0
    assert "pow" not in fused and "pow" in counts["lean"]["reward fwd+bwd"].launches
    # and each attention's head norms and rotary embedding one kernel per layer each way, for
    # its queries and keys (the denoiser's attention, without head norms, the rotary one)
    assert fused["triton normed rotary forward"] == fused["triton normed rotary backward"] == 2  # the reward's layers
    assert "triton rotary forward" not in fused
    denoiser = counts["fused"]["denoiser forward"].launches
    assert denoiser["triton rotary forward"] == 2 and "triton normed rotary forward" not in denoiser
    assert "neg" not in fused and "neg" in counts["lean"]["reward fwd+bwd"].launches
    # ops on scalars and dtypes alone run on the host, and allocations launch nothing: no
    # launch (the norm's output dtype; the attention stand-in's gradients, made in (B, T, H, D) order)
    assert "promote_types" not in fused
    assert not [op for mode in counts for part in counts[mode].values() for op in part.launches if "empty" in op]
    # the folded attention makes the bool mask additive once per forward (two launches), not
    # sdpa once per layer, and sums no gradients of repeated key / value heads (two per
    # layer); it copies its output, and that copy's gradient, once per layer (and, with
    # several key / value heads, the folded query's gradient; there the repeats' two copies
    # go: the tiny reward's single head repeats as a view)
    monkeypatch.undo()  # stacked again
    # run separately, the two head norms and the rotation are three kernels each way, not one
    monkeypatch.setattr(entrgi.normed_attention, "_fits", lambda module: None)
    separate = layer_traffic.count("tiny", "fused")["reward fwd+bwd"].launches
    assert sum(separate.values()) == sum(fused.values()) + 2 * 2 * 2
    assert separate["triton rms_norm forward"] == fused["triton rms_norm forward"] + 2 * 2
    assert separate["triton rotary backward"] == fused["triton normed rotary backward"]
    monkeypatch.undo()
    # the decoder layers' residual adds run inside other kernels: per layer one add fewer
    # forward before the second norm (inside it) and one after the MLP (its down
    # projection accumulates into the sum in place), and two backward (where each
    # residual's gradient meets its norm's)
    monkeypatch.setattr(entrgi.lean, "_lean_decoder_layer", lambda module, backend, mlp_forward: None)
    separate_adds = layer_traffic.count("tiny", "fused")["reward fwd+bwd"].launches
    assert fused["add"] == separate_adds["add"] - 2 * 4 == 1  # one outside the layers
    assert fused["addmm_"] == 2 and fused["mm"] == separate_adds["mm"] - 2  # the down projections, in place
    assert fused["triton rms_norm backward"] == separate_adds["triton rms_norm backward"]
    monkeypatch.undo()
    monkeypatch.setattr(entrgi.sdpa, "folded_sdpa_fits", lambda model, backend: False)
    unfolded = layer_traffic.count("tiny", "fused")["reward fwd+bwd"].launches
    assert unfolded["attention mask to additive"] == unfolded["attention forward"] == 2
    assert "attention mask to additive" not in fused and fused["fill_"] == fused["masked_fill_"] == 1
    assert fused["sum"] == unfolded["sum"] - 2 * 2 and fused["copy_"] == unfolded["copy_"] + 2 * 2
    assert fused["clone"] == unfolded["clone"]
    # and writes the output's gradient where the kernel's backward reads it: no copy there
    assert "attention output-gradient copy" not in fused and "attention output-gradient copy" not in unfolded


def test_broadcast_operands_count_once():
    import torch

    weight = torch.empty(3, 5, device="meta")
    assert layer_traffic.distinct_bytes(weight.expand(7, 3, 5)) == 3 * 5 * 4
