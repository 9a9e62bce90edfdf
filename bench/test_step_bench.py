"""pytest-benchmark view of whole denoising steps: ``pytest bench/ --benchmark-only``.

Random-weight models of the paper's shapes on a GPU (Dream-7B body, 0.6B reward, one
prompt x K4), the ``tiny`` preset on CPU; unguided vs each guided method, eager vs
CUDA graphs, each round from a canvas half committed (a run's average step).
``entrgi bench --suite step`` adds peak memory, ratios and the CSV.
Speed is reported here, never asserted.
"""

from __future__ import annotations

import pytest
import torch

from entrgi.step_benchmark import StepOptions, build_models, new_run, step_config

GPU = torch.cuda.is_available()
PRESET = "1xK4-0.6b" if GPU else "tiny"
NEW_TOKENS = 128 if GPU else 8
GRAPH_MODES = [False, True] if GPU else [False]


@pytest.fixture(scope="module")
def models():
    device = torch.device("cuda" if GPU else "cpu")
    return build_models(PRESET, device, torch.bfloat16 if GPU else torch.float32)


@pytest.mark.parametrize("graphs", GRAPH_MODES, ids=lambda g: "graphs" if g else "eager")
@pytest.mark.parametrize("method", ["none", "entrgi", "aps", "expectation"])
def test_denoising_step(benchmark, models, method, graphs):
    run = new_run(*models, step_config(PRESET, method, StepOptions(new_tokens=NEW_TOKENS), graphs), masked_fraction=0.5)
    advance = run.graphed_step if graphs else run.step
    start = run.response.clone()

    def restart():  # every round is the same step from the same canvas
        run.step_index.zero_()
        run.response.copy_(start)

    def step():
        advance(0)
        if GPU:
            torch.cuda.synchronize()

    benchmark.pedantic(step, setup=restart, rounds=5 if GPU else 2, warmup_rounds=2 if graphs else 1)
    assert int(run.step_index) == 1 and not bool(run.non_finite)
