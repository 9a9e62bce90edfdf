"""``sample_step``: the denoising step's token draw and commit confidence."""

from __future__ import annotations

from typing import NamedTuple

import torch

from entrgi.ops import reference
from entrgi.ops.validation import check_choice, check_finite_rows, check_logits, check_sampling_args, resolve_backend

ALGS = ("entropy", "maskgit_plus", "topk_margin", "origin")


class StepSample(NamedTuple):
    """tokens (...,) int64 drawn from ``softmax(filter(phi / tau))``; confidence (...,) float32."""

    tokens: torch.Tensor
    confidence: torch.Tensor


def sample_step(
    phi: torch.Tensor,
    phi_init: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    alg: str = "entropy",
    generator: torch.Generator | None = None,
    backend: str = "auto",
    check_values: bool = True,
) -> StepSample:
    """Sample each row of the optimised logits and score how confident the commit is.

    Parameters
    ----------
    phi : (..., V) optimised logits; tokens are drawn from ``softmax(filter(phi / tau))``.
    phi_init : (..., V) un-steered logits, read by ``alg="entropy"`` (defaults to phi).
    alg : ``entropy`` (sum p log p of softmax(phi_init/tau)), ``maskgit_plus``
        (probability of the drawn token), ``topk_margin`` (top-1 minus top-2
        probability) or ``origin`` (zeros: commits are drawn at random).
    """
    phi_init = phi if phi_init is None else phi_init
    check_logits("phi", phi)
    check_logits("phi_init", phi_init)
    if phi_init.shape != phi.shape:
        raise ValueError(f"phi_init shape {tuple(phi_init.shape)} != phi shape {tuple(phi.shape)}")
    check_sampling_args(temperature, top_p, top_k)
    check_choice("alg", alg, ALGS)
    if check_values:
        check_finite_rows("phi", phi)
    backend = resolve_backend(backend, phi.device)
    lead, vocab = phi.shape[:-1], phi.shape[-1]
    rows, rows_init = phi.reshape(-1, vocab), phi_init.reshape(-1, vocab)
    if backend == "triton":
        from entrgi.ops import triton_backend

        tokens, confidence = triton_backend.sample_step(
            rows, rows_init, temperature, top_p, top_k, alg, generator
        )
    else:
        tokens = reference.sample_filtered(rows, temperature, top_p, top_k, generator)
        confidence = reference.step_confidence_reference(
            rows, rows_init, tokens, temperature, top_p, top_k, alg
        )
    return StepSample(tokens.reshape(lead), confidence.reshape(lead))
