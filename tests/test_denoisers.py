"""load_denoiser on checkpoints that ship remote code: Dream's loads as transformers' Qwen2
classes with its own remote tokenizer; LLaDA-style code written for transformers 4.x runs
under transformers 5, and in CUDA graphs."""

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


# A tokenizer in the shape of Dream's remote one (tokenization_dream.py, written for
# transformers 4.4x): a slow Python class subclassing PreTrainedTokenizer, its specials
# made AddedTokens, declared in tokenizer_config.json's auto_map with no fast class and no
# tokenizer.json beside it, <|mask|> and <|beginoftext|> added tokens. Dream's splits text
# with Qwen2's byte-level BPE; this one maps each UTF-8 byte to a token, which is the same
# to transformers.
TOY_DREAM_TOKENIZER = """
import json

from transformers.tokenization_utils import AddedToken, PreTrainedTokenizer


def _special(token):
    if isinstance(token, str):
        return AddedToken(token, lstrip=False, rstrip=False, special=True, normalized=False)
    return token


class DreamTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "vocab.json"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, errors="replace", unk_token="<|endoftext|>", bos_token=None,
                 eos_token="<|endoftext|>", pad_token="<|endoftext|>", clean_up_tokenization_spaces=False,
                 split_special_tokens=False, **kwargs):
        with open(vocab_file, encoding="utf-8") as handle:
            self.encoder = json.load(handle)
        self.decoder = {index: token for token, index in self.encoder.items()}
        self.errors = errors
        super().__init__(errors=errors, bos_token=_special(bos_token), eos_token=_special(eos_token),
                         pad_token=_special(pad_token), unk_token=_special(unk_token),
                         clean_up_tokenization_spaces=clean_up_tokenization_spaces,
                         split_special_tokens=split_special_tokens, **kwargs)

    @property
    def vocab_size(self):
        return len(self.encoder)

    def get_vocab(self):
        return dict(self.encoder, **self.added_tokens_encoder)

    def _tokenize(self, text):
        return [f"<0x{byte:02X}>" for byte in text.encode("utf-8")]

    def _convert_token_to_id(self, token):
        return self.encoder.get(token, self.encoder.get(self.unk_token))

    def _convert_id_to_token(self, index):
        return self.decoder.get(index)

    def convert_tokens_to_string(self, tokens):
        return bytes(int(token[3:5], 16) for token in tokens).decode("utf-8", errors=self.errors)
"""
DREAM_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|beginoftext|>", "<|mask|>")
DREAM_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _write_dream_tokenizer(path) -> dict[str, int]:
    """Dream's tokenizer files (its remote class, vocab.json, tokenizer_config.json) in
    place of any other tokenizer's; returns the special tokens' ids."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                 "chat_template.jinja"):  # fmt: skip
        (path / name).unlink(missing_ok=True)
    (path / "tokenization_dream.py").write_text(TOY_DREAM_TOKENIZER)
    (path / "vocab.json").write_text(json.dumps({f"<0x{byte:02X}>": byte for byte in range(256)}))
    special_ids = {token: 256 + i for i, token in enumerate(DREAM_SPECIAL_TOKENS)}
    added = {str(index): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                          "single_word": False, "special": True} for token, index in special_ids.items()}  # fmt: skip
    tokenizer_config = {
        "added_tokens_decoder": added, "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
        "bos_token": "<|beginoftext|>", "chat_template": DREAM_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>", "errors": "replace", "mask_token": "<|mask|>", "model_max_length": 131072,
        "pad_token": "<|endoftext|>", "split_special_tokens": False, "tokenizer_class": "DreamTokenizer",
        "unk_token": None,
    }  # fmt: skip
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return special_ids


@pytest.fixture(scope="module")
def dream_checkpoint(dream_like_path, tmp_path_factory) -> str:
    """The tiny Qwen2 body's weights with config.json written as Dream-7B's (model_type
    "Dream", its auto_map, rope_theta / rope_scaling, the tokenizer's mask id), Dream's
    kind of tokenizer, and modeling / configuration files that raise when imported."""
    path = tmp_path_factory.mktemp("dream-checkpoint")
    shutil.copytree(dream_like_path, path, dirs_exist_ok=True)
    special_ids = _write_dream_tokenizer(path)
    # Dream-7B's config and generation config give <|endoftext|> as bos, eos and pad
    endoftext = special_ids["<|endoftext|>"]
    special_ids_of_config = dict.fromkeys(("bos_token_id", "eos_token_id", "pad_token_id"), endoftext)
    config = json.loads((path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    for key in ("layer_types", "dtype"):
        config.pop(key)
    config.update(
        architectures=["DreamModel"], model_type="Dream", transformers_version="4.46.2", torch_dtype="float32",
        auto_map={"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
        rope_theta=rope["rope_theta"], rope_scaling=None, mask_token_id=special_ids["<|mask|>"], use_cache=False,
        **special_ids_of_config,
    )  # fmt: skip
    (path / "config.json").write_text(json.dumps(config, indent=2))
    generation_config = json.loads((path / "generation_config.json").read_text())
    generation_config.update(special_ids_of_config)
    (path / "generation_config.json").write_text(json.dumps(generation_config, indent=2))
    for module in ("configuration_dream", "modeling_dream"):
        (path / f"{module}.py").write_text(f"raise ImportError({REMOTE_CODE_ERROR!r})\n")
    return str(path)


def test_a_dream_checkpoint_loads_as_qwen2_and_gives_the_stand_ins_logits(dream_checkpoint, dream_like_path):
    from transformers import Qwen2ForCausalLM

    dream = load_denoiser(dream_checkpoint)
    stand_in = load_denoiser(dream_like_path, kind="dream")
    assert dream.kind == "dream" and type(dream.model) is Qwen2ForCausalLM
    assert type(load_denoiser(dream_checkpoint, kind="dream").model) is Qwen2ForCausalLM  # the kind named
    # a plain Qwen2 config: saved again, the model reloads as Qwen2, not as Dream's remote code
    config = dream.model.config
    assert getattr(config, "auto_map", None) is None and config.model_type == "qwen2"
    assert config.architectures != ["DreamModel"]
    assert dream.model.config.rope_parameters == stand_in.model.config.rope_parameters
    ids = torch.randint(1000, 2000, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, :3] = False  # a left-padded row
    torch.testing.assert_close(dream.logits(ids, mask), stand_in.logits(ids, mask), rtol=0, atol=0)


def test_a_dream_checkpoint_runs_its_slow_remote_tokenizer(dream_checkpoint):
    dream = load_denoiser(dream_checkpoint)
    tokenizer = dream.tokenizer
    assert type(tokenizer).__name__ == "DreamTokenizer"  # the checkpoint's own class, not a fast stand-in
    special = {token: tokenizer.convert_tokens_to_ids(token) for token in DREAM_SPECIAL_TOKENS}
    assert dream.mask_token_id == special["<|mask|>"] == dream.model.config.mask_token_id
    assert dream.end_token_ids == sorted([special["<|endoftext|>"], special["<|im_end|>"]])
    prompt = "héllo"
    assert dream.encode_prompts([prompt]) == [
        [special["<|im_start|>"], *tokenizer.encode("user\n" + prompt), special["<|im_end|>"],
         *tokenizer.encode("\n"), special["<|im_start|>"], *tokenizer.encode("assistant\n")]
    ]  # fmt: skip
    beyond = len(tokenizer) + 3  # a head row with no string: the slow class would fail on it
    response = [*tokenizer.encode(" sunny"), special["<|mask|>"], beyond, *tokenizer.encode(" day"),
                special["<|im_end|>"], *tokenizer.encode("after the end")]  # fmt: skip
    assert beyond < dream.vocab_size and dream.decode(response) == "sunny day"
    with pytest.raises(ValueError, match=r"tokenizer is remote code \(tokenization_dream.DreamTokenizer\); load it "
                                         r"with trust_remote_code=True"):  # fmt: skip
        load_denoiser(dream_checkpoint, trust_remote_code=False)


def test_a_remote_tokenizer_that_fails_when_trusted_raises_its_own_error(dream_checkpoint, tmp_path):
    shutil.copytree(dream_checkpoint, tmp_path, dirs_exist_ok=True)
    opening = "        with open(vocab_file"
    broken = TOY_DREAM_TOKENIZER.replace(opening, "        raise ValueError('no vocab here')\n" + opening)
    (tmp_path / "tokenization_dream.py").write_text(broken)
    with pytest.raises(ValueError, match="no vocab here"):  # not the advice to trust the code it ran
        load_denoiser(str(tmp_path))


def test_dream_remote_code_is_run_only_when_asked(dream_checkpoint, mlm_path):
    with pytest.raises(ImportError, match=REMOTE_CODE_ERROR):
        load_denoiser(dream_checkpoint, dream_remote_code=True)
    with pytest.raises(ImportError, match=REMOTE_CODE_ERROR):
        load_denoiser(dream_checkpoint, kind="llada")  # another kind: the checkpoint's own classes
    assert dream_as_qwen2_config(mlm_path) is None


def test_remote_model_code_beside_a_known_config_is_refused_without_trust_remote_code(mlm_path, tmp_path):
    # transformers' AutoModel would load the config's own bare body (no LM head) instead
    shutil.copytree(mlm_path, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_own.OwnMaskedLM"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "modeling_own.py").write_text("raise ImportError('its own model code ran')\n")
    with pytest.raises(ValueError, match=r"model is remote code \(modeling_own.OwnMaskedLM\); load it with "
                                         r"trust_remote_code=True"):  # fmt: skip
        load_denoiser(str(tmp_path), trust_remote_code=False)
    with pytest.raises(ImportError, match="its own model code ran"):
        load_denoiser(str(tmp_path))


def test_generate_runs_a_dream_checkpoint_and_its_remote_code_only_when_asked(dream_checkpoint, tmp_path):
    from entrgi.cli import main

    out = tmp_path / "results.json"
    command = ["generate", "--model", dream_checkpoint, "--prompt", "hello there", "--steps", "2", "--max-new-tokens",
               "3", "--num-samples", "2", "--method", "none", "--quiet", "--output", str(out)]  # fmt: skip
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
