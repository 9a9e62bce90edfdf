"""CLI: generate writes the published results layout; bench produces well-formed output."""

from __future__ import annotations

import csv
import json
import re

import pytest
import torch

import entrgi
from entrgi import benchmark
from entrgi.cli import main
from entrgi.model_source import model_source
from entrgi.results import read_prompts
from helpers import CAN_COMPILE, COMPILE_FLAGS


def test_generate_writes_results_json(tmp_path, capsys, mlm_path, classifier_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"question": "hello there"}\n{"question": "how are you"}\n')
    out = tmp_path / "runs" / "results.json"  # a folder that does not exist yet
    code = main([
        "generate", "--model", mlm_path, "--reward-model", classifier_path, "--prompts-file", str(prompts),
        "--prompt-field", "question", "--steps", "2", "--max-new-tokens", "3", "--num-samples", "2",
        "--guidance-steps", "1", "--method", "aps", "--no-deprioritize-eos", "--cuda-graphs", "off",
        "--output-history", "--output", str(out), "--quiet",
    ])  # fmt: skip
    assert code == 0
    assert re.search(r"vocabulary mapping: [\d,]+ of [\d,]+ denoiser ids \(100\.00%\)", capsys.readouterr().err)
    document = json.loads(out.read_text())
    assert document["method"] == "aps" and document["config"]["deprioritize_eos"] is False
    assert document["config"]["cuda_graphs"] is False and document["config"]["output_history"] is True
    assert set(document["metrics"]) == {"mean_top1_reward", "mean_avgN_reward", "all_top1_rewards", "all_avgN_rewards"}
    assert [r["prompt"] for r in document["results"]] == ["hello there", "how are you"]
    assert all(len(r["responses"]) == 2 for r in document["results"])
    for record in document["results"]:  # after each of two steps, the two samples' three new token ids
        assert [[len(ids) for ids in step] for step in record["history"]] == [[3, 3], [3, 3]]


def test_generate_without_a_reward_prints_unscored_results(capsys, mlm_path):
    code = main(["generate", "--model", mlm_path, "--prompt", "hello there", "--method", "none", "--steps", "2",
                 "--max-new-tokens", "3", "--num-samples", "2", "--quiet"])  # fmt: skip
    assert code == 0
    document = json.loads(capsys.readouterr().out)
    assert document["metrics"] == {
        "mean_top1_reward": None, "mean_avgN_reward": None, "all_top1_rewards": [None], "all_avgN_rewards": [None],
    }  # fmt: skip
    assert document["results"][0]["rewards"] is None and len(document["results"][0]["responses"]) == 2


def test_read_prompts_text_jsonl_and_json(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("one\n\ntwo\n")
    assert read_prompts(str(text)) == ["one", "two"]
    records = tmp_path / "p.jsonl"
    records.write_text('{"q": "x", "prompt": "first"}\n\n{"prompt": "second"}\n')
    assert read_prompts(str(records)) == ["first", "second"]
    array = tmp_path / "p.json"
    array.write_text('[{"q": "first"},\n {"q": "second", "prompt": "x"}]\n')
    assert read_prompts(str(array), "q") == ["first", "second"]


@pytest.mark.parametrize(
    "name,text,match",
    [
        ("p.jsonl", '{"prompt": "x"}\n\n{"q": "x"}\n', r"p.jsonl:3 has no field 'prompt'"),  # the file's line number
        ("p.jsonl", '["prompt"]\n', r"p.jsonl:1 has no field 'prompt'"),
        ("p.jsonl", '{"prompt": "x"}\n{"prompt": "y",\n', r"p.jsonl:2 is not JSON: Expecting"),
        ("p.jsonl", '{"prompt": [{"role": "user"}]}\n', r"p.jsonl:1: field 'prompt' must be a string, got list"),
        ("p.jsonl", "\n  \n", r"p.jsonl holds no prompts"),
        ("p.json", '{"prompt": "x"}', r"p.json must hold a JSON array of objects, got dict"),
        ("p.json", '[{"prompt": "x"}, {"q": "y"}]', r"p.json\[1\] has no field 'prompt'"),
        ("p.json", '[{"prompt": "x"}, {"prompt": 3}]', r"p.json\[1\]: field 'prompt' must be a string, got int"),
        ("p.json", '[{"prompt": "x"},]', r"p.json is not JSON: "),
        ("p.json", "[]", r"p.json holds no prompts"),
    ],
)
def test_bad_prompt_files_name_file_and_line(tmp_path, capsys, name, text, match):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        read_prompts(str(path))
    assert main(["generate", "--model", "unused", "--dataset", str(path)]) == 2
    assert re.search("entrgi generate: error: .*" + match, capsys.readouterr().err)


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize(
    "device,message",
    [
        ("gpu", "'gpu' is not a torch device"),
        pytest.param("cuda", "'cuda': no CUDA device is visible", marks=NO_CUDA),
        pytest.param("cuda:99", r"'cuda:99': \d+ CUDA device\(s\) visible", marks=NEEDS_CUDA),
    ],
)
def test_a_device_this_machine_lacks_is_refused(capsys, device, message):
    for command in (["generate", "--model", "unused", "--prompt", "hi"], ["demo"]):
        with pytest.raises(SystemExit) as exit_status:
            main([*command, "--device", device])
        assert exit_status.value.code == 2
        assert re.search(f"argument --device: {message}", capsys.readouterr().err)


@pytest.mark.parametrize(
    "options,message",
    [
        (["--target", "calm seas"], "target is the text a similarity reward moves towards; a classifier reward"),
        (["--reward-kind", "similarity", "--reward-cache-prefix"], "cache_prefix needs a causal reward"),
        (
            ["--reward-kind", "similarity", "--reward-system-prompt", "Be brief."],
            "system_prompt goes into a classifier",
        ),
    ],
)
def test_reward_options_its_kind_does_not_read_fail_before_loading(capsys, mlm_path, options, message):
    args = ["generate", "--model", mlm_path, "--reward-model", "/no/such/reward", "--prompt", "hi", *options]
    assert main(args) == 2
    assert f"entrgi generate: error: {message}" in capsys.readouterr().err


def test_the_reward_system_prompt_reaches_the_reward(monkeypatch, mlm_path, classifier_path):
    loaded, load_reward = [], entrgi.load_reward

    def recording_load_reward(*args, **kwargs):
        loaded.append(load_reward(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(entrgi, "load_reward", recording_load_reward)
    args = ["generate", "--model", mlm_path, "--reward-model", classifier_path, "--prompt", "hi", "--steps", "1",
            "--max-new-tokens", "2", "--num-samples", "1", "--guidance-steps", "1", "--quiet",
            "--reward-system-prompt", "Be brief."]  # fmt: skip
    assert main(args) == 0
    assert loaded[0].system_prompt == "Be brief."


def test_generate_without_prompts_is_an_error(capsys):
    assert main(["generate", "--model", "unused"]) == 2
    assert "entrgi generate: error: give --prompt TEXT or --dataset PATH" in capsys.readouterr().err


def test_bench_op_suite_writes_csv_and_plots(tmp_path, capsys):
    assert main(["bench", "--n", "4", "8", "--d", "16", "--vocab", "64", "--repeats", "2", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "median ms" in printed and "fwd+bwd" in printed
    with (tmp_path / "op_results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 and {r["mode"] for r in rows} == {"forward", "backward", "fwd+bwd"}
    assert all(float(r["median_ms"]) > 0 and r["torch"] and r["device"] for r in rows)
    assert (tmp_path / "time_vs_n.png").stat().st_size > 0


@pytest.mark.skipif(not CAN_COMPILE, reason="torch.compile needs a C++ compiler on the CPU")
def test_bench_compile_backend_times_every_shape(tmp_path, capsys):
    # a second shape used to retrace with a dynamic N, where the reference's torch.rand fails
    args = ["bench", "--backends", "compile", "--n", "4", "8", "--d", "16", "--vocab", "64", "--repeats", "2"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    assert "failed" not in capsys.readouterr().out
    with (tmp_path / "op_results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((r["n"], r["mode"]) for r in rows) == sorted(
        (n, mode) for n in ("4", "8") for mode in ("forward", "backward", "fwd+bwd")
    )


def test_bench_into_a_folder_that_cannot_be_made_fails_before_timing(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["bench", "--n", "4", "--d", "16", "--vocab", "64", "--out", str(tmp_path / "file" / "out")]) == 2
    printed = capsys.readouterr()
    assert "entrgi bench: error:" in printed.err and "median ms" not in printed.out


def test_bench_that_records_nothing_fails(tmp_path, capsys, monkeypatch):
    def fail(backend, n, *args):
        raise RuntimeError(f"{backend} cannot run N={n}")

    monkeypatch.setattr(benchmark, "_bench_backend", fail)
    args = ["bench", "--backends", "torch", "--n", "4", "8", "--d", "16", "--vocab", "64", "--out", str(tmp_path)]
    assert main(args) == 1
    printed = capsys.readouterr()
    assert "torch failed at N=4 d=16 torch.float32: RuntimeError: torch cannot run N=4" in printed.out
    assert "entrgi bench: error: torch failed at every shape" in printed.err
    assert not (tmp_path / "op_results.csv").exists()


def test_bench_step_suite_reports_each_method(tmp_path, capsys):
    args = ["bench", "--suite", "step", "--preset", "tiny", "--new-tokens", "6", "--repeats", "2",
            "--methods", "none", "entrgi", "--masked-fraction", "0.4", "--reward-cache-prefix",
            "--reward-checkpoint", "--no-reward-lean", *COMPILE_FLAGS, "--adam-moments", "bfloat16",
            "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "x unguided" in printed
    with (tmp_path / "step_results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["method"] for r in rows] == ["none", "entrgi"]
    # what ran in place of the stock layers: the reward's checkpointed (and compiled) layers, the
    # denoiser's lean norms and gated MLPs (with the torch backend on a CPU: nothing more)
    reward_layers = ("2 layers compiled; " if COMPILE_FLAGS else "") + "2 layers checkpointed"
    denoiser_layers = "2 layers compiled" if COMPILE_FLAGS else "lean: 2 x Qwen2MLP, 5 x Qwen2RMSNorm"
    assert all(r["reward_layers"] == reward_layers and r["denoiser_layers"] == denoiser_layers for r in rows)
    assert f"tiny: reward layers: {reward_layers}\n" in printed
    assert all(float(r["ms_per_step"]) > 0 and r["preset"] == "tiny" for r in rows)
    assert all(float(r["masked_fraction"]) == 0.4 and r["reward_cache_prefix"] == "True" for r in rows)
    assert all(r["reward_checkpoint"] == "True" and r["adam_moments"] == "bfloat16" for r in rows)
    assert all(r["reward_lean"] == "False" for r in rows)
    assert all(r["compile_layers"] == str(bool(COMPILE_FLAGS)) for r in rows)
    assert float(rows[0]["vs_unguided"]) == 1.0 and float(rows[1]["vs_unguided"]) > 0


def test_bench_refuses_a_csv_of_other_columns_before_running(tmp_path, monkeypatch, capsys):
    from entrgi import step_benchmark

    (tmp_path / "step_results.csv").write_text("date,preset,ms_per_step\n2026-01-01,tiny,1.0\n")
    monkeypatch.setattr(step_benchmark, "bench_steps", lambda *a, **k: pytest.fail("ran before checking the CSV"))
    assert main(["bench", "--suite", "step", "--preset", "tiny", "--out", str(tmp_path)]) == 2
    assert re.search("entrgi bench: error: .*step_results.csv has columns .* use another --out folder",
                     capsys.readouterr().err)  # fmt: skip


def test_bad_input_ends_in_one_line_without_a_traceback(tmp_path, mlm_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n")
    cases = [
        (["--prompts-file", str(tmp_path / "missing.txt")], "No such file or directory"),
        (["--prompts-file", str(prompts)], "method 'entrgi' needs a reward"),
        (["--prompts-file", str(prompts), "--top-p", "1.5"], r"top_p must be in \(0, 1\], got 1.5"),
    ]
    for flags, message in cases:
        assert main(["generate", "--model", mlm_path, *flags]) == 2
        err = capsys.readouterr().err  # the last line; model loading may draw a progress bar above it
        assert "Traceback" not in err and re.fullmatch(f"entrgi generate: error: .*{message}.*", err.splitlines()[-1])


def test_generate_refuses_a_missing_model_folder_or_reward_before_loading_a_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(entrgi, "load_denoiser", lambda *a, **k: pytest.fail("loaded the denoiser"))
    missing = tmp_path / "missing"
    cases = [
        (["--model", str(missing), "--method", "none"], f"denoiser '{missing}': no such folder"),
        (["--model", "org/name", "--reward-model", "./missing"], "reward model './missing': no such folder"),
        (["--model", "org/name", "--reward-model", "a/b/c"], "reward model 'a/b/c': no such folder"),
        (["--model", "org/name", "--method", "bon"], "method 'bon' needs a reward: give --reward-model"),
    ]
    for flags, message in cases:
        assert main(["generate", "--prompt", "hi", *flags]) == 2
        assert capsys.readouterr().err.splitlines()[-1].startswith(f"entrgi generate: error: {message}")


def test_model_source_passes_folders_and_hub_ids(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "model").mkdir()
    assert model_source("~/model", "denoiser") == str(tmp_path / "model")
    assert model_source(str(tmp_path / "model"), "denoiser") == str(tmp_path / "model")
    assert model_source("Dream-org/Dream-v0-Instruct-7B", "denoiser") == "Dream-org/Dream-v0-Instruct-7B"
    assert model_source("gpt2", "reward model") == "gpt2"
    (tmp_path / "weights.bin").write_text("")
    with pytest.raises(FileNotFoundError, match="reward model .*weights.bin': no such folder"):
        model_source(str(tmp_path / "weights.bin"), "reward model")  # a file is no model folder


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--n", "0"], "argument --n: must be at least 1, got 0"),
        (["--d", "64", "-3"], "argument --d: must be at least 1, got -3"),
        (["--vocab", "1"], "argument --vocab: must be at least 2, got 1"),
        (["--repeats", "0"], "argument --repeats: must be at least 1, got 0"),
        (["--n", "x"], "argument --n: 'x' is not an integer"),
        (["--suite", "step", "--new-tokens", "2"], "argument --new-tokens: must be at least 3, got 2"),
        (["--suite", "step", "--guidance-steps", "0"], "argument --guidance-steps: must be at least 1, got 0"),
        (["--profile", "--steps", "1"], "argument --steps: must be at least 2, got 1"),
    ],
)
def test_bench_refuses_sizes_out_of_range_before_running(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *flags, "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and capsys.readouterr().err.splitlines()[-1] == f"entrgi bench: error: {message}"
    assert not list(tmp_path.iterdir())  # nothing ran, nothing written


@pytest.mark.parametrize("flags", [["--suite", "step", "--masked-fraction", "1.5"],
                                   ["--profile", "--preset", "tiny", "--masked-fraction", "0"]])  # fmt: skip
def test_bench_refuses_a_masked_fraction_out_of_range_before_building_models(tmp_path, capsys, monkeypatch, flags):
    import entrgi.step_floor  # noqa: F401  # binds the real build_models before it is patched

    monkeypatch.setattr("entrgi.step_benchmark.build_models", lambda *a, **k: pytest.fail("built models"))
    assert main(["bench", *flags, "--out", str(tmp_path)]) == 2
    value = flags[-1]
    assert capsys.readouterr().err == f"entrgi bench: error: masked_fraction must be in (0, 1], got {float(value)}\n"
    assert not list(tmp_path.iterdir())


def test_generate_help_lists_each_settings_choices_default_and_meaning(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert re.search(r"--method \{entrgi,aps,expectation,bon,none\}\s+default: entrgi", out)
    assert re.search(r"--lr LR\s+default: 0.5", out) and re.search(r"--block-length BLOCK_LENGTH\s+default: unset", out)
    assert re.search(r"--deprioritize-eos, --no-deprioritize-eos\s+default: on", out)
    assert re.search(r"--guide-every GUIDE_EVERY\s+default: 1\n", out)  # 1 and 0 are numbers, not on / off
    assert re.search(r"--top-k TOP_K\s+default: 0\n", out)
    assert "guidance_steps : M Adam steps on phi per guided step" in out  # GuidanceConfig's field docs
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", "m", "--remasking", "lowest"])
    assert exit_info.value.code == 2 and "invalid choice: 'lowest'" in capsys.readouterr().err


def test_bench_profile_reports_components(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ENTRGI_CACHE", str(tmp_path / "cache"))
    assert main(["bench", "--profile", "--steps", "2", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    for component in ("denoiser_forward", "guided_embedding", "reward_forward_backward", "optimizer", "commit"):
        assert f"entrgi.{component}" in printed
    assert "step wall time" in printed
    # the demo's MiniLM models: no RMSNorm or gated MLP, so their layers run stock
    assert printed.endswith("\ndenoiser layers: stock\nreward layers: stock\n")
    syncs = next(line for line in printed.splitlines() if line.startswith("host syncs per step"))
    assert float(syncs.split()[-1]) == 0.0  # the eager step reads nothing back
    assert json.loads((tmp_path / "guided_step_trace.json").read_text())["traceEvents"]


def test_bench_profile_of_a_preset_shows_each_component_against_its_floor(tmp_path, capsys):
    assert main(["bench", "--profile", "--preset", "tiny", "--steps", "2", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    head = next(line for line in lines if line.startswith("component"))
    assert head.split()[-4:] == ["floor", "ms", "x", "floor"]
    rows = {line.split()[0]: line.split() for line in lines if line.startswith("entrgi.")}
    for component in ("denoiser_forward", "entropy_confidence", "guided_embedding", "reward_forward_backward",
                      "commit"):  # fmt: skip
        assert float(rows[f"entrgi.{component}"][4]) >= 0  # the floor column (H100 ceilings: ~0 at the tiny preset)
    assert len(rows["entrgi.optimizer"]) == 4  # no floor of its own (counted with the op's backward)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal")
def test_bench_refuses_a_paper_shape_preset_on_a_cpu(tmp_path, capsys):
    assert main(["bench", "--suite", "step", "--preset", "1xK4-0.6b", "--out", str(tmp_path)]) == 2
    assert "preset '1xK4-0.6b' builds a dream-7b denoiser and needs a CUDA device" in capsys.readouterr().err


def test_demo_runs_offline_and_prints_the_table(tmp_path, monkeypatch, capsys):
    from entrgi import GuidanceConfig
    from entrgi.demo import run_demo

    monkeypatch.setenv("ENTRGI_CACHE", str(tmp_path))
    config = GuidanceConfig(num_samples=2, steps=3, max_new_tokens=4, guidance_steps=2, prompts_per_batch=2)
    rows = run_demo(prompts=("hi", "tell me more"), methods=("none", "entrgi"), config=config)
    assert [r["method"] for r in rows] == ["none", "entrgi"]
    assert all(-1.0 <= r["mean_avg"] <= 1.0 and r["seconds"] > 0 for r in rows)
    printed = capsys.readouterr().out
    assert "mean Top@1" in printed and "EntRGi raises the mean reward" in printed


def test_generate_exposes_decoding_orders_and_the_likelihood_reward(tmp_path, denoiser_paths, likelihood_path):
    out = tmp_path / "results.json"
    code = main([
        "generate", "--model", denoiser_paths["llada"], "--model-kind", "llada", "--reward-model", likelihood_path,
        "--reward-kind", "likelihood", "--prompt", "hello there", "--max-new-tokens", "4", "--num-samples", "2",
        "--guidance-steps", "1", "--block-length", "2", "--remasking", "low_confidence", "--cfg-scale", "0.5",
        "--confidence-threshold", "0.5", "--guidance-scope", "all", "--reward-cache-prefix", "--reward-checkpoint",
        *COMPILE_FLAGS, "--adam-moments", "bfloat16", "--output", str(out),
        "--quiet",
    ])  # fmt: skip
    assert code == 0
    document = json.loads(out.read_text())
    config = document["config"]
    assert (config["block_length"], config["remasking"], config["cfg_scale"]) == (2, "low_confidence", 0.5)
    assert config["adam_moments"] == "bfloat16"
    assert config["confidence_threshold"] == 0.5 and config["guidance_scope"] == "all"
    result = document["results"][0]
    assert 2 <= result["forward_passes"] <= 4 and all(r < 0 for r in result["rewards"])  # mean log-probs


def test_step_benchmark_starts_from_a_partly_committed_canvas():
    from entrgi.step_benchmark import StepOptions, new_run, preset_run

    run = preset_run("tiny", options=StepOptions(new_tokens=64, masked_fraction=0.25))
    masked = (run.response == run.denoiser.mask_token_id).float().mean().item()
    assert 0.1 < masked < 0.4
    with pytest.raises(ValueError, match="masked_fraction must be in"):
        new_run(run.denoiser, run.reward, run.config, masked_fraction=0.0)


def test_step_benchmark_run_has_the_reward_prefix_cached_when_asked():
    from entrgi.step_benchmark import StepOptions, preset_run

    for cache in (True, False):
        run = preset_run("tiny", options=StepOptions(new_tokens=8, reward_cache_prefix=cache))
        assert (run.reward_context.prefix_kv is not None) == cache


def test_step_benchmark_times_steps_after_the_warmup_within_the_schedule(monkeypatch):
    """Eager: one warm-up step, then ``timed`` steps, at most the steps the run has but
    the last two; each step index once, in order."""
    from entrgi.sampler import DiffusionRun
    from entrgi.step_benchmark import StepOptions, bench_steps

    seen, step = [], DiffusionRun.step
    monkeypatch.setattr(DiffusionRun, "step", lambda run, index: (seen.append(index), step(run, index))[1])
    for timed, new_tokens, last in ((3, 8, 3), (9, 6, 4)):
        seen.clear()
        options = StepOptions(new_tokens=new_tokens)
        (row,) = bench_steps("tiny", ("none",), (False,), options, timed=timed, device="cpu")
        assert seen == list(range(last + 1))
        assert row.p20_ms <= row.ms_per_step <= row.p80_ms


@pytest.mark.parametrize("on", [True, False])
def test_step_benchmark_models_follow_the_layer_options(on):
    from entrgi.step_benchmark import StepOptions, build_models

    options = StepOptions(denoiser_fused=on, reward_lean=on)
    denoiser, reward = build_models("tiny", torch.device("cpu"), torch.float32, options)
    assert (denoiser.layers.describe() != "stock") == on  # on a CPU: the lean layers, the torch backend
    assert (reward.guidance_layers.describe() != "stock") == on
