"""Device time per profiler range, read from a torch profiler's Chrome trace.

A range's device time is the duration of the GPU work (kernels, memsets, copies) whose
launching API call lies inside the range's CPU span, on any thread: the autograd
engine launches a CUDA backward from its own thread, so neither the range's GPU-side
span (it holds only the kernels of its own thread, and the idle time between them) nor
the CPU event's own device time counts the backward of a ``loss.backward()`` made
inside the range. Ranges are inclusive: a nested range's work counts in its parent too.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

DEVICE_WORK = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCHES = ("cuda_runtime", "cuda_driver")


def device_time_by_range(trace: Path | dict, prefix: str = "entrgi.") -> tuple[dict[str, float], float, float]:
    """(device µs per range name starting with ``prefix``, µs of work launched outside
    every such range, µs of all work) from a Chrome trace (path or loaded dict)."""
    events = (trace if isinstance(trace, dict) else json.loads(Path(trace).read_text()))["traceEvents"]
    launched_at = {
        e["args"]["correlation"]: e["ts"]
        for e in events
        if e.get("cat") in LAUNCHES and "correlation" in e.get("args", {})
    }
    ranges = [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
              if e.get("cat") == "user_annotation" and e["name"].startswith(prefix)]  # fmt: skip
    per_range: dict[str, float] = defaultdict(float)
    outside = total = 0.0
    for e in events:
        if e.get("cat") not in DEVICE_WORK:
            continue
        total += e["dur"]
        start = launched_at.get(e.get("args", {}).get("correlation"))
        holders = {name for begin, end, name in ranges if start is not None and begin <= start <= end}
        for name in holders:
            per_range[name] += e["dur"]
        if not holders:
            outside += e["dur"]
    return dict(per_range), outside, total
