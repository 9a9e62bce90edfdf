"""Device time per profiler range from a Chrome trace: launches on any thread count; the
per-kernel table of each range."""

from __future__ import annotations

import json

from entrgi.trace_time import KernelTime, device_time_by_range, kernel_table, short_kernel_name
from helpers import trace_event


def test_work_is_charged_to_every_range_holding_its_launch(tmp_path):
    events = [
        trace_event("user_annotation", "entrgi.reward", 0, 100),
        trace_event("user_annotation", "entrgi.op_backward", 40, 20, tid=2),  # the autograd thread, inside in time
        trace_event("user_annotation", "other.range", 0, 500),  # not ours: ignored
        trace_event("cuda_runtime", "cudaLaunchKernel", 10, 1, correlation=1),
        trace_event("kernel", "forward", 300, 5, tid=7, correlation=1),  # runs late: the launch time decides
        trace_event("cuda_runtime", "cudaLaunchKernel", 50, 1, tid=2, correlation=2),
        trace_event("kernel", "backward", 310, 7, tid=7, correlation=2),
        trace_event("cuda_driver", "cuLaunchKernelEx", 20, 1, correlation=4),
        trace_event("gpu_memset", "Memset (Device)", 320, 2, tid=7, correlation=4),
        trace_event("cuda_runtime", "cudaLaunchKernel", 150, 1, correlation=3),
        trace_event("kernel", "commit", 330, 11, tid=7, correlation=3),  # launched outside every range
        trace_event("kernel", "unmatched", 340, 3, tid=7, correlation=99),  # no launch record: outside
        trace_event("cuda_runtime", "cudaMemcpyAsync", 0, 1, correlation=5),  # at a range's start: inside
        trace_event("gpu_memcpy", "Memcpy DtoD", 350, 4, tid=7, correlation=5),
        trace_event("cuda_runtime", "cudaLaunchKernel", 60, 1, tid=2, correlation=6),  # at a range's end: inside
        trace_event("kernel", "backward_tail", 360, 1, tid=7, correlation=6),
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    times = device_time_by_range(path)
    assert times.per_range == {"entrgi.reward": 19.0, "entrgi.op_backward": 8.0}
    assert (times.outside, times.total) == (14.0, 33.0)
    assert times.kernels == {
        "entrgi.reward": {"forward": KernelTime(1, 5.0), "backward": KernelTime(1, 7.0),
                          "Memset (Device)": KernelTime(1, 2.0), "Memcpy DtoD": KernelTime(1, 4.0),
                          "backward_tail": KernelTime(1, 1.0)},
        "entrgi.op_backward": {"backward": KernelTime(1, 7.0), "backward_tail": KernelTime(1, 1.0)},
    }  # fmt: skip
    assert device_time_by_range({"traceEvents": events}, prefix="other.").per_range == {"other.range": 33.0 - 3.0}


def test_kernel_table_ranks_each_ranges_kernels_and_sums_the_rest():
    events = [
        trace_event("user_annotation", "entrgi.small", 0, 10),
        trace_event("user_annotation", "entrgi.big", 20, 100),
    ]
    durations = {"gemm": [30.0, 30.0], "add": [8.0, 4.0, 4.0], "copy": [2.0], "norm": [1.0, 1.0]}
    correlation = 0
    for name, runs in durations.items():
        for dur in runs:
            correlation += 1
            events += [trace_event("cuda_runtime", "cudaLaunchKernel", 20 + correlation, 1, correlation=correlation),
                       trace_event("kernel", name, 200 + correlation, dur, tid=7, correlation=correlation)]  # fmt: skip
    events += [trace_event("cuda_runtime", "cudaLaunchKernel", 5, 1, correlation=99),
               trace_event("kernel", "sample", 300, 3, tid=7, correlation=99),
               trace_event("user_annotation", "entrgi.idle", 400, 10),  # its one kernel took no time: share 0
               trace_event("cuda_runtime", "cudaLaunchKernel", 405, 1, correlation=100),
               trace_event("kernel", "fill", 410, 0, tid=7, correlation=100)]  # fmt: skip
    lines = kernel_table(device_time_by_range({"traceEvents": events}), steps=2, top=2)
    assert [line.split() for line in lines] == [
        ["entrgi.big", "0.04", "ms", "4.0", "launches"],  # 80 µs and 8 launches over 2 steps
        ["0.03", "ms", "1.0", "75.0%", "gemm"],
        ["0.01", "ms", "1.5", "20.0%", "add"],
        ["0.00", "ms", "1.5", "5.0%", "(2", "other", "kernels)"],
        ["entrgi.small", "0.00", "ms", "0.5", "launches"],
        ["0.00", "ms", "0.5", "100.0%", "sample"],
        ["entrgi.idle", "0.00", "ms", "0.5", "launches"],
        ["0.00", "ms", "0.5", "0.0%", "fill"],
    ]


def test_short_kernel_names_drop_namespaces_arguments_and_cut_long_ones():
    aten = ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>, "
            "std::array<char*, 3ul> >(int, at::native::CUDAFunctor_add<c10::BFloat16>, std::array<char*, 3ul>)")  # fmt: skip
    assert short_kernel_name(aten, width=200) == (
        "vectorized_elementwise_kernel<4, CUDAFunctor_add<BFloat16>, array<char*, 3ul> >"
    )
    softmax = "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float>(float*, (anonymous namespace)::T)"
    assert short_kernel_name(softmax) == "cunn_SoftMaxForward<4, float>"
    assert short_kernel_name("_soft_forward_kernel") == "_soft_forward_kernel"  # Triton: the function's name
    assert short_kernel_name("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN", width=12) == "nvjet_tst_1…"
    assert short_kernel_name("nvjet_tst_12", width=12) == "nvjet_tst_12"  # exactly the width: whole
