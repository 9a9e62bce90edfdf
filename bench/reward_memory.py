"""What autograd keeps for the guidance backward of one reward layer, stock transformers
layers against lean ones (``entrgi.lean``), and lean ones whose attention runs folded
(``entrgi.sdpa``, as CUDA runs it), counted with saved-tensor hooks: no GPU needed. A
Qwen3 classifier layer of a step-suite shape, random weights, a batch of ``rows`` x
``tokens`` embeddings, sdpa with a 4-D bool mask (as the reward runs).

    python bench/reward_memory.py [--shape qwen3-1.7b] [--rows 16] [--tokens 200] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse

import torch

from entrgi.layers import swapped_attributes
from entrgi.lean import kept_bytes, lean_forwards
from entrgi.sdpa import folded_sdpa_swap
from entrgi.step_benchmark import SHAPES

MIB = 2**20


def layer_kept_bytes(shape: str, rows: int, tokens: int, dtype: torch.dtype, lean: bool, folded: bool = False) -> int:
    """Bytes one ``shape`` reward layer keeps for the backward over (rows, tokens);
    ``folded``: its attention runs as :class:`entrgi.sdpa.FoldedSdpa`."""
    from transformers import Qwen3Config, Qwen3ForSequenceClassification

    hidden, inter, _, heads, kv, head_dim, _ = SHAPES[shape]
    config = Qwen3Config(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1, num_attention_heads=heads,
                         num_key_value_heads=kv, head_dim=head_dim, vocab_size=8, num_labels=1, pad_token_id=0,
                         attn_implementation="sdpa")  # fmt: skip
    torch.manual_seed(0)
    model = Qwen3ForSequenceClassification(config).to(dtype).eval().requires_grad_(False)
    if lean:
        for module, forward in lean_forwards(model):
            module.forward = forward
    embeds = torch.randn(rows, tokens, hidden, dtype=dtype, requires_grad=True)
    positions = torch.arange(tokens).expand(rows, -1)
    mask = torch.ones(rows, 1, tokens, tokens, dtype=torch.bool)
    rotary = model.model.rotary_emb(embeds, positions)
    layer = model.model.layers[0]
    with swapped_attributes([folded_sdpa_swap()] if folded else []):
        return kept_bytes(lambda: layer(embeds, attention_mask=mask, position_ids=positions, position_embeddings=rotary),
                          model)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=[s for s in SHAPES if "reward" in s or s.startswith("qwen3")],
                        default="qwen3-1.7b")  # fmt: skip
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    args = parser.parse_args(argv)
    dtype, layers = getattr(torch, args.dtype), SHAPES[args.shape][2]
    kept = [layer_kept_bytes(args.shape, args.rows, args.tokens, dtype, lean, folded)
            for lean, folded in ((False, False), (True, False), (True, True))]  # fmt: skip
    print(f"{args.shape}, {args.rows} rows x {args.tokens} tokens, {args.dtype}, torch {torch.__version__}")
    print("| kept for the backward | stock | lean | lean, folded sdpa |")
    print("|---|---|---|---|")
    print("| per layer (MiB) | " + " | ".join(f"{k / MIB:.1f}" for k in kept) + " |")
    print(f"| x {layers} layers (GiB) | " + " | ".join(f"{k * layers / 2**30:.2f}" for k in kept) + " |")


if __name__ == "__main__":
    main()
