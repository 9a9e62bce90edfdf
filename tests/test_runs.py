"""Long runs: independent batches, resumable JSONL results, torchrun with 2 gloo processes."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys

import pytest

from entrgi import GuidanceConfig, generate, load_denoiser, load_reward
from entrgi.cli import main
from entrgi.results import RESULTS_FORMAT, ResultsLog
from entrgi.sampler import BatchedGeneration

PROMPTS = ["hello there", "how are you", "tell me about the sea", "a sunny day", "what is rain"]
FLAGS = ["--steps", "2", "--max-new-tokens", "3", "--num-samples", "2", "--guidance-steps", "1",
         "--prompts-per-batch", "2", "--seed", "7", "--quiet"]  # fmt: skip


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"id": i, "question": p}) + "\n" for i, p in enumerate(PROMPTS)))
    return str(path)


def _generate_args(mlm_path, classifier_path, dataset, output):
    return ["generate", "--model", mlm_path, "--reward-model", classifier_path, "--dataset", dataset,
            "--prompt-field", "question", "--output", str(output), *FLAGS]  # fmt: skip


def test_a_batch_gives_the_same_tokens_alone_or_in_a_run(mlm_path, classifier_path):
    denoiser, reward = load_denoiser(mlm_path), load_reward(classifier_path)
    settings = dict(steps=2, max_new_tokens=3, num_samples=2, guidance_steps=1, prompts_per_batch=2, seed=3)
    whole = generate(PROMPTS, denoiser=denoiser, reward=reward, progress=False, **settings)
    job = BatchedGeneration(PROMPTS, denoiser, reward, GuidanceConfig(**settings))
    assert job.num_batches == 3 and list(job.batch_range(2)) == [4]
    last = job.run_batch(2)
    assert [r.response_ids for r in last] == [whole[4].response_ids]
    assert [r.rewards for r in last] == [whole[4].rewards]
    assert whole[0].response_ids != whole[2].response_ids  # batches draw different numbers
    with pytest.raises(ValueError, match=r"batch_index must be in \[0, 3\), got 3"):
        job.run_batch(3)


def _records(path):
    lines = path.read_text().splitlines()
    return json.loads(lines[0]), [json.loads(line) for line in lines[1:]]


def test_jsonl_output_resumes_after_an_interruption(tmp_path, mlm_path, classifier_path, dataset, monkeypatch, capsys):
    full = tmp_path / "full.jsonl"
    assert main(_generate_args(mlm_path, classifier_path, dataset, full)) == 0
    header, records = _records(full)
    assert header["format"] == "entrgi-results/1" and header["config"]["prompts_per_batch"] == 2
    assert [r["index"] for r in records] == [0, 1, 2, 3, 4] and [r["batch"] for r in records] == [0, 0, 1, 1, 2]
    assert [r["prompt"] for r in records] == PROMPTS and all(r["forward_passes"] == 2 for r in records)

    # killed while writing batch 1: batch 0 is on disk, then a torn line
    partial = tmp_path / "partial.jsonl"
    lines = full.read_text().splitlines(keepends=True)
    partial.write_text("".join(lines[:3]) + lines[3][:25])
    ran = []
    run_batch = BatchedGeneration.run_batch
    monkeypatch.setattr(BatchedGeneration, "run_batch", lambda self, b, p=False: ran.append(b) or run_batch(self, b, p))
    assert main(_generate_args(mlm_path, classifier_path, dataset, partial)) == 0
    assert ran == [1, 2]
    assert "resuming" in capsys.readouterr().out
    assert _records(partial) == _records(full)

    ran.clear()
    assert main(_generate_args(mlm_path, classifier_path, dataset, partial)) == 0  # nothing left to do
    assert ran == [] and _records(partial) == _records(full)
    assert main(_generate_args(mlm_path, classifier_path, dataset, partial)[:-1] + ["--lr", "0.1", "--quiet"]) == 2
    assert "was written with a different config" in capsys.readouterr().err


def _log_header(**changes) -> str:
    fields = {"format": RESULTS_FORMAT, "config": dataclasses.asdict(GuidanceConfig()), "dataset": "data.jsonl",
              "prompt_field": "prompt", **changes}  # fmt: skip
    return json.dumps(fields) + "\n"


@pytest.mark.parametrize(
    "text,match",
    [
        ("not json\n", r"bad.jsonl:1 is not JSON: Expecting value"),
        ('["x"]\n', r"bad.jsonl is not an entrgi results log"),
        (_log_header(format="other/1"), r"bad.jsonl is not an entrgi results log"),
        (_log_header(dataset="other.jsonl"), r"bad.jsonl was written with a different dataset \('other.jsonl'\)"),
        (_log_header(prompt_field="question"), r"bad.jsonl was written with a different prompt_field \('question'\)"),
        (_log_header() + '{"index": 0\n{"index": 1}\n', r"bad.jsonl:2 is not JSON"),  # not the last, torn line
    ],
)
def test_a_results_log_that_cannot_be_resumed_is_named(tmp_path, text, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        ResultsLog(path, GuidanceConfig(), "data.jsonl", "prompt")


def test_a_batch_is_finished_when_each_of_its_prompts_has_a_record_and_the_latest_record_counts(tmp_path):
    records = [
        {"index": 3, "prompt": "d"}, {"index": 0, "prompt": "a"}, {"index": 1, "prompt": "b"},
        {"index": 2, "prompt": "another c"}, {"index": 0, "prompt": "a", "rerun": True},
    ]  # fmt: skip
    path = tmp_path / "log.jsonl"
    path.write_text(_log_header() + "".join(json.dumps(record) + "\n" for record in records))
    log = ResultsLog(path, GuidanceConfig(), "data.jsonl", "prompt")
    # batch 1's index 2 holds another prompt's record: that batch runs again
    assert log.finished_batches(["a", "b", "c", "d"], [range(0, 2), range(2, 4)]) == {0}
    ordered = log.ordered_records()
    assert [r["index"] for r in ordered] == [0, 1, 2, 3] and ordered[0].get("rerun")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LEAVE_AND_LIST_THREADS = """
import os
from entrgi.distributed import close_world, init_world
world, _ = init_world("cpu")
import transformers.modeling_utils  # imports torch.distributed.nn, as loading a model does
close_world(world)
names = sorted(open(f"/proc/self/task/{task}/comm").read().strip() for task in os.listdir("/proc/self/task"))
os.write(1, f"threads {names}\\n".encode())  # one write: the two ranks' lines never interleave
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="lists threads through Linux's /proc")
def test_leaving_the_job_stops_the_process_groups_threads(tmp_path):
    # a group that outlives destroy_process_group keeps gloo's threads running until
    # exit, where they can abort the process (SIGABRT after the results were written)
    script = tmp_path / "leave.py"
    script.write_text(LEAVE_AND_LIST_THREADS)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", str(script)]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    threads = [line for line in done.stdout.splitlines() if line.startswith("threads")]
    assert len(threads) == 2 and not any("gloo" in line for line in threads), threads


def _torchrun_generate(mlm_path, classifier_path, dataset, output) -> subprocess.CompletedProcess:
    """``entrgi generate`` in 2 gloo processes under torchrun; must exit cleanly."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", "-m", "entrgi",
               *_generate_args(mlm_path, classifier_path, dataset, output)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]  # where a rank stopped
    return done


def test_torchrun_two_gloo_processes_match_one_process(tmp_path, mlm_path, classifier_path, dataset):
    single = tmp_path / "single.json"
    assert main(_generate_args(mlm_path, classifier_path, dataset, single)) == 0
    double = tmp_path / "double.json"
    done = _torchrun_generate(mlm_path, classifier_path, dataset, double)
    assert done.stdout.count("wrote") == 1  # only rank 0 writes
    one, two = json.loads(single.read_text()), json.loads(double.read_text())
    assert [r["prompt"] for r in two["results"]] == PROMPTS
    assert two["results"] == one["results"] and two["metrics"] == one["metrics"]


def test_torchrun_resumes_a_log_that_rank_0_reads_for_every_rank(tmp_path, mlm_path, classifier_path, dataset):
    single = tmp_path / "single.jsonl"
    assert main(_generate_args(mlm_path, classifier_path, dataset, single)) == 0
    double = tmp_path / "double.jsonl"
    double.write_text("".join(single.read_text().splitlines(keepends=True)[:3]))  # batch 0 done
    # rank 0 alone reads the log; the batches left (1 and 2) go to both ranks from it
    done = _torchrun_generate(mlm_path, classifier_path, dataset, double)
    assert done.stdout.count("resuming") == 1 and _records(double) == _records(single)
