"""Benchmark harness behind ``entrgi bench``: op timings and a guided-step profile.

Op suite: ``guided_embedding`` forward, backward and fwd+bwd for each backend
(``torch`` eager reference, ``compile`` = torch.compile of the reference, ``triton``)
over an N x d x dtype grid; time quantiles (median, p20, p80), achieved GB/s and
TFLOP/s, the floor from bytes and FLOPs (GPU), peak extra memory (CUDA), and
speedups against eager measured in the same run. Rows are appended to a CSV with
device, versions, commit and date; plots are drawn from the CSV.
"""

from __future__ import annotations

import csv
import datetime
import functools
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch.autograd import DeviceType

from entrgi.ops import guided_embedding
from entrgi.ops.reference import guided_embedding_reference

# H100 ceilings measured in PERF.md: device copy 2.96 TB/s, bf16 dense 758 TFLOP/s.
PEAK_BYTES_PER_S = 3.0e12
PEAK_FLOP_PER_S = 750e12
TEMPERATURE, TOP_P = 0.7, 0.95


@dataclass
class RunInfo:
    """Where and when a benchmark row was measured (the leading CSV columns)."""

    date: str
    device: str
    torch: str
    triton: str
    transformers: str
    commit: str

    def header(self) -> str:
        return f"{self.device} | torch {self.torch} | triton {self.triton} | commit {self.commit} | {self.date}"


@dataclass
class OpRow(RunInfo):
    backend: str
    mode: str  # forward | backward | fwd+bwd
    n: int
    vocab: int
    d: int
    dtype: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    gbps: float
    tflops: float
    floor_ms: float | None
    extra_mib: float | None
    speedup_vs_torch: float | None = None


def environment() -> dict:
    def version(name):
        try:
            return __import__(name).__version__
        except ImportError:
            return "absent"

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or 'x86_64'})"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device, "torch": torch.__version__, "triton": version("triton"),
        "transformers": version("transformers"), "commit": commit,
    }  # fmt: skip


def time_ms(fn, repeats: int, warmup: int = 2) -> list[float]:
    """Wall times of ``fn()`` in ms (CUDA events on GPU)."""
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1] if len(values) > 1 else values[0]


def op_cost(n: int, vocab: int, d: int, dtype: torch.dtype, mode: str) -> tuple[float, float]:
    """Bytes and FLOPs of the ideal fused op (phi read twice and dphi written once for
    fwd+bwd, the table read once per pass, 2 N V d FLOPs per pass)."""
    phi_bytes = n * vocab * torch.finfo(dtype).bits // 8
    table_bytes = vocab * d * 2
    passes = {"forward": 1, "backward": 1, "fwd+bwd": 2}[mode]
    phi_traffic = {"forward": 1, "backward": 2, "fwd+bwd": 3}[mode] * phi_bytes
    return phi_traffic + passes * table_bytes, passes * 2.0 * n * vocab * d


def _op_functions(backend: str, phi, table, grad):
    """Closures (forward, backward, fwd+bwd) for one backend."""
    if backend == "compile":
        # Each shape compiles afresh and static: dynamo would otherwise mark N dynamic on
        # the second shape (where the reference's torch.rand fails to trace) and, past its
        # recompile limit, fall back to eager without an error.
        torch._dynamo.reset()
        reference = torch.compile(functools.partial(guided_embedding_reference, temperature=TEMPERATURE,
                                                    top_p=TOP_P, top_k=0, mode="entrgi", generator=None),
                                  dynamic=False)  # fmt: skip
        call = lambda leaf: reference(leaf, table)[0]  # noqa: E731
    else:
        call = lambda leaf: guided_embedding(leaf, table, temperature=TEMPERATURE, top_p=TOP_P,  # noqa: E731
                                             backend=backend, check_values=False).embeds  # fmt: skip
    leaf = phi.detach().requires_grad_(True)

    def forward():
        with torch.no_grad():
            call(phi)

    saved = {}

    def prepare_backward():
        leaf.grad = None
        saved["out"] = call(leaf)

    def backward():
        leaf.grad = None  # peak memory counts one dphi, not an accumulated one
        saved["out"].backward(grad, retain_graph=True)

    def free_grad():
        leaf.grad = None

    def fwd_bwd():
        leaf.grad = None
        call(leaf).backward(grad)

    return forward, (prepare_backward, backward), fwd_bwd, free_grad


def bench_op(n: int, vocab: int, d: int, dtype: torch.dtype, backends, repeats: int, env: dict) -> list[OpRow]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    phi = (torch.randn(n, vocab, device=device) * 3).to(dtype)
    table = torch.randn(vocab, d, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    grad = torch.randn(n, d, device=device, dtype=table.dtype)
    rows: list[OpRow] = []
    for backend in backends:
        try:
            rows += _bench_backend(backend, n, vocab, d, dtype, phi, table, grad, repeats, env)
        except Exception as error:  # e.g. an inductor codegen failure: report it, keep the other backends
            print(f"{backend} failed at N={n} d={d} {dtype}: {type(error).__name__}: {str(error).splitlines()[0]}")
    eager = {(r.mode): r.median_ms for r in rows if r.backend == "torch"}
    for r in rows:
        r.speedup_vs_torch = eager[r.mode] / r.median_ms if r.mode in eager else None
    return rows


def _bench_backend(backend, n, vocab, d, dtype, phi, table, grad, repeats, env) -> list[OpRow]:
    """Forward, backward and fwd+bwd rows of one backend (speedups filled by the caller)."""
    device = phi.device.type
    rows = []
    forward, (prepare, backward), fwd_bwd, leaf_grad_free = _op_functions(backend, phi, table, grad)
    for mode, fn in (("forward", forward), ("backward", backward), ("fwd+bwd", fwd_bwd)):
        leaf_grad_free()
        if mode == "backward":
            prepare()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        times = time_ms(fn, repeats)
        extra = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else None
        nbytes, flops = op_cost(n, vocab, d, dtype, mode)
        median = statistics.median(times)
        floor = max(nbytes / PEAK_BYTES_PER_S, flops / PEAK_FLOP_PER_S) * 1e3 if device == "cuda" else None
        rows.append(OpRow(
            **env, backend=backend, mode=mode, n=n, vocab=vocab, d=d, dtype=str(dtype).removeprefix("torch."),
            median_ms=median, p20_ms=quantile(times, 0.2), p80_ms=quantile(times, 0.8),
            gbps=nbytes / median / 1e6, tflops=flops / median / 1e9, floor_ms=floor, extra_mib=extra,
        ))  # fmt: skip
    return rows


def cell(value: float | None, spec: str, missing: str = "n/a") -> str:
    """``value`` in format ``spec`` (e.g. ``"9.2f"``); ``missing`` right-aligned to its width when None."""
    return format(value, spec) if value is not None else f"{missing:>{int(spec.split('.')[0])}}"


def format_table(rows: list[OpRow]) -> str:
    head = (f"{'backend':<8} {'mode':<8} {'N':>5} {'V':>7} {'d':>5} {'dtype':<8} {'median ms':>10} {'p20':>8} "
            f"{'p80':>8} {'GB/s':>8} {'TFLOP/s':>8} {'floor ms':>9} {'x floor':>8} {'extra MiB':>10} {'vs eager':>9}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        floor = cell(r.floor_ms or None, "9.3f")
        ratio = cell(r.median_ms / r.floor_ms if r.floor_ms else None, "8.1f")
        extra = cell(r.extra_mib, "10.1f")
        speed = cell(r.speedup_vs_torch or None, "9.2f", missing="")
        lines.append(f"{r.backend:<8} {r.mode:<8} {r.n:>5} {r.vocab:>7} {r.d:>5} {r.dtype:<8} {r.median_ms:10.3f} "
                     f"{r.p20_ms:8.3f} {r.p80_ms:8.3f} {r.gbps:8.1f} {r.tflops:8.2f} {floor} {ratio} {extra}{speed}")  # fmt: skip
    return "\n".join(lines)


def check_csv(path: Path, row_type: type) -> None:
    """Raise when the CSV at ``path`` exists with columns other than ``row_type``'s
    (written by an older version): checked before a run, so no result is lost."""
    if not path.exists():
        return
    names = [f.name for f in fields(row_type)]
    with path.open(newline="") as handle:
        header = next(csv.reader(handle), [])
    if header != names:
        raise ValueError(f"{path} has columns {header}, not {row_type.__name__}'s {names}: use another --out folder")


def append_csv(rows: list[OpRow], path: Path) -> None:
    """Append ``rows`` to the CSV at ``path``, with a header when the file is new."""
    check_csv(path, type(rows[0]))
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(rows[0])))
        if new:
            writer.writeheader()
        writer.writerows(asdict(r) for r in rows)


def plot_csv(path: Path, out_dir: Path) -> list[Path]:
    """Time vs N and memory vs N (fwd+bwd) per backend, from the CSV's latest date."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with path.open() as handle:
        records = [r for r in csv.DictReader(handle) if r["mode"] == "fwd+bwd"]
    latest = max(r["date"] for r in records)
    records = [r for r in records if r["date"] == latest]
    written = []
    for column, label, name in (("median_ms", "fwd+bwd time (ms)", "time_vs_n.png"),
                                ("extra_mib", "peak extra memory (MiB)", "memory_vs_n.png")):  # fmt: skip
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in sorted({(r["backend"], r["d"], r["dtype"]) for r in records}):
            points = sorted((int(r["n"]), float(r[column])) for r in records
                            if (r["backend"], r["d"], r["dtype"]) == key and r[column] not in ("", "None"))  # fmt: skip
            if points:
                ax.plot(*zip(*points), marker="o", label=f"{key[0]} d={key[1]} {key[2]}")
        ax.set_xlabel("N (rows)")
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
        ax.set_title(f"guided_embedding, {records[0]['device']}")
        if ax.lines:
            ax.legend(fontsize=7)
        fig.tight_layout()
        out = out_dir / name
        fig.savefig(out, dpi=120)
        plt.close(fig)
        written.append(out)
    return written


def profile_step(
    steps: int, out_dir: Path, config=None, denoiser=None, reward=None, run=None,
    floors: dict[str, float] | None = None,
) -> str:  # fmt: skip
    """Profile eager guided denoising steps of ``run`` (default: built from the offline
    demo models); returns a per-component table and writes a Chrome trace. ``floors``:
    floor ms per component range (:func:`entrgi.step_floor.range_floors`), shown beside
    the measured device time."""
    from torch.profiler import ProfilerActivity, profile

    from entrgi.config import GuidanceConfig
    from entrgi.demo import DEMO_PROMPTS, build_demo_denoiser, default_cache_dir, minilm_path
    from entrgi.denoisers import load_denoiser
    from entrgi.rewards import load_reward
    from entrgi.sampler import DiffusionRun, GuidanceTable

    if run is None:
        config = config or GuidanceConfig(num_samples=4, steps=steps, max_new_tokens=16, guidance_steps=3)
        denoiser = denoiser or load_denoiser(str(build_demo_denoiser(default_cache_dir() / "demo-denoiser-minilm")))
        reward = reward or load_reward(minilm_path(), kind="similarity")
        prompts = list(DEMO_PROMPTS[:1])
        generator = torch.Generator(denoiser.device).manual_seed(0)
        run = DiffusionRun(denoiser, denoiser.encode_prompts(prompts), config, generator,
                           GuidanceTable.between(denoiser, reward), reward,
                           reward.prepare(prompts, config.num_samples))  # fmt: skip
    run.step(0)  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for step in range(1, steps):
            run.step(step)
        if run.canvas.is_cuda:
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1e3 / (steps - 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    trace = out_dir / "guided_step_trace.json"
    prof.export_chrome_trace(str(trace))
    layers = f"denoiser layers: {run.denoiser.layers.describe()}"
    if run.reward is not None:
        layers += f"\nreward layers: {run.reward.guidance_layers.describe()}"
    return _profile_table(prof.key_averages(), steps - 1, wall_ms, trace, floors or {}) + "\n" + layers


SYNC_EVENTS = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def _profile_table(averages, steps: int, wall_ms: float, trace: Path, floors: dict[str, float]) -> str:
    """Per-component rows (``entrgi.*`` ranges: calls, CPU time and the device time of
    the work each launched, nested ranges included, see :mod:`entrgi.trace_time`; with
    ``floors``, each range's floor ms beside it), then the step's wall time, the device
    time the kernels kept busy, the host gaps (wall minus busy: launch overhead and
    waits) and the host syncs per step; on CUDA, each component's kernels that took the
    most device time (:func:`entrgi.trace_time.kernel_table`)."""
    from entrgi.trace_time import device_time_by_range, kernel_table

    per_step = lambda us: us / 1e3 / steps  # noqa: E731
    times = device_time_by_range(trace)
    cpu_side = [e for e in averages if getattr(e, "device_type", DeviceType.CPU) == DeviceType.CPU]
    components = sorted((e for e in cpu_side if e.key.startswith("entrgi.")), key=lambda e: -e.cpu_time_total)
    head = f"{'component':<34} {'calls':>6} {'CPU ms/step':>12} {'device ms/step':>15}"
    lines = [head + (f" {'floor ms':>9} {'x floor':>8}" if floors else "")]
    for e in components:
        device_ms = per_step(times.per_range.get(e.key, 0.0))
        line = f"{e.key:<34} {e.count:>6} {per_step(e.cpu_time_total):12.2f} {device_ms:15.2f}"
        if e.key in floors:
            line += f" {floors[e.key]:9.2f} {cell(device_ms / floors[e.key] if device_ms else None, '8.1f')}"
        lines.append(line)
    syncs = sum(e.count for e in cpu_side if e.key in SYNC_EVENTS) / steps
    lines.append(f"{'step wall time':<34} {'':>6} {wall_ms:12.2f}")
    if torch.cuda.is_available():
        lines.append(f"{'launched outside these ranges':<34} {'':>6} {'':>12} {per_step(times.outside):15.2f}")
        lines.append(f"{'device busy (all kernels)':<34} {'':>6} {'':>12} {per_step(times.total):15.2f}")
        lines.append(f"{'host gaps (wall - device busy)':<34} {'':>6} {wall_ms - per_step(times.total):12.2f}")
    lines.append(f"{'host syncs per step':<34} {syncs:>6.1f}")
    lines.append(f"(a range's device time includes its nested ranges': reward_forward_backward holds the op's "
                 f"backward; trace: {trace})")  # fmt: skip
    if times.kernels:
        lines += ["", "kernels per component: device ms and launches per step, share of the component"]
        lines += kernel_table(times, steps)
    return "\n".join(lines)
