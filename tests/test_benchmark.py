"""The op benchmark's arithmetic and output (``entrgi.benchmark``): bytes and FLOPs of the
ideal op, quantiles, speedups against eager, the table's cells, the CSV, the plots'
points and the profile's per-step table. Timing itself runs in ``tests/test_cli.py``."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

from entrgi import benchmark
from helpers import trace_event

ENV = {"date": "2026-12-08T00:00:00+00:00", "device": "test", "torch": "t", "triton": "t", "transformers": "t",
       "commit": "c"}  # fmt: skip


def _row(backend="torch", mode="fwd+bwd", median=2.0, floor=None, n=4, date=ENV["date"]) -> benchmark.OpRow:
    return benchmark.OpRow(**{**ENV, "date": date}, backend=backend, mode=mode, n=n, vocab=64, d=16, dtype="float32",
                           median_ms=median, p20_ms=median, p80_ms=median, gbps=1.0, tflops=1.0, floor_ms=floor,
                           extra_mib=None)  # fmt: skip


@pytest.mark.parametrize("dtype, phi_bytes", [(torch.bfloat16, 2 * 4 * 10), (torch.float32, 4 * 4 * 10)])
def test_op_cost_reads_phi_per_pass_writes_dphi_once_and_reads_the_table_per_pass(dtype, phi_bytes):
    n, vocab, d = 4, 10, 3
    table, gemm = vocab * d * 2, 2.0 * n * vocab * d
    assert benchmark.op_cost(n, vocab, d, dtype, "forward") == (phi_bytes + table, gemm)
    assert benchmark.op_cost(n, vocab, d, dtype, "backward") == (2 * phi_bytes + table, gemm)  # read phi, write dphi
    assert benchmark.op_cost(n, vocab, d, dtype, "fwd+bwd") == (3 * phi_bytes + 2 * table, 2 * gemm)


def test_rows_give_throughput_from_the_median_time(monkeypatch):
    monkeypatch.setattr(benchmark, "time_ms", lambda fn, repeats: [1.0, 2.0, 9.0])
    n, vocab, d = 4, 64, 16
    phi, table, grad = torch.randn(n, vocab), torch.randn(vocab, d), torch.randn(n, d)
    rows = benchmark._bench_backend("torch", n, vocab, d, torch.float32, phi, table, grad, 3, ENV)
    assert [r.mode for r in rows] == ["forward", "backward", "fwd+bwd"]
    for r in rows:
        nbytes, flops = benchmark.op_cost(n, vocab, d, torch.float32, r.mode)
        assert (r.median_ms, r.p20_ms, r.p80_ms) == (2.0, pytest.approx(1.4), pytest.approx(6.2))
        assert (r.gbps, r.tflops) == (pytest.approx(nbytes / 2e-3 / 1e9), pytest.approx(flops / 2e-3 / 1e12))


def test_commit_is_unknown_outside_a_git_checkout(monkeypatch):
    def no_repository(*args, **kwargs):
        raise benchmark.subprocess.CalledProcessError(128, args[0])

    monkeypatch.setattr(benchmark.subprocess, "run", no_repository)
    assert benchmark.environment()["commit"] == "unknown"


def test_quantiles_interpolate_between_the_samples():
    times = [float(t) for t in range(1, 12)]  # 1 .. 11
    assert (benchmark.quantile(times, 0.2), benchmark.quantile(times, 0.8)) == (3.0, 9.0)
    assert benchmark.quantile([5.0], 0.2) == 5.0


def test_speedups_are_eager_time_over_each_backends_time(monkeypatch):
    medians = {"torch": 4.0, "triton": 0.5}
    monkeypatch.setattr(benchmark, "_bench_backend", lambda backend, *args: [_row(backend, median=medians[backend])])
    rows = benchmark.bench_op(4, 64, 16, torch.float32, ["torch", "triton"], repeats=2, env=ENV)
    assert [(r.backend, r.speedup_vs_torch) for r in rows] == [("torch", 1.0), ("triton", 8.0)]


def test_table_shows_time_over_floor_and_right_aligns_missing_cells():
    assert benchmark.cell(None, "9.3f") == "      n/a" and benchmark.cell(None, "9.2f", missing="") == " " * 9
    measured, unmeasured = benchmark.format_table([_row(median=2.0, floor=0.5), _row()]).splitlines()[2:]
    assert measured.split()[-3:] == ["0.500", "4.0", "n/a"]  # floor ms, x floor, extra MiB (no CUDA)
    assert unmeasured.split()[-3:] == ["n/a", "n/a", "n/a"]


def test_csv_gets_one_header_and_refuses_other_columns(tmp_path):
    path = tmp_path / "op_results.csv"
    benchmark.append_csv([_row()], path)
    benchmark.append_csv([_row(), _row(n=8)], path)
    lines = path.read_text().splitlines()
    assert len(lines) == 4 and lines[0].startswith("date,device,") and lines[1].startswith(ENV["date"])
    path.write_text("date,backend\n")
    with pytest.raises(ValueError, match=r"op_results.csv has columns \['date', 'backend'\], not OpRow's"):
        benchmark.check_csv(path, benchmark.OpRow)


def test_plots_draw_the_latest_runs_rows_only(tmp_path, monkeypatch):
    import matplotlib.axes

    drawn = []
    plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(
        matplotlib.axes.Axes, "plot", lambda ax, *args, **kw: (drawn.append(args), plot(ax, *args, **kw))[1]
    )
    old, new = "2026-01-01T00:00:00+00:00", "2026-02-01T00:00:00+00:00"
    rows = [_row(n=4, median=9.0, date=old), _row(n=4, median=2.0, date=new), _row(n=8, median=3.0, date=new)]
    benchmark.append_csv([*rows, _row(mode="forward", date=new)], tmp_path / "op.csv")
    written = benchmark.plot_csv(tmp_path / "op.csv", tmp_path)
    assert [p.name for p in written] == ["time_vs_n.png", "memory_vs_n.png"]
    assert drawn == [((4, 8), (2.0, 3.0))]  # the time plot; no memory measured on a CPU


def _trace(tmp_path: Path, ranges: dict[str, float]) -> Path:
    """A Chrome trace with one kernel of the given µs launched inside each range."""
    events = []
    for i, (name, us) in enumerate(ranges.items()):
        events += [
            trace_event("user_annotation", name, 100 * i, 50),
            trace_event("cuda_runtime", "launch", 100 * i + 1, 1, correlation=i),
            trace_event("kernel", "k", 100 * i + 5, us, correlation=i),
        ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    return path


def test_profile_table_gives_each_component_per_step_against_its_floor(tmp_path):
    def event(key, count, cpu_us):
        return SimpleNamespace(key=key, count=count, cpu_time_total=cpu_us, device_type=DeviceType.CPU)

    averages = [event("entrgi.commit", 2, 2000.0), event("aten::mm", 10, 90000.0), event("entrgi.reward", 4, 8000.0),
                event("aten::_local_scalar_dense", 6, 10.0), event("cudaStreamSynchronize", 2, 10.0)]  # fmt: skip
    trace = _trace(tmp_path, {"entrgi.reward": 3000.0, "entrgi.commit": 400.0})
    table = benchmark._profile_table(averages, 2, 5.0, trace, {"entrgi.reward": 0.5})
    rows = [line.split() for line in table.splitlines()]
    assert rows[0][-4:] == ["floor", "ms", "x", "floor"]
    assert rows[1] == ["entrgi.reward", "4", "4.00", "1.50", "0.50", "3.0"]  # CPU ms, device ms per step; floor
    assert rows[2] == ["entrgi.commit", "2", "1.00", "0.20"]  # no floor given
    assert ["step", "wall", "time", "5.00"] in rows and ["host", "syncs", "per", "step", "4.0"] in rows
    assert "aten::mm" not in table


def test_profile_wall_time_is_per_timed_step(tmp_path, monkeypatch):
    """The first step warms up outside the profile; the wall time divides by the others."""
    clock = iter([10.0, 13.0])
    monkeypatch.setattr(benchmark, "time", SimpleNamespace(perf_counter=lambda: next(clock)))  # its clock only
    steps = []
    run = SimpleNamespace(step=steps.append, canvas=torch.zeros(1), reward=None,
                          denoiser=SimpleNamespace(layers=SimpleNamespace(describe=lambda: "stock")))  # fmt: skip
    table = benchmark.profile_step(4, tmp_path, run=run)
    assert steps == [0, 1, 2, 3]
    assert ["step", "wall", "time", "1000.00"] in [line.split() for line in table.splitlines()]
