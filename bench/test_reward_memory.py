"""``bench/reward_memory.py`` counts what a reward layer keeps, stock against lean, and
prints a well-formed table (a tiny shape; the numbers, not the speed, are checked)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location("reward_memory", Path(__file__).with_name("reward_memory.py"))
reward_memory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reward_memory)


def test_lean_layer_keeps_less_and_the_table_says_so(capsys):
    stock, lean = (reward_memory.layer_kept_bytes("tiny-reward", 2, 8, torch.bfloat16, lean) for lean in (False, True))
    assert 0 < lean < stock
    reward_memory.main(["--shape", "tiny-reward", "--rows", "2", "--tokens", "8"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| per layer")]
    assert rows == [f"| per layer (MiB) | {stock / 2**20:.1f} | {lean / 2**20:.1f} |"]
