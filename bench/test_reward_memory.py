"""``bench/reward_memory.py`` counts what a reward layer keeps, stock against lean and
lean with folded attention, and
prints a well-formed table (a tiny shape; the numbers, not the speed, are checked)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location("reward_memory", Path(__file__).with_name("reward_memory.py"))
reward_memory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reward_memory)


def test_lean_layer_keeps_less_and_the_table_says_so(capsys):
    kept = [reward_memory.layer_kept_bytes("tiny-reward", 2, 8, torch.bfloat16, lean, folded)
            for lean, folded in ((False, False), (True, False), (True, True))]  # fmt: skip
    assert 0 < kept[1] < kept[0]
    reward_memory.main(["--shape", "tiny-reward", "--rows", "2", "--tokens", "8"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| per layer")]
    assert rows == ["| per layer (MiB) | " + " | ".join(f"{k / 2**20:.1f}" for k in kept) + " |"]


def test_folded_attention_keeps_the_key_value_heads_unrepeated():
    """Qwen3-0.6B's heads (16 query, 8 key / value, 128 wide) over a few tokens: the
    folded attention keeps its keys and values as they are, not one copy per query head
    (it keeps its prepared mask instead: (tokens x 2) x tokens, small at these sizes)."""
    lean, folded = (reward_memory.layer_kept_bytes("qwen3-0.6b", 2, 24, torch.bfloat16, True, folded)
                    for folded in (False, True))  # fmt: skip
    repeats = 2 * (2 * 24 * (16 - 8) * 128 * 2)  # keys and values: rows x tokens x extra heads x width x bytes
    mask = 2 * (2 * 24) * 32 * 2  # rows x folded query rows x aligned keys x bytes
    assert lean - folded >= repeats - mask > 0  # (the unfolded call also keeps the bool mask)
