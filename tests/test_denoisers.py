"""load_denoiser on checkpoints that ship remote code: Dream's loads as transformers' Qwen2
classes; LLaDA-style code written for transformers 4.x runs under transformers 5, and in
CUDA graphs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from entrgi import load_denoiser
from entrgi.denoisers import dream_as_qwen2_config
from entrgi.remote_code import loadable
from helpers import graphed_runs_match_eager

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


# A bidirectional toy LM in the shape of LLaDA's remote code as published for transformers
# 4.x: its __init__ makes its parameters with device="cpu", skips post_init() and switches
# torch's memory-efficient sdpa kernel off for the whole process; its tie_weights takes no
# arguments; its config hands use_cache to PretrainedConfig (which transformers 5 drops)
# and its forward reads it back when not given; a 2-D attention_mask is checked for
# padding on the host (`0.0 in mask`), an additive attention_bias is used as given.
TOY_LLADA_CONFIG = """
from transformers import PretrainedConfig


class ToyLLaDAConfig(PretrainedConfig):
    model_type = "toy_llada"

    def __init__(self, vocab_size=8, d_model=4, weight_tying=False, use_cache=False, **kwargs):
        self.vocab_size, self.d_model, self.weight_tying = vocab_size, d_model, weight_tying
        super().__init__(use_cache=use_cache, **kwargs)
"""
TOY_LLADA_MODEL = """
import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_toy_llada import ToyLLaDAConfig


class ToyLLaDAModelLM(PreTrainedModel):
    config_class = ToyLLaDAConfig
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        self.wte = torch.nn.Embedding(config.vocab_size, config.d_model, device="cpu")
        self.mix = torch.nn.Linear(config.d_model, config.d_model, device="cpu")
        self.ff_out = torch.nn.Linear(config.d_model, config.vocab_size, bias=False, device="cpu")
        self.built_on = self.mix.weight.device.type

    def forward(self, input_ids=None, attention_mask=None, attention_bias=None, use_cache=None, **kwargs):
        if use_cache is None:
            use_cache = self.config.use_cache
        x = self.wte(input_ids)
        length = input_ids.shape[1]
        bias = torch.zeros(1, 1, length, length, device=x.device)
        if attention_mask is not None and 0.0 in attention_mask:
            bias = bias + (1.0 - attention_mask.float()[:, None, None, :]) * torch.finfo(torch.float32).min
        if attention_bias is not None:
            bias = bias + attention_bias
        context = torch.softmax(bias[:, 0], dim=-1) @ x  # every query: the mean of the kept keys
        return CausalLMOutput(logits=self.ff_out(torch.tanh(self.mix(x + context))))

    def get_input_embeddings(self):
        return self.wte

    def get_output_embeddings(self):
        return self.ff_out

    def tie_weights(self):
        if self.config.weight_tying:
            self.ff_out.weight = self.wte.weight
"""


def _toy_llada_logits(weights: dict, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    x = weights["wte.weight"][ids]
    keep = mask.float()[..., None]
    context = (x * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True)
    hidden = torch.tanh((x + context) @ weights["mix.weight"].T + weights["mix.bias"])
    return hidden @ weights.get("ff_out.weight", weights["wte.weight"]).T


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def llada_checkpoint(request, chat_tokenizer, tmp_path_factory) -> tuple[str, dict]:
    """(path, weights): the toy's remote code, config and weights (without ``ff_out``
    when tied) and the chat tokenizer."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("llada-checkpoint")
    (path / "configuration_toy_llada.py").write_text(TOY_LLADA_CONFIG)
    (path / "modeling_toy_llada.py").write_text(TOY_LLADA_MODEL)
    vocab, width, tied = len(chat_tokenizer), 8, request.param
    config = {"model_type": "toy_llada", "vocab_size": vocab, "d_model": width, "weight_tying": tied,
              "max_sequence_length": 64,
              "architectures": ["ToyLLaDAModelLM"],
              "auto_map": {"AutoConfig": "configuration_toy_llada.ToyLLaDAConfig",
                           "AutoModel": "modeling_toy_llada.ToyLLaDAModelLM"}}  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    generator = torch.Generator().manual_seed(3)
    weights = {"wte.weight": torch.randn(vocab, width, generator=generator),
               "mix.weight": torch.randn(width, width, generator=generator),
               "mix.bias": torch.randn(width, generator=generator)}  # fmt: skip
    if not tied:
        weights["ff_out.weight"] = torch.randn(vocab, width, generator=generator)
    save_file(weights, str(path / "model.safetensors"))
    chat_tokenizer.save_pretrained(path)
    return str(path), weights


def test_llada_style_remote_code_written_for_transformers_4_loads(llada_checkpoint, monkeypatch):
    from transformers import AutoModel

    path, weights = llada_checkpoint
    with pytest.raises((AttributeError, TypeError)):  # what transformers 5 makes of such code unaided
        AutoModel.from_pretrained(path, trust_remote_code=True)
    torch.backends.cuda.enable_mem_efficient_sdp(True)
    denoiser = load_denoiser(path, kind="llada")
    assert torch.backends.cuda.mem_efficient_sdp_enabled()  # the model's __init__ switched it off: set back
    assert type(denoiser.model).__name__ == "ToyLLaDAModelLM"
    assert denoiser.model.built_on == "meta"  # not made (and initialised) on the host, then overwritten
    tied = "ff_out.weight" not in weights
    assert (denoiser.model.ff_out.weight is denoiser.model.wte.weight) == tied  # the model's own tie_weights ran
    ids = torch.randint(1000, 2000, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, :4] = False  # a left-padded row
    # the model's own handling of a 2-D mask, which reads it on the host
    own = denoiser.model(input_ids=ids, attention_mask=mask.long(), use_cache=False).logits
    with monkeypatch.context() as host_reads:
        host_reads.setattr(torch.Tensor, "item", lambda *_: pytest.fail("the padding was read on the host"))
        logits = denoiser.logits(ids, mask)
    torch.testing.assert_close(logits, own, rtol=0, atol=0)
    torch.testing.assert_close(logits, _toy_llada_logits(weights, ids, mask))


def test_llada_context_is_its_max_sequence_length(llada_checkpoint):
    from entrgi import generate

    denoiser = load_denoiser(llada_checkpoint[0], kind="llada")
    assert denoiser.max_length == 64
    with pytest.raises(ValueError, match=r"\+ max_new_tokens \(8\) exceeds the denoiser's context of 64 positions"):
        generate([" ".join(["sea"] * 60)], denoiser=denoiser, method="none", max_new_tokens=8, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_llada_style_remote_code_denoises_in_cuda_graphs(llada_checkpoint, classifier_path):
    from entrgi import load_reward

    denoiser = load_denoiser(llada_checkpoint[0], kind="llada", device="cuda")
    reward = load_reward(classifier_path, device="cuda")
    replays = graphed_runs_match_eager(["hello there", "what is the weather like today in the big city"], denoiser,
                                       reward, steps=4, max_new_tokens=8, block_length=4, remasking="low_confidence",
                                       num_samples=2, guidance_steps=2, seed=4)  # fmt: skip
    assert replays == [3]  # every step guided: the first runs eagerly, the next three replay


def test_loadable_leaves_a_modern_tie_weights_alone():
    from transformers import Qwen2ForCausalLM

    made = loadable(Qwen2ForCausalLM)
    assert made.__name__ == "Qwen2ForCausalLM" and issubclass(made, Qwen2ForCausalLM)
    assert made.tie_weights is Qwen2ForCausalLM.tie_weights
