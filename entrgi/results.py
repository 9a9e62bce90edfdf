"""Prompt datasets in, results out: the published results JSON and a resumable JSONL log."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from entrgi.config import GuidanceConfig
from entrgi.sampler import PromptResult

RESULTS_FORMAT = "entrgi-results/1"


def read_prompts(path: str, field: str = "prompt") -> list[str]:
    """Prompts from a .jsonl file (one object per line), a .json file (an array of
    objects), each object's string ``field``, or from a text file (one prompt per line).
    Blank lines are skipped. Raises ValueError naming the file and the line or index of
    a record that is not such an object, and for a file without prompts."""
    text = Path(path).read_text()
    if path.endswith(".json"):
        records = _parsed(path, text)
        if not isinstance(records, list):
            raise ValueError(f"{path} must hold a JSON array of objects, got {type(records).__name__}")
        prompts = [_prompt_field(record, field, f"{path}[{index}]") for index, record in enumerate(records)]
    else:
        lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
        if path.endswith(".jsonl"):
            prompts = [_prompt_field(_parsed(f"{path}:{n}", line), field, f"{path}:{n}") for n, line in lines]
        else:
            prompts = [line for _, line in lines]
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def _parsed(where: str, text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where} is not JSON: {error}") from None


def _prompt_field(record, field: str, where: str) -> str:
    if not isinstance(record, dict) or field not in record:
        raise ValueError(f"{where} has no field {field!r}")
    if not isinstance(record[field], str):
        raise ValueError(f"{where}: field {field!r} must be a string, got {type(record[field]).__name__}")
    return record[field]


def result_record(result: PromptResult) -> dict:
    """One prompt's results as the published layout writes them (and, with
    ``output_history``, ``history``: the K response ids after each step)."""
    record = {
        "prompt": result.prompt,
        "responses": result.responses,
        "rewards": result.rewards,
        "best_response": result.best_response,
        "top1_reward": result.top1_reward,
        "avg_reward": result.avg_reward,
        "forward_passes": result.forward_passes,
    }
    if result.history is not None:
        record["history"] = result.history
    return record


def metrics(records: Sequence[dict]) -> dict:
    """Mean Top@1 and Avg@K over prompt records (None when unscored)."""
    top1 = [r["top1_reward"] for r in records]
    avg = [r["avg_reward"] for r in records]
    scored = bool(records) and records[0]["rewards"] is not None
    return {
        "mean_top1_reward": sum(top1) / len(top1) if scored else None,
        "mean_avgN_reward": sum(avg) / len(avg) if scored else None,
        "all_top1_rewards": top1,
        "all_avgN_rewards": avg,
    }


def results_document(config: GuidanceConfig, results: Iterable[PromptResult]) -> dict:
    """The published results layout: config, method, metrics and per-prompt results."""
    records = [result_record(r) for r in results]
    return {"config": dataclasses.asdict(config), "method": config.method, "metrics": metrics(records),
            "results": records}  # fmt: skip


class ResultsLog:
    """A JSONL results file that survives interruption.

    Line 1 is a header with the config and the dataset; every further line is one
    prompt's record with its dataset ``index`` and ``batch``. Whole batches are
    appended and flushed to disk at once, so a resumed run skips finished batches
    and, with per-batch generators, reproduces the uninterrupted run exactly. A line
    torn by a crash is dropped on open; a config that differs from the file's raises.
    """

    def __init__(self, path: str | Path, config: GuidanceConfig, dataset: str, prompt_field: str):
        self.path = Path(path)
        self.header = {"format": RESULTS_FORMAT, "config": dataclasses.asdict(config), "dataset": dataset,
                       "prompt_field": prompt_field}  # fmt: skip
        self.records: list[dict] = []
        if self.path.exists() and self.path.stat().st_size:
            self._load()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.header) + "\n")

    def _load(self) -> None:
        text = self.path.read_text()
        complete, _, torn = text.rpartition("\n")
        if torn:  # an interrupted write: keep only whole lines
            self.path.write_text(complete + "\n")
        lines = complete.split("\n")
        header = _parsed(f"{self.path}:1", lines[0])
        if not isinstance(header, dict) or header.get("format") != RESULTS_FORMAT:
            raise ValueError(f"{self.path} is not an entrgi results log (no {RESULTS_FORMAT!r} header)")
        for key in ("config", "dataset", "prompt_field"):
            if header.get(key) != self.header[key]:
                raise ValueError(
                    f"{self.path} was written with a different {key} ({header.get(key)!r}); "
                    f"resume with the same settings or choose another --output"
                )
        self.records = [_parsed(f"{self.path}:{number}", line) for number, line in enumerate(lines[1:], 2) if line]

    def finished_batches(self, prompts: Sequence[str], batch_ranges: Sequence[range]) -> set[int]:
        """Batches whose every prompt has a record (checked against the prompt text)."""
        done = {r["index"] for r in self.records if r["index"] < len(prompts) and prompts[r["index"]] == r["prompt"]}
        return {b for b, indices in enumerate(batch_ranges) if all(i in done for i in indices)}

    def append(self, batch: int, indices: Sequence[int], results: Sequence[PromptResult]) -> None:
        records = [{"index": i, "batch": batch, **result_record(r)} for i, r in zip(indices, results)]
        with self.path.open("a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())
        self.records += records

    def ordered_records(self) -> list[dict]:
        """One record per dataset index (the latest), in dataset order."""
        return list({r["index"]: r for r in sorted(self.records, key=lambda r: r["index"])}.values())
