"""load_denoiser on a Dream checkpoint: transformers' Qwen2 classes, not Dream's remote code."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from entrgi import load_denoiser
from entrgi.denoisers import dream_as_qwen2_config

REMOTE_CODE_ERROR = "Dream's remote code ran"


@pytest.fixture(scope="module")
def dream_checkpoint(dream_like_path, tmp_path_factory) -> str:
    """The tiny Qwen2 body's weights and tokenizer with config.json written as Dream-7B's
    (model_type "Dream", its auto_map, rope_theta / rope_scaling, mask_token_id), and
    remote-code files that raise when imported."""
    path = tmp_path_factory.mktemp("dream-checkpoint")
    shutil.copytree(dream_like_path, path, dirs_exist_ok=True)
    config = json.loads((path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    for key in ("layer_types", "dtype"):
        config.pop(key)
    config.update(
        architectures=["DreamModel"], model_type="Dream", transformers_version="4.46.2", torch_dtype="float32",
        auto_map={"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
        rope_theta=rope["rope_theta"], rope_scaling=None, mask_token_id=config["vocab_size"] - 1, use_cache=False,
    )  # fmt: skip
    (path / "config.json").write_text(json.dumps(config, indent=2))
    for module in ("configuration_dream", "modeling_dream"):
        (path / f"{module}.py").write_text(f"raise ImportError({REMOTE_CODE_ERROR!r})\n")
    return str(path)


def test_a_dream_checkpoint_loads_as_qwen2_and_gives_the_stand_ins_logits(dream_checkpoint, dream_like_path):
    from transformers import Qwen2ForCausalLM

    dream = load_denoiser(dream_checkpoint)
    stand_in = load_denoiser(dream_like_path, kind="dream")
    assert dream.kind == "dream" and type(dream.model) is Qwen2ForCausalLM
    assert dream.model.config.rope_parameters == stand_in.model.config.rope_parameters
    ids = torch.randint(1000, 2000, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, :3] = False  # a left-padded row
    torch.testing.assert_close(dream.logits(ids, mask), stand_in.logits(ids, mask), rtol=0, atol=0)


def test_dream_remote_code_is_run_only_when_asked(dream_checkpoint, mlm_path):
    with pytest.raises(ImportError, match=REMOTE_CODE_ERROR):
        load_denoiser(dream_checkpoint, dream_remote_code=True)
    with pytest.raises(ImportError, match=REMOTE_CODE_ERROR):
        load_denoiser(dream_checkpoint, kind="llada")  # another kind: the checkpoint's own classes
    assert dream_as_qwen2_config(mlm_path) is None


def test_generate_runs_a_dream_checkpoint_and_its_remote_code_only_when_asked(dream_checkpoint, tmp_path):
    from entrgi.cli import main

    out = tmp_path / "results.json"
    command = ["generate", "--model", dream_checkpoint, "--prompt", "hello there", "--steps", "2",
               "--max-new-tokens", "3", "--num-samples", "2", "--method", "none", "--quiet", "--output", str(out)]  # fmt: skip
    assert main(command) == 0
    assert len(json.loads(out.read_text())["results"][0]["responses"]) == 2
    with pytest.raises(ImportError, match=REMOTE_CODE_ERROR):
        main([*command, "--dream-remote-code"])
