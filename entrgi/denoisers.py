"""Masked diffusion denoisers: Dream, LLaDA and any HF masked LM behind one interface."""

from __future__ import annotations

import contextlib
import inspect
from typing import Iterator, Sequence

import torch

from entrgi.attention import additive_mask, attention_mask_4d
from entrgi.layers import LayerRunner
from entrgi.model_source import model_source
from entrgi.remote_code import remote_model_class, sdpa_backends_kept
from entrgi.run_cache import RunCache

DENOISER_KINDS = ("dream", "llada", "mlm")
LLADA_MASK_ID = 126336
# Turn-ending strings declared by common chat tokenizers (Dream/Qwen, LLaDA/Llama-3).
END_TOKEN_STRINGS = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>")


def detect_kind(config) -> str:
    """``dream`` / ``llada`` from the config's model type, else ``mlm``."""
    model_type = str(getattr(config, "model_type", "")).lower()
    if "dream" in model_type:
        return "dream"
    if "llada" in model_type:
        return "llada"
    return "mlm"


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


class Denoiser:
    """A masked diffusion LM that maps a token canvas to per-position logits.

    Parameters
    ----------
    model : the HF model (Dream as transformers' ``Qwen2ForCausalLM`` or its own ``DreamModel``,
        LLaDA ``LLaDAModelLM``, any masked LM).
    tokenizer : its tokenizer.
    kind : ``dream`` (logits shifted right by one: position i is predicted at i-1;
        bool key-padding mask and position ids), ``llada`` (no shift; LLaDA's own code
        gets the padding as its additive ``attention_bias``, which it reads on the device)
        or ``mlm`` (no shift); detected from the config when None.
    mask_token_id : overrides the tokenizer's / config's mask id.
    compile_layers : run the model's layers through one ``torch.compile``d layer
        (fused elementwise kernels; compiled on the first forward of a shape; see
        :mod:`entrgi.layers`).
    fused_layers : (default on; for layers not compiled) on CUDA, run each RMSNorm,
        SiLU-gated activation and rotary embedding as one Triton kernel, stacked
        projections as one GEMM (:mod:`entrgi.lean`; LLaDA's own blocks:
        :mod:`entrgi.lean_llada`): logits within rounding of the stock code's; off CUDA
        the stock arithmetic, unchanged.

    ``run_cache`` keeps the sampler's recent denoising runs (static buffers, CUDA
    graphs) for reuse by later batches and calls of the same shapes; call
    ``run_cache.clear()`` to free them, e.g. after changing model weights in place.
    """

    def __init__(
        self, model, tokenizer, kind: str | None = None, mask_token_id: int | None = None,
        compile_layers: bool = False, fused_layers: bool = True,
    ):  # fmt: skip
        kind = kind or detect_kind(model.config)
        if kind not in DENOISER_KINDS:
            raise ValueError(f"unknown denoiser kind {kind!r}; expected one of {DENOISER_KINDS}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.kind = kind
        self.mask_token_id = self._find_mask_id(mask_token_id)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        # the context the model was built for (LLaDA's config calls it max_sequence_length)
        lengths = (getattr(model.config, name, None) for name in ("max_position_embeddings", "max_sequence_length"))
        self.max_length = next((int(length) for length in lengths if length is not None), None)
        self.end_token_ids = self._find_end_ids()
        arguments = inspect.signature(model.forward).parameters
        self._takes_position_ids = "position_ids" in arguments
        self._keep_argument = next((a for a in ("logits_to_keep", "num_logits_to_keep") if a in arguments), None)
        # no key/value cache to build: every step sees the whole canvas (and LLaDA's code,
        # whose config under transformers 5 has no use_cache, reads one when not given);
        # return_dict given so that no deprecated config field is read either
        self._fixed_arguments = {name: value for name, value in (("use_cache", False), ("return_dict", True))
                                 if name in arguments}  # fmt: skip
        self._takes_attention_bias = "attention_bias" in arguments
        self.layers = LayerRunner(self.model, compiled=compile_layers, lean=fused_layers)
        self.run_cache = RunCache()

    @property
    def device(self) -> torch.device:
        return self.model.get_output_embeddings().weight.device

    def _find_mask_id(self, override: int | None) -> int:
        for candidate in (override, self.tokenizer.mask_token_id, getattr(self.model.config, "mask_token_id", None)):
            if candidate is not None:
                return int(candidate)
        if self.kind == "llada":
            return LLADA_MASK_ID
        raise ValueError("the denoiser declares no mask token id; pass mask_token_id=")

    def _find_end_ids(self) -> list[int]:
        """Every token that ends a response: eos of tokenizer, config and generation
        config, the known turn-end strings present in the vocabulary, and BERT's [SEP]."""
        ids = _as_list(self.tokenizer.eos_token_id) + _as_list(getattr(self.model.config, "eos_token_id", None))
        generation_config = getattr(self.model, "generation_config", None)
        ids += _as_list(getattr(generation_config, "eos_token_id", None))
        vocab = self.tokenizer.get_vocab()
        ids += [vocab[s] for s in END_TOKEN_STRINGS if s in vocab]
        if self.kind == "mlm":
            ids += _as_list(self.tokenizer.sep_token_id)
        return sorted({i for i in ids if 0 <= i < self.vocab_size and i != self.mask_token_id})

    def encode_prompts(self, prompts: Sequence[str], chat_template: bool = True) -> list[list[int]]:
        """Token ids per prompt: the user turn of the chat template with the generation
        prompt when the tokenizer has one, else the plain text with special tokens."""
        if chat_template and getattr(self.tokenizer, "chat_template", None):
            texts = [
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
                )
                for p in prompts
            ]
            return [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        return [self.tokenizer(p)["input_ids"] for p in prompts]

    def logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep_last: int | None = None
    ) -> torch.Tensor:
        """(N, L) ids and (N, L) bool key-padding mask -> (N, L, V) logits, where
        ``logits[:, i]`` is the prediction for position i (Dream's shift applied).
        ``keep_last``: only the last that many positions, (N, keep_last, V); the output
        head runs on those positions only (the prompt's logits are never computed):
        through ``logits_to_keep`` / ``num_logits_to_keep`` where the model takes it,
        else by slicing the head module's input (LLaDA, HF masked LMs)."""
        length = input_ids.shape[1]
        if keep_last is not None and not 0 < keep_last <= length:
            raise ValueError(f"keep_last must be in [1, {length}], got {keep_last}")
        with self.layers.active():
            return self._logits(input_ids, attention_mask, keep_last)

    def _logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep_last: int | None) -> torch.Tensor:
        length = input_ids.shape[1]
        kwargs = dict(self._fixed_arguments)
        if self.kind == "llada":
            if self._takes_attention_bias:
                # LLaDA's own code asks `0.0 in attention_mask` of a 2-D mask (a host read);
                # the additive float32 (N, 1, L, L) bias it makes of one, it takes as is
                bias = additive_mask(attention_mask[:, None, None, :], torch.float32)
                kwargs["attention_bias"] = bias.expand(-1, 1, length, -1)
            else:
                kwargs["attention_mask"] = attention_mask.long()
            with self._head_on_last(keep_last, length):
                logits = self.model(input_ids=input_ids, **kwargs).logits
            return logits if keep_last is None else logits[:, -keep_last:]
        shift = int(self.kind == "dream")
        head_rows = None if keep_last is None or keep_last + shift > length else keep_last + shift
        # Key-padding mask, 4-D so the model uses it as given: bidirectional, no host sync.
        kwargs["attention_mask"] = attention_mask_4d(self.model, attention_mask, causal=False, dtype=self.model.dtype)
        if self._takes_position_ids:
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        if head_rows is not None and self._keep_argument is not None:
            kwargs[self._keep_argument] = head_rows
        # the hook gives the head the keep_last positions whose predictions are kept (Dream:
        # each one's left neighbour), from the whole sequence or the head_rows the model cut
        with self._head_on_last(None if head_rows is None else keep_last, length, shift):
            logits = self.model(input_ids=input_ids, **kwargs).logits
        if head_rows is not None:
            if logits.shape[1] == keep_last:  # the head ran on exactly those rows: contiguous
                return logits
            logits = logits[:, -head_rows:]  # a head the hook cannot reach: slice its output
            return logits[:, :keep_last] if shift else logits
        if shift:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits  # every position's: keep_last is None, or all of Dream's (head_rows would exceed them)

    @contextlib.contextmanager
    def _head_on_last(self, rows: int | None, length: int, shift: int = 0) -> Iterator[None]:
        """Inside the block, the output head module sees only ``rows`` positions of its
        (N, length, d) input, or of one the model already cut to its last ``rows + shift``:
        the last ones, or with ``shift`` those before the last ``shift``. A head the model
        does not call as a module (a weight tied through ``F.linear``) or calls on other
        shapes sees its input whole, and the caller's slice of the logits does the rest."""
        if rows is None:
            yield
            return

        def last_rows(head, args):
            hidden = args[0]
            if hidden.dim() == 3 and hidden.shape[1] in (length, rows + shift):
                end = hidden.shape[1] - shift
                return (hidden[:, end - rows : end], *args[1:])
            return None

        handle = self.model.get_output_embeddings().register_forward_pre_hook(last_rows)
        try:
            yield
        finally:
            handle.remove()

    def decode(self, response_ids: Sequence[int]) -> str:
        """Text of one response: cut at the first end token; ids with no string (beyond
        the tokenizer's size) and leftover masks are dropped, never decoded."""
        kept = []
        end_ids = set(self.end_token_ids)
        for token in response_ids:
            if token in end_ids:
                break
            if token != self.mask_token_id and token < len(self.tokenizer):
                kept.append(token)
        return self.tokenizer.decode(kept, skip_special_tokens=True).strip()


def _model_class(config, kind: str, name_or_path: str, trust_remote_code: bool, from_pretrained_kwargs: dict):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING

    remote = (getattr(config, "auto_map", None) or {}).get("AutoModel")  # LLaDA's LM class, Dream's
    if remote is not None:
        if not trust_remote_code:  # a config of a known type loaded; AutoModel would give that type's bare body
            raise ValueError(f"{name_or_path}'s model is remote code ({remote}); load it with trust_remote_code=True")
        return remote_model_class(config, name_or_path, from_pretrained_kwargs)
    if kind == "mlm" or type(config) in MODEL_FOR_MASKED_LM_MAPPING:
        return AutoModelForMaskedLM
    return AutoModelForCausalLM  # e.g. a Qwen2 body run bidirectionally as a Dream stand-in


# config.json keys that name Dream's remote code rather than describe the network
_DREAM_CODE_KEYS = ("architectures", "auto_map", "model_type", "transformers_version")


def dream_as_qwen2_config(name_or_path: str):
    """A Dream checkpoint's config.json as transformers' ``Qwen2Config``, or None when the
    checkpoint is not Dream's. Dream-7B is a Qwen2 body with Qwen2's module and weight
    names (``model.layers.*``, ``lm_head``); what makes it a denoiser (attention over the
    whole canvas, logits shifted right) is the 4-D key-padding mask and the shift
    :class:`Denoiser` applies to any kind ``dream``. The file is read as JSON: no remote
    code runs."""
    from transformers import PretrainedConfig, Qwen2Config

    fields, _ = PretrainedConfig.get_config_dict(name_or_path)
    if str(fields.get("model_type", "")).lower() != "dream":
        return None
    return Qwen2Config(**{key: value for key, value in fields.items() if key not in _DREAM_CODE_KEYS})


def _load_tokenizer(name_or_path: str, trust_remote_code: bool, config):
    """The checkpoint's tokenizer, looked up with the model's ``config`` so that the
    checkpoint's own config is not loaded (for Dream: run) again. Dream's tokenizer is
    remote code only (a slow class, no tokenizer.json): without ``trust_remote_code``
    transformers falls back to a fast class that cannot be built, and says so obscurely."""
    from transformers import AutoTokenizer
    from transformers.models.auto.tokenization_auto import get_tokenizer_config

    try:
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, config=config)
    except ValueError as error:
        auto_map = get_tokenizer_config(name_or_path).get("auto_map") or {}
        declared = auto_map.get("AutoTokenizer") if isinstance(auto_map, dict) else auto_map  # or the legacy list
        remote_classes = [name for name in declared or [] if name]
        if trust_remote_code or not remote_classes:
            raise
        raise ValueError(
            f"{name_or_path}'s tokenizer is remote code ({', '.join(remote_classes)}); load it with "
            "trust_remote_code=True"
        ) from error


def load_denoiser(
    name_or_path: str,
    kind: str | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = True,
    mask_token_id: int | None = None,
    compile_layers: bool = False,
    fused_layers: bool = True,
    dream_remote_code: bool = False,
    **from_pretrained_kwargs,
) -> Denoiser:
    """Load a denoiser by hub id or local path (``kind`` detected from the config);
    ``compile_layers``, ``fused_layers``: see :class:`Denoiser`.

    A Dream checkpoint loads into transformers' own ``Qwen2ForCausalLM``
    (:func:`dream_as_qwen2_config`) unless ``dream_remote_code``: Dream's modeling code
    was written for transformers 4.4x (its rotary embedding looks up
    ``ROPE_INIT_FUNCTIONS["default"]``, which transformers 5 no longer has), and its
    attention calls sdpa itself, where the fused layers and the folded sdpa of
    :mod:`entrgi.lean` and :mod:`entrgi.sdpa` fit transformers' Qwen2 modules.

    Other remote code (LLaDA's) loads through :func:`entrgi.remote_code.loadable`, and
    torch's sdpa kernel switches its ``__init__`` flips for the whole process are set
    back (:func:`entrgi.remote_code.sdpa_backends_kept`)."""
    from transformers import AutoConfig, Qwen2ForCausalLM

    name_or_path = model_source(name_or_path, "denoiser")
    if dtype is not None:
        from_pretrained_kwargs["dtype"] = dtype
    dream_config = None if dream_remote_code or kind not in (None, "dream") else dream_as_qwen2_config(name_or_path)
    if dream_config is not None:
        kind = "dream"
        model = Qwen2ForCausalLM.from_pretrained(name_or_path, config=dream_config, **from_pretrained_kwargs)
    else:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        kind = kind or detect_kind(config)
        if kind not in DENOISER_KINDS:
            raise ValueError(f"unknown denoiser kind {kind!r}; expected one of {DENOISER_KINDS}")
        model_class = _model_class(config, kind, name_or_path, trust_remote_code, from_pretrained_kwargs)
        with sdpa_backends_kept():
            model = model_class.from_pretrained(name_or_path, trust_remote_code=trust_remote_code,
                                                **from_pretrained_kwargs)  # fmt: skip
    tokenizer = _load_tokenizer(name_or_path, trust_remote_code, model.config)
    return Denoiser(model.to(device), tokenizer, kind=kind, mask_token_id=mask_token_id, compile_layers=compile_layers,
                    fused_layers=fused_layers)  # fmt: skip
