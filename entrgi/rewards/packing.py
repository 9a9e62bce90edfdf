"""Static-shape assembly of ``[prefix | response | suffix]`` reward inputs.

Each row's real tokens are gathered into one contiguous run (order kept) and the
padding moved to one side, so a classifier that reads the last column (decoder
reward models given ``inputs_embeds``) or the first column (BERT-style ``[CLS]``)
reads a real token. Position ids count real tokens only. No host syncs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


PREFIX, RESPONSE, SUFFIX = 0, 1, 2  # segment ids of [prefix | response | suffix]


class PackedInputs(NamedTuple):
    inputs_embeds: torch.Tensor  # (N, S, d)
    attention_mask: torch.Tensor  # (N, S) int64, 1 = real token
    position_ids: torch.Tensor  # (N, S) int64
    segment: torch.Tensor | None = None  # (N, S) int64 segment id per packed position
    past_kv: tuple[torch.Tensor, ...] | None = None  # cached prefix keys then values, one per layer
    past_valid: torch.Tensor | None = None  # (N, P) bool: real tokens among the cached prefix keys
    tail_width: int | None = None  # right-aligned: every response and suffix token lies in the last tail_width columns


def pack_inputs(
    embeds: torch.Tensor, valid: torch.Tensor, align: str, segment: torch.Tensor | None = None
) -> PackedInputs:
    """Move each row's valid positions together, keeping their order.

    embeds : (N, S, d); valid : (N, S) bool; align : ``right`` (padding first) or
    ``left`` (padding last); segment : optional (N, S) ids moved along with the
    positions. The gather is differentiable with respect to ``embeds``.
    """
    key = valid.to(torch.int8)
    order = torch.sort(key if align == "right" else -key, dim=-1, stable=True).indices
    packed_valid = valid.gather(1, order)
    packed = embeds.gather(1, order.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
    positions = (packed_valid.long().cumsum(-1) - 1).clamp_min(0)
    packed_segment = None if segment is None else segment.gather(1, order)
    return PackedInputs(packed, packed_valid.long(), positions, packed_segment)


def response_mask_until_end(token_ids: torch.Tensor, end_ids: torch.Tensor) -> torch.Tensor:
    """(N, G) bool: response positions strictly before the first end token of each row."""
    is_end = torch.isin(token_ids, end_ids)
    return is_end.long().cumsum(-1) == 0
