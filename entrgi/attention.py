"""Prebuilt 4-D attention masks for HF models.

Given a 4-D mask, transformers uses it as is; given a 2-D one, its mask builder
checks ``padding_mask.all()`` on the host, a sync that also breaks CUDA-graph
capture. These helpers build the mask in the format the model's attention
implementation expects (bool for sdpa, additive float for eager).
"""

from __future__ import annotations

import torch

# Attention implementations a CUDA graph can capture: given the prebuilt 4-D mask they
# never read it back to the host. transformers' flash-attention paths unpad the batch
# with sequence lengths read on the host (``.item()``), which capture forbids; other
# kernels are not known to be capturable.
CAPTURABLE_ATTENTION = ("sdpa", "eager")


def attention_implementation(model) -> str | None:
    """The attention implementation ``model``'s config declares (``sdpa``, ``eager``,
    ``flash_attention_2``, ...)."""
    return getattr(model.config, "_attn_implementation", "sdpa")


def attention_mask_4d(
    model, valid: torch.Tensor, causal: bool, dtype: torch.dtype, past_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """(N, S) bool key validity -> (N, 1, S, P + S) mask for ``model``, where ``past_valid``
    (N, P) bool marks cached keys in front of the S new ones (P = 0 without a cache).

    Every query may attend to itself, so padded rows are never fully masked (a fully
    masked sdpa row is NaN, and NaN values leak through zero attention weights).
    Implementations that take only 2-D masks (flash attention) get ``valid`` back.
    """
    impl = attention_implementation(model)
    if impl not in CAPTURABLE_ATTENTION:
        if past_valid is not None:
            raise ValueError(f"a cached prefix needs sdpa or eager attention, the model uses {impl!r}")
        return valid.long()
    n, s = valid.shape
    allowed = valid[:, None, None, :].expand(n, 1, s, s)
    eye = torch.eye(s, dtype=torch.bool, device=valid.device)
    if causal:
        allowed = allowed & torch.ones(s, s, dtype=torch.bool, device=valid.device).tril()
    allowed = allowed | eye
    if past_valid is not None:
        allowed = torch.cat([past_valid[:, None, None, :].expand(n, 1, s, past_valid.shape[1]), allowed], dim=-1)
    if impl == "sdpa":
        return allowed
    return additive_mask(allowed, dtype)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask as an additive one of ``dtype``, same shape: 0 where allowed, the
    dtype's lowest value elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
