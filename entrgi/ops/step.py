"""``sample_step``: the denoising step's token draw and commit confidence."""

from __future__ import annotations

from typing import NamedTuple

import torch

from entrgi.ops import reference
from entrgi.ops.validation import (
    check_active,
    check_choice,
    check_finite_rows,
    check_generator,
    check_logits,
    check_sampling_args,
    resolve_backend,
)

ALGS = ("entropy", "maskgit_plus", "topk_margin", "origin")  # Dream's commit confidences
STEP_ALGS = (*ALGS, "low_confidence")  # + LLaDA's remasking score


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
    active: torch.Tensor | None = None,
) -> StepSample:
    """Sample each row of the optimised logits and score how confident the commit is.

    Parameters
    ----------
    phi : (..., V) optimised logits; tokens are drawn from ``softmax(filter(phi / tau))``.
    phi_init : (..., V) un-steered logits, read by ``alg="entropy"`` (defaults to phi).
    alg : ``entropy`` (sum p log p of softmax(phi_init/tau)), ``maskgit_plus``
        (probability of the drawn token), ``topk_margin`` (top-1 minus top-2
        probability) or ``origin`` (zeros: commits are drawn at random); Dream's algs read
        the (filtered) law at tau. ``low_confidence`` (LLaDA's remasking) is the drawn
        token's probability under ``softmax(phi)``: temperature 1, unfiltered.
    active : (...,) bool, the rows to sample (default all); the others get token 0 and
        confidence -inf, and the Triton backend does not read them.
    """
    check_logits("phi", phi)
    if phi_init is not None:
        check_logits("phi_init", phi_init)
        if phi_init.shape != phi.shape:
            raise ValueError(f"phi_init shape {tuple(phi_init.shape)} != phi shape {tuple(phi.shape)}")
    check_sampling_args(temperature, top_p, top_k)
    check_choice("alg", alg, STEP_ALGS)
    check_active(active, phi)
    check_generator(generator, phi.device)
    if check_values:
        check_finite_rows("phi", phi, temperature)
        if phi_init is not None and phi_init is not phi:
            check_finite_rows("phi_init", phi_init, temperature)
    backend = resolve_backend(backend, phi.device)
    lead, vocab = phi.shape[:-1], phi.shape[-1]
    rows = phi.reshape(-1, vocab)
    rows_init = None if phi_init is None or phi_init is phi else phi_init.reshape(-1, vocab)
    active_rows = None if active is None else active.reshape(-1)
    if backend == "triton":
        from entrgi.ops import triton_backend

        tokens, confidence = triton_backend.sample_step(
            rows, rows_init, temperature, top_p, top_k, alg, generator, active_rows
        )
    else:
        tokens = reference.sample_filtered(rows, temperature, top_p, top_k, generator)
        confidence = reference.step_confidence_reference(
            rows, rows if rows_init is None else rows_init, tokens, temperature, top_p, top_k, alg
        )
    if active_rows is not None:
        tokens = tokens.where(active_rows, 0)
        confidence = confidence.where(active_rows, -torch.inf)
    return StepSample(tokens.reshape(lead), confidence.reshape(lead))


def entropy_confidence(
    phi: torch.Tensor,
    *,
    temperature: float = 1.0,
    backend: str = "auto",
    active: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``alg="entropy"`` commit confidence of logits ``phi`` (..., V): sum p log p of
    ``softmax(phi / tau)`` per row (tau = 0 reads tau = 1), float32 (...,). Lets a caller
    score the un-steered logits before optimising them in place. Rows where ``active``
    is False get -inf and are not read by the Triton backend."""
    check_logits("phi", phi)
    check_sampling_args(temperature, 1.0, 0)
    check_active(active, phi)
    lead, vocab = phi.shape[:-1], phi.shape[-1]
    rows = phi.reshape(-1, vocab)
    active_rows = None if active is None else active.reshape(-1)
    if resolve_backend(backend, phi.device) == "triton":
        from entrgi.ops import triton_backend

        confidence = triton_backend.entropy_confidence(rows, temperature, active_rows)
    else:
        confidence = reference.entropy_confidence_reference(rows, temperature)
    if active_rows is not None:
        confidence = confidence.where(active_rows, -torch.inf)
    return confidence.reshape(lead)
