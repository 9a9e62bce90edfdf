"""Device time per profiler range, read from a torch profiler's Chrome trace.

A range's device time is the duration of the GPU work (kernels, memsets, copies) whose
launching API call lies inside the range's CPU span, on any thread: the autograd
engine launches a CUDA backward from its own thread, so neither the range's GPU-side
span (it holds only the kernels of its own thread, and the idle time between them) nor
the CPU event's own device time counts the backward of a ``loss.backward()`` made
inside the range. Ranges are inclusive: a nested range's work counts in its parent too.
Each range's work is also kept per kernel name, so a table can say which kernels a
component's time goes to and how many launches it takes.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

DEVICE_WORK = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCHES = ("cuda_runtime", "cuda_driver")


class KernelTime(NamedTuple):
    launches: int
    us: float


class RangeTimes(NamedTuple):
    per_range: dict[str, float]  # range name -> device µs
    kernels: dict[str, dict[str, KernelTime]]  # range name -> work name -> launches and device µs
    outside: float  # µs of work launched outside every range
    total: float  # µs of all work


def device_time_by_range(trace: Path | dict, prefix: str = "entrgi.") -> RangeTimes:
    """Device time of the work each range (name starting with ``prefix``) launched, from
    a Chrome trace (path or loaded dict)."""
    events = (trace if isinstance(trace, dict) else json.loads(Path(trace).read_text()))["traceEvents"]
    launched_at = {
        e["args"]["correlation"]: e["ts"]
        for e in events
        if e.get("cat") in LAUNCHES and "correlation" in e.get("args", {})
    }
    ranges = [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
              if e.get("cat") == "user_annotation" and e["name"].startswith(prefix)]  # fmt: skip
    per_range: dict[str, float] = defaultdict(float)
    kernels: dict[str, dict[str, KernelTime]] = defaultdict(lambda: defaultdict(lambda: KernelTime(0, 0.0)))
    outside = total = 0.0
    for e in events:
        if e.get("cat") not in DEVICE_WORK:
            continue
        total += e["dur"]
        start = launched_at.get(e.get("args", {}).get("correlation"))
        holders = {name for begin, end, name in ranges if start is not None and begin <= start <= end}
        for name in holders:
            per_range[name] += e["dur"]
            launches, us = kernels[name][e["name"]]
            kernels[name][e["name"]] = KernelTime(launches + 1, us + e["dur"])
        if not holders:
            outside += e["dur"]
    return RangeTimes(dict(per_range), {name: dict(work) for name, work in kernels.items()}, outside, total)


def short_kernel_name(name: str, width: int = 72) -> str:
    """A demangled kernel name without ``void``, namespaces and the argument list, cut
    to ``width`` characters: ``void at::native::vectorized_elementwise_kernel<4,
    at::native::CUDAFunctor_add<c10::BFloat16>, ...>(int, ...)`` ->
    ``vectorized_elementwise_kernel<4, CUDAFunctor_add<BFloat16>, ...>``."""
    name = name.removeprefix("void ").replace("(anonymous namespace)::", "")
    if name.endswith(")"):  # drop the argument list: the '(' that matches the last ')'
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i]
                break
    name = " ".join(re.sub(r"\b[A-Za-z_]\w*::", "", name).split())
    return name if len(name) <= width else name[: width - 1] + "…"


def kernel_table(times: RangeTimes, steps: int, top: int = 6) -> list[str]:
    """Lines of a table: each range, most device time first, with its device ms and
    launches per step, then its ``top`` kernels by device time (ms and launches per
    step, share of the range) and the rest summed in one line."""
    lines = []
    for name, work in sorted(times.kernels.items(), key=lambda item: -times.per_range[item[0]]):
        range_us = times.per_range[name]
        launches = sum(k.launches for k in work.values())
        lines.append(f"{name:<34} {range_us / 1e3 / steps:9.2f} ms {launches / steps:9.1f} launches")
        ranked = sorted(work.items(), key=lambda item: -item[1].us)
        rest = ranked[top:]
        rows = [(short_kernel_name(k), t.launches, t.us) for k, t in ranked[:top]]
        if rest:
            label = f"({len(rest)} other kernels)"
            rows.append((label, sum(t.launches for _, t in rest), sum(t.us for _, t in rest)))
        for label, count, us in rows:
            share = 100 * us / range_us if range_us else 0.0
            lines.append(f"    {us / 1e3 / steps:9.2f} ms {count / steps:9.1f} {share:5.1f}%  {label}")
    return lines
