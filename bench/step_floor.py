"""The floor of one denoising step at the step suite's presets, per component (see
:mod:`entrgi.step_floor`; no GPU needed).

    python bench/step_floor.py [--preset 1xK4-0.6b 4xK4-1.7b] [--masked-fraction 0.5]
        [--guidance-steps 3] [--new-tokens 128] [--reward-cache-prefix] [--reward-checkpoint]
        [--adam-moments float32|bfloat16|recompute]
"""

from __future__ import annotations

import argparse

import torch

from entrgi.benchmark import PEAK_BYTES_PER_S, PEAK_FLOP_PER_S
from entrgi.config import ADAM_MOMENTS
from entrgi.step_benchmark import PRESETS, StepOptions
from entrgi.step_floor import format_floor, step_components


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", nargs="+", choices=list(PRESETS), default=["1xK4-0.6b", "4xK4-1.7b"])
    parser.add_argument("--masked-fraction", type=float, default=0.5)
    parser.add_argument("--guidance-steps", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reward-cache-prefix", action="store_true")
    parser.add_argument("--reward-checkpoint", action="store_true")
    parser.add_argument("--adam-moments", choices=ADAM_MOMENTS, default="float32")
    args = parser.parse_args(argv)
    print(f"masked fraction {args.masked_fraction}, M = {args.guidance_steps}, {args.new_tokens} new tokens, "
          f"prefix cache {args.reward_cache_prefix}, checkpoint {args.reward_checkpoint}, "
          f"{args.adam_moments} Adam moments; "
          f"{PEAK_FLOP_PER_S / 1e12:.0f} TFLOP/s, {PEAK_BYTES_PER_S / 1e12:.1f} TB/s; torch {torch.__version__}")  # fmt: skip
    for preset in args.preset:
        components = step_components(preset, StepOptions.from_args(args))
        print("\n" + format_floor(preset, components))


if __name__ == "__main__":
    main()
