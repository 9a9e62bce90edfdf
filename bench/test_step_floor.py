"""``entrgi.step_floor`` counts a step's FLOPs on the meta device: the denoiser's head on
the response only, the reward's count following its memory options; ``bench/step_floor.py``
prints a full table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from entrgi import step_floor as floors
from entrgi.step_benchmark import PRESETS, SHAPES, StepOptions, build_models

_spec = importlib.util.spec_from_file_location("step_floor_tool", Path(__file__).with_name("step_floor.py"))
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)


def _tiny(cache_prefix=False, checkpoint=False):
    options = StepOptions(reward_cache_prefix=cache_prefix, reward_checkpoint=checkpoint, reward_lean=False,
                          denoiser_fused=False)  # fmt: skip
    return build_models("tiny", floors.META, floors.DTYPE, options)


def test_denoiser_head_is_counted_on_the_response_only():
    denoiser, _ = _tiny()
    total, head = floors.denoiser_flops(denoiser, rows=3, new_tokens=16)
    hidden, vocab = SHAPES["tiny-denoiser"][0], SHAPES["tiny-denoiser"][-1]
    assert head == 2 * 3 * 16 * hidden * vocab  # Dream's head runs on the 16 positions one column back
    assert total > 2 * head


def test_reward_count_follows_its_memory_options():
    plain, cached, checkpointed = (
        floors.reward_flops(_tiny(cache, checkpoint)[1], rows=2, new_tokens=16)
        for cache, checkpoint in ((False, False), (True, False), (False, True))
    )
    assert 0 < cached < plain < checkpointed


def test_table_lists_every_component_and_both_floors(capsys):
    tool.main(["--preset", "tiny", "--new-tokens", "16", "--masked-fraction", "0.25"])
    lines = capsys.readouterr().out.splitlines()
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if line.startswith("| ")]
    names = [row[0] for row in cells]
    assert names[1:] == ["denoiser forward", "of which output head", "logits to float32", "entropy confidence",
                         "guided op forward (x3)", "reward fwd+bwd (x3)", "op backward + Adam (x3)",
                         "commit from float32 phi", "commit from the model's logits", "unguided step",
                         "guided step"]  # fmt: skip
    components = floors.step_components("tiny", StepOptions(masked_fraction=0.25, new_tokens=16))
    unguided, guided = (floors.step_floor_ms(components, guided) for guided in (False, True))
    unguided_parts = ("denoiser forward", "commit from the model's logits")
    assert unguided == sum(c.floor_ms for c in components if c.name in unguided_parts)
    guided_parts = {c.name for c in components if not c.detail} - {"commit from the model's logits"}
    assert guided == pytest.approx(sum(c.floor_ms for c in components if c.name in guided_parts))


def test_weights_read_in_full_leave_out_the_input_table_unless_the_head_shares_it():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    def weight_bytes(tied):
        config = Qwen2Config(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)  # fmt: skip
        with floors.META:  # built there: moving a model to the meta device unties its tables
            model = Qwen2ForCausalLM(config)
        everything = sum(p.numel() for p in model.parameters()) * 4
        return floors._weight_bytes(model), everything

    table = 1000 * 32 * 4
    untied, untied_everything = weight_bytes(tied=False)
    tied, tied_everything = weight_bytes(tied=True)
    assert untied == untied_everything - table  # the head's own table is read in full, the input one gathered
    assert tied == tied_everything  # one table, read in full by the head


def test_component_floor_is_its_slower_ceiling_and_steps_add_theirs():
    from entrgi.benchmark import PEAK_BYTES_PER_S, PEAK_FLOP_PER_S

    compute = floors.Component("gemm", flops=2 * PEAK_FLOP_PER_S * 1e-3, nbytes=PEAK_BYTES_PER_S * 1e-3)
    memory = floors.Component("copy", flops=PEAK_FLOP_PER_S * 1e-3, nbytes=3 * PEAK_BYTES_PER_S * 1e-3)
    assert (compute.floor_ms, compute.bound) == (pytest.approx(2.0), "compute")
    assert (memory.floor_ms, memory.bound) == (pytest.approx(3.0), "memory")
    table = floors.format_floor("p", [compute, floors.Component("reward", 0.0, memory.nbytes, "guided")])
    assert table.splitlines()[-2:] == [
        "| unguided step | | | 2.00 | |",
        "| guided step | | | 5.00 | guided / unguided 2.50 |",
    ]


def test_logits_bytes_follow_their_dtype_in_each_step():
    """The denoiser writes bf16 logits for every response row; a guided step copies them
    to float32 and commits from that, an unguided one commits from the bf16 logits."""
    by_name = {c.name: c for c in floors.step_components("tiny", StepOptions(masked_fraction=0.25, new_tokens=16))}
    _, _, prompts, k = PRESETS["tiny"]
    vocab, rows = SHAPES["tiny-denoiser"][-1], prompts * k * 16
    assert by_name["logits to float32"].nbytes == rows * vocab * (2 + 4)
    assert by_name["commit from float32 phi"].nbytes == 0.25 * rows * vocab * 4
    assert by_name["commit from the model's logits"].nbytes == 0.25 * rows * vocab * 2


def test_op_bytes_are_the_logits_moments_and_table_of_each_guidance_step():
    """Per guidance step the op's forward reads phi and the table; the backward + Adam
    reads and writes phi and both float32 moments and reads the table, or with recomputed
    moments reads the bf16 initial logits, writes phi, and reads the table once per GEMM
    replayed (1 + 2 + 3 over three steps)."""
    _, _, prompts, k = PRESETS["tiny"]
    vocab, active = SHAPES["tiny-denoiser"][-1], 0.5 * prompts * k * 16
    reward_vocab, reward_hidden = SHAPES["tiny-reward"][-1], SHAPES["tiny-reward"][0]
    phi, table = active * vocab * 4, reward_vocab * reward_hidden * 2
    stored, replayed = (
        {c.name: c.nbytes for c in floors.step_components("tiny", options)}
        for options in (StepOptions(new_tokens=16), StepOptions(new_tokens=16, adam_moments="recompute"))
    )
    assert stored["guided op forward"] == 3 * (phi + table)
    assert stored["op backward + Adam"] == 3 * (2 * phi + 4 * phi + table)
    assert replayed["op backward + Adam"] == 3 * (active * vocab * 2 + phi) + 6 * table


def test_checkpointed_reward_reads_its_weights_a_third_time():
    plain, checkpointed = (
        next(c.nbytes for c in floors.step_components("tiny", options) if c.name == "reward fwd+bwd")
        for options in (StepOptions(new_tokens=16), StepOptions(new_tokens=16, reward_checkpoint=True))
    )
    assert checkpointed == pytest.approx(1.5 * plain)


def test_bfloat16_moments_halve_the_moments_bytes():
    full, half = (
        {c.label: c.nbytes for c in floors.step_components("tiny", StepOptions(new_tokens=16, adam_moments=dtype))}
        for dtype in ("float32", "bfloat16")
    )
    adam = "op backward + Adam (x3)"
    phi = full["commit from float32 phi"]  # one read of the active rows' float32 logits
    table = (full[adam] / 3) - 6 * phi
    # phi read and written, two half-size moments read and written
    assert half[adam] / 3 == pytest.approx(2 * phi + 2 * phi + table)


def test_recomputed_moments_trade_bytes_for_gemms():
    stored, replayed = (
        next(c for c in floors.step_components("tiny", options) if c.name == "op backward + Adam")
        for options in (StepOptions(new_tokens=16), StepOptions(new_tokens=16, adam_moments="recompute"))
    )
    assert replayed.flops == pytest.approx(2 * stored.flops)  # 1 + 2 + 3 GEMMs instead of 3 x 1
    assert replayed.nbytes < stored.nbytes


def test_tool_passes_the_moments_dtype_on(capsys):
    def adam_floor(*options):
        tool.main(["--preset", "1xK4-0.6b", *options])  # meta device: no weights
        out = capsys.readouterr().out
        return out, next(line for line in out.splitlines() if line.startswith("| op backward + Adam"))

    (full_out, full), (half_out, half) = adam_floor(), adam_floor("--adam-moments", "bfloat16")
    assert "float32 Adam moments" in full_out and "bfloat16 Adam moments" in half_out
    assert full != half


@pytest.mark.parametrize("guided", [True, False])
def test_profile_ranges_cover_the_step(guided):
    components = floors.step_components("tiny", StepOptions(new_tokens=16))
    ranges = floors.range_floors(components, guided)
    assert all(ms > 0 for key, ms in ranges.items() if guided or key in ("entrgi.denoiser_forward", "entrgi.commit"))
    assert sum(ranges.values()) == pytest.approx(floors.step_floor_ms(components, guided))
