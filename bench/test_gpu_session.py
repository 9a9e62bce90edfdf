"""bench/gpu_session.sh, run with stand-ins for `python`, `entrgi` and `timeout` that only
record their arguments: every command a stage would run must parse with the real
parsers, and every pytest selection must collect tests, so that a renamed flag or test
is found here and not on a lent GPU's clock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from entrgi.cli import build_parser
from entrgi.step_benchmark import StepOptions

ROOT = Path(__file__).resolve().parent.parent
QUICK_SECONDS = 520  # the quick stage fits one call of a 15-minute lease: 8 min 40 s

STAND_IN = """#!{python}
import json, os, sys
name, args = os.path.basename(sys.argv[0]), sys.argv[1:]
with open(os.environ["STAND_IN_LOG"], "a") as log:
    log.write(json.dumps([name, *args]) + "\\n")
if name == "timeout":
    os.execvp(args[1], args[1:])
if args == ["-"]:
    sys.stdin.read()
"""


def run_stage(stage: str, tmp_path: Path) -> list[list[str]]:
    """The commands ``bash bench/gpu_session.sh stage`` runs, each as [name, *args]."""
    bin_dir, log = tmp_path / "bin", tmp_path / "commands.jsonl"
    bin_dir.mkdir()
    for name in ("python", "entrgi", "timeout"):
        path = bin_dir / name
        path.write_text(STAND_IN.format(python=sys.executable))
        path.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STAND_IN_LOG": str(log), "OUT": str(tmp_path)}
    done = subprocess.run(["bash", "bench/gpu_session.sh", stage], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in log.read_text().splitlines()]


def op_breakdown_parser():
    """bench/op_breakdown.py's parser, imported when first needed: the script imports
    Triton, which must not load before another bench module sets TRITON_INTERPRET."""
    bench = str(Path(__file__).resolve().parent)
    if bench not in sys.path:
        sys.path.insert(0, bench)
    import op_breakdown

    return op_breakdown.build_parser()


def check_parses(command: list[str]) -> None:
    """Fails the test unless ``command`` is one the stage may run and its flags parse."""
    name, *args = command
    try:
        if name == "entrgi":
            parsed = build_parser().parse_args(args)
            StepOptions.from_args(parsed)  # the step options' own checks
        elif args[:1] == ["bench/op_breakdown.py"]:
            op_breakdown_parser().parse_args(args[1:])
        else:
            pytest.fail(f"the stage runs an unexpected command: {command}")
    except SystemExit:
        pytest.fail(f"does not parse: {command}")


def benchmark_commands(commands: list[list[str]]) -> list[list[str]]:
    """Leaves out installing, the import check, the environment report and pytest."""
    setup = (["-m", "pip"], ["-c"], ["-"], ["-m", "pytest"])
    return [c for c in commands if c[0] != "timeout" and not any(c[1 : 1 + len(s)] == s for s in setup)]


@pytest.mark.parametrize(
    "stage", ["quick", "step", "moments", "profile", "compile", "fused", "op", "baseline", "sweep", "sweep-bf16"]
)
def test_every_benchmark_command_of_a_stage_parses(stage, tmp_path):
    commands = benchmark_commands(run_stage(stage, tmp_path))
    assert commands
    for command in commands:
        check_parses(command)


def test_the_quick_stage_fits_one_call_of_a_short_lease(tmp_path):
    commands = run_stage("quick", tmp_path)
    limits = [int(c[1]) for c in commands if c[0] == "timeout"]
    assert len(limits) == 5 and sum(limits) <= QUICK_SECONDS


@pytest.mark.parametrize("stage", ["quick", "tests", "tests-rest"])
def test_every_pytest_selection_of_a_stage_collects_tests(stage, tmp_path):
    selections = [c[3:] for c in run_stage(stage, tmp_path) if c[1:3] == ["-m", "pytest"]]
    assert selections
    for selection in selections:
        collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *selection], cwd=ROOT,
                                   capture_output=True, text=True)  # fmt: skip
        assert collected.returncode == 0, f"{selection}: {collected.stdout[-2000:]}"
