"""Device time per profiler range from a Chrome trace: launches on any thread count."""

from __future__ import annotations

import json

from entrgi.trace_time import device_time_by_range


def _event(cat: str, name: str, ts: float, dur: float, tid: int = 1, correlation: int | None = None) -> dict:
    args = {} if correlation is None else {"correlation": correlation}
    return {"ph": "X", "cat": cat, "name": name, "pid": 1, "tid": tid, "ts": ts, "dur": dur, "args": args}


def test_work_is_charged_to_every_range_holding_its_launch(tmp_path):
    events = [
        _event("user_annotation", "entrgi.reward", 0, 100),
        _event("user_annotation", "entrgi.op_backward", 40, 20, tid=2),  # the autograd thread, inside in time
        _event("user_annotation", "other.range", 0, 500),  # not ours: ignored
        _event("cuda_runtime", "cudaLaunchKernel", 10, 1, correlation=1),
        _event("kernel", "forward", 300, 5, tid=7, correlation=1),  # runs late: the launch time decides
        _event("cuda_runtime", "cudaLaunchKernel", 50, 1, tid=2, correlation=2),
        _event("kernel", "backward", 310, 7, tid=7, correlation=2),
        _event("cuda_driver", "cuLaunchKernelEx", 20, 1, correlation=4),
        _event("gpu_memset", "Memset (Device)", 320, 2, tid=7, correlation=4),
        _event("cuda_runtime", "cudaLaunchKernel", 150, 1, correlation=3),
        _event("kernel", "commit", 330, 11, tid=7, correlation=3),  # launched outside every range
        _event("kernel", "unmatched", 340, 3, tid=7, correlation=99),  # no launch record: outside
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    per_range, outside, total = device_time_by_range(path)
    assert per_range == {"entrgi.reward": 14.0, "entrgi.op_backward": 7.0}
    assert (outside, total) == (14.0, 28.0)
    assert device_time_by_range({"traceEvents": events}, prefix="other.")[0] == {"other.range": 28.0 - 3.0}
