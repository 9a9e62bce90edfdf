"""What :class:`entrgi.denoisers.Denoiser` reads off a model and its tokenizer: the kind,
the mask and end-of-response ids, the prompt encoding and the response decoding."""

from __future__ import annotations

import contextlib
import copy
from types import SimpleNamespace

import pytest
import torch

from entrgi import load_denoiser
from entrgi.denoisers import LLADA_MASK_ID, Denoiser, detect_kind


@pytest.fixture(scope="module")
def plain_tokenizer(minilm_path):
    """MiniLM's WordPiece tokenizer as shipped: no chat template, no eos, [SEP] = 102,
    [MASK] = 103, [CLS] = 101."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path)


def _tiny_masked_lm(vocab_size: int):
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=vocab_size, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                        intermediate_size=8)  # fmt: skip
    return BertForMaskedLM(config)


@pytest.mark.parametrize(
    "model_type,kind", [("Dream", "dream"), ("llada", "llada"), ("LLaDA", "llada"), ("bert", "mlm"), ("", "mlm")]
)
def test_the_kind_is_read_from_the_model_type(model_type, kind):
    assert detect_kind(SimpleNamespace(model_type=model_type)) == kind


def test_an_unknown_kind_is_refused_by_name(plain_tokenizer, mlm_path):
    with pytest.raises(ValueError, match=r"unknown denoiser kind 'gpt'; expected one of \('dream', 'llada', 'mlm'\)"):
        Denoiser(_tiny_masked_lm(len(plain_tokenizer)), plain_tokenizer, kind="gpt")
    with pytest.raises(ValueError, match=r"unknown denoiser kind 'gpt'"):
        load_denoiser(mlm_path, kind="gpt")


def test_the_model_is_frozen_in_eval_mode(plain_tokenizer):
    model = _tiny_masked_lm(len(plain_tokenizer)).train()
    denoiser = Denoiser(model, plain_tokenizer)
    assert not any(module.training for module in denoiser.model.modules())  # no dropout in the logits
    assert not any(parameter.requires_grad for parameter in denoiser.model.parameters())


def test_the_mask_id_is_the_callers_then_the_tokenizers_then_the_configs(plain_tokenizer):
    model = _tiny_masked_lm(len(plain_tokenizer))
    model.config.mask_token_id = 7
    assert Denoiser(model, plain_tokenizer, mask_token_id=5).mask_token_id == 5
    assert Denoiser(model, plain_tokenizer).mask_token_id == plain_tokenizer.mask_token_id == 103
    unmasked = copy.deepcopy(plain_tokenizer)
    unmasked.mask_token = None
    assert Denoiser(model, unmasked).mask_token_id == 7
    model.config.mask_token_id = None
    assert Denoiser(model, unmasked, kind="llada").mask_token_id == LLADA_MASK_ID  # LLaDA's tokenizer declares none
    with pytest.raises(ValueError, match="declares no mask token id; pass mask_token_id="):
        Denoiser(model, unmasked, kind="mlm")


@pytest.mark.parametrize("kind", ["llada", "mlm"])
def test_every_declared_end_token_ends_a_response(plain_tokenizer, kind):
    from transformers import GenerationConfig

    tokenizer = copy.deepcopy(plain_tokenizer)
    tokenizer.add_tokens(["<|im_end|>"], special_tokens=True)  # a turn end the vocabulary knows
    turn_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model = _tiny_masked_lm(len(tokenizer))
    # the mask id and an id beyond the vocabulary are never end tokens, wherever declared
    model.config.eos_token_id = [5, 6, tokenizer.mask_token_id, 10**6]
    model.generation_config = GenerationConfig(eos_token_id=(7, 8))  # a remote config's tuple
    denoiser = Denoiser(model, tokenizer, kind=kind)
    sep = [tokenizer.sep_token_id] if kind == "mlm" else []  # BERT's [SEP] ends a masked LM's text only
    assert denoiser.end_token_ids == sorted([5, 6, 7, 8, turn_end, *sep])


def test_prompts_are_encoded_through_the_chat_template_when_there_is_one(plain_tokenizer, chat_tokenizer):
    model = _tiny_masked_lm(len(plain_tokenizer))
    chat = Denoiser(model, chat_tokenizer)
    # the user turn and the generation prompt, with no [CLS] / [SEP] of the plain encoding around it
    turn = chat_tokenizer("[user] hi there\n[assistant] ", add_special_tokens=False)["input_ids"]
    assert chat.encode_prompts(["hi there"]) == [turn]
    plain_ids = plain_tokenizer("hi there")["input_ids"]
    assert plain_ids[0] == plain_tokenizer.cls_token_id and plain_ids[-1] == plain_tokenizer.sep_token_id
    assert chat.encode_prompts(["hi there"], chat_template=False) == [plain_ids]
    assert Denoiser(model, plain_tokenizer).encode_prompts(["hi there"]) == [plain_ids]


def test_decoding_drops_masks_special_tokens_and_ids_without_a_string(plain_tokenizer):
    size = len(plain_tokenizer)
    denoiser = Denoiser(_tiny_masked_lm(size + 4), plain_tokenizer)  # a head wider than the vocabulary
    hello, world = plain_tokenizer.convert_tokens_to_ids(["hello", "world"])
    response = [hello, plain_tokenizer.mask_token_id, plain_tokenizer.cls_token_id, size + 2, world,
                plain_tokenizer.sep_token_id, hello]  # fmt: skip
    assert denoiser.decode(response) == "hello world"  # cut at [SEP], this masked LM's end token
    # a mask id the tokenizer does not call special is dropped all the same
    assert Denoiser(denoiser.model, plain_tokenizer, mask_token_id=world).decode(response) == "hello"


@pytest.mark.parametrize("keep_last", [0, 6])
def test_logits_refuse_a_keep_last_beyond_the_canvas(plain_tokenizer, keep_last):
    denoiser = Denoiser(_tiny_masked_lm(len(plain_tokenizer)), plain_tokenizer)
    ids = torch.randint(1000, 2000, (2, 5))
    with pytest.raises(ValueError, match=rf"keep_last must be in \[1, 5\], got {keep_last}"):
        denoiser.logits(ids, torch.ones(2, 5, dtype=torch.bool), keep_last=keep_last)


@pytest.mark.parametrize("kind", ["mlm", "dream"])
def test_a_left_padded_row_gives_its_tokens_their_unpadded_logits(denoiser_paths, kind):
    # positions count real tokens only: BERT's learned absolute positions see the same
    # numbers padded or not (Dream's rotary ones depend on differences only)
    denoiser = load_denoiser(denoiser_paths[kind], kind=kind)
    ids = torch.randint(1000, 2000, (1, 6))
    alone = denoiser.logits(ids, torch.ones(1, 6, dtype=torch.bool))
    padded_ids = torch.cat([torch.full((1, 3), denoiser.tokenizer.pad_token_id), ids], dim=1)
    padded = denoiser.logits(padded_ids, torch.arange(9)[None] >= 3)
    first = int(kind == "dream")  # Dream predicts a position from its left neighbour: a pad, padded
    torch.testing.assert_close(padded[:, 3 + first :], alone[:, first:], rtol=1e-5, atol=1e-5)
    if kind == "mlm":  # unpadded, exactly the model's own logits
        torch.testing.assert_close(alone, denoiser.model(input_ids=ids).logits, rtol=0, atol=0)


def test_a_masked_lm_config_loads_its_masked_lm_class_whatever_the_kind(denoiser_paths):
    from transformers import BertForMaskedLM

    # (the causal-LM auto class would load BERT's decoder head class: another model)
    assert type(load_denoiser(denoiser_paths["llada"], kind="llada").model) is BertForMaskedLM


def test_a_model_with_the_older_num_logits_to_keep_gets_the_kept_rows_through_it(denoiser_paths, chat_tokenizer):
    from transformers import Qwen2ForCausalLM

    asked = []

    class OlderQwen2(Qwen2ForCausalLM):  # transformers 4.4x's name for logits_to_keep
        def forward(self, input_ids=None, attention_mask=None, position_ids=None, num_logits_to_keep=0, **kwargs):
            asked.append(num_logits_to_keep)
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   logits_to_keep=num_logits_to_keep, **kwargs)  # fmt: skip

    denoiser = Denoiser(OlderQwen2.from_pretrained(denoiser_paths["dream"]), chat_tokenizer, kind="dream")
    ids, mask = torch.randint(1000, 2000, (2, 9)), torch.ones(2, 9, dtype=torch.bool)
    full = denoiser.logits(ids, mask)
    torch.testing.assert_close(denoiser.logits(ids, mask, keep_last=5), full[:, -5:])
    assert asked == [0, 6]  # all rows, then the last 6: the kept rows' left neighbours (Dream's shift)


@pytest.mark.parametrize("kind", ["mlm", "llada"])
def test_the_kept_logits_are_the_last_ones_when_the_head_cannot_be_cut(denoiser_paths, monkeypatch, kind):
    denoiser = load_denoiser(denoiser_paths[kind], kind=kind)
    ids, mask = torch.randint(1000, 2000, (2, 9)), torch.ones(2, 9, dtype=torch.bool)
    full = denoiser.logits(ids, mask)
    # as for a head applied through F.linear, which no module hook reaches: the output is sliced
    monkeypatch.setattr(denoiser, "_head_on_last", lambda *args: contextlib.nullcontext())
    torch.testing.assert_close(denoiser.logits(ids, mask, keep_last=4), full[:, -4:])
