"""Command line: ``entrgi generate``, ``entrgi demo``, ``entrgi bench``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import textwrap
from pathlib import Path

from entrgi.config import ADAM_MOMENTS, FIELD_CHOICES, GuidanceConfig
from entrgi.rewards import REWARD_KINDS

GRAPH_CHOICES = {"auto": "auto", "on": True, "off": False}
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
COMPILE_HELP = "run the denoiser's and the reward's layers through torch.compile (fused kernels; compiles first)"
LEAN_HELP = (
    "the reward's RMSNorms and gated MLPs keep less for the guidance backward and, on CUDA, run as "
    "fused Triton kernels (same values up to rounding; default on)"
)
FUSED_HELP = "on CUDA the denoiser's RMSNorms and gated MLPs run as fused Triton kernels (default on)"


def _at_least(minimum: int):
    """An argparse type: an integer no smaller than ``minimum`` (the error names the value)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _device(text: str) -> str:
    """An argparse type: a torch device string naming a device this machine has."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    visible = torch.cuda.device_count() if device.type == "cuda" else None
    if visible == 0:
        raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is visible")
    if visible and device.index is not None and device.index >= visible:
        raise argparse.ArgumentTypeError(f"{text!r}: {visible} CUDA device(s) visible")
    return text


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--field`` flag per GuidanceConfig field, typed from its default, with its
    choices; the field descriptions (GuidanceConfig's docstring) go in the epilog."""
    for f in dataclasses.fields(GuidanceConfig):
        flag = "--" + f.name.replace("_", "-")
        options = {"default": None, "help": f"default: {_shown(f.default)}"}
        if f.name == "cuda_graphs":
            parser.add_argument(flag, choices=tuple(GRAPH_CHOICES), **options)
        elif isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **options)
        elif f.name in FIELD_CHOICES:
            parser.add_argument(flag, choices=FIELD_CHOICES[f.name], **options)
        else:
            parser.add_argument(flag, type=_field_type(f), metavar=f.name.upper(), **options)
    fields = textwrap.dedent(GuidanceConfig.__doc__.split("\n", 2)[2]).replace("``", "")
    parser.epilog = "guidance settings (GuidanceConfig):\n" + re.sub(r":\w+:`~?[\w.]*?(\w+)`", r"\1", fields)


def _shown(default) -> object:
    if isinstance(default, bool):
        return "on" if default else "off"
    return "unset" if default is None else default


def _field_type(f: dataclasses.Field) -> type:
    """The value type of a config field; optional fields (``int | None``) take their first."""
    if f.default is not None:
        return type(f.default)
    return {"int": int, "float": float, "str": str}[str(f.type).split("|")[0].strip()]


def _config_from_args(args) -> GuidanceConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(GuidanceConfig)}
    if values["cuda_graphs"] is not None:
        values["cuda_graphs"] = GRAPH_CHOICES[values["cuda_graphs"]]
    return GuidanceConfig(**{k: v for k, v in values.items() if v is not None})


def _generate(args) -> int:
    import torch

    from entrgi import load_denoiser, load_reward
    from entrgi.distributed import broadcast, close_world, init_world, run_batches
    from entrgi.results import ResultsLog, read_prompts
    from entrgi.sampler import BatchedGeneration

    prompts = list(args.prompt or [])
    if args.dataset:
        prompts += read_prompts(args.dataset, args.prompt_field)
    if not prompts:
        raise ValueError("give --prompt TEXT or --dataset PATH")
    resumable = bool(args.output) and args.output.endswith(".jsonl")
    config = _config_from_args(args)
    _check_models_named(args, config)
    if args.output:  # made now: a folder that cannot be made fails before the run, not after it
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    world, device = init_world(args.device)
    finished_cleanly = False
    try:
        dtype = getattr(torch, args.dtype) if args.dtype else None
        denoiser = load_denoiser(args.model, kind=args.model_kind, device=device, dtype=dtype,
                                 compile_layers=args.compile_layers, fused_layers=args.denoiser_fused,
                                 dream_remote_code=args.dream_remote_code)  # fmt: skip
        reward = None
        if args.reward_model:
            reward = load_reward(args.reward_model, kind=args.reward_kind, target=args.target,
                                 system_prompt=args.reward_system_prompt, device=device, dtype=dtype,
                                 cache_prefix=args.reward_cache_prefix,
                                 checkpoint_layers=args.reward_checkpoint, compile_layers=args.compile_layers,
                                 lean_activations=args.reward_lean)  # fmt: skip
        job = BatchedGeneration(prompts, denoiser, reward, config)
        # how many denoiser ids found their reward token (SPEC); on stderr, as stdout may carry the results
        if world.is_main and job.table is not None:
            print(job.table.mapping.report(), file=sys.stderr)
        batches = range(job.num_batches)
        log = None
        if resumable and world.is_main:
            log = ResultsLog(args.output, config, args.dataset or "(--prompt)", args.prompt_field)
            finished = log.finished_batches(job.prompts, [job.batch_range(b) for b in batches])
            if finished:
                print(f"resuming {args.output}: {len(finished)} of {job.num_batches} batches already done")
            batches = [b for b in batches if b not in finished]
        batches = broadcast(world, list(batches))

        def write_round(finished_round):
            for batch, results in finished_round:
                log.append(batch, job.batch_range(batch), results)

        collected = run_batches(job, world, batches, write_round if log else None, progress=not args.quiet)
        if world.is_main:
            _report(args, config, log, collected)
        finished_cleanly = True
    finally:
        close_world(world, synchronize=finished_cleanly)
    return 0


def _check_models_named(args, config: GuidanceConfig) -> None:
    """What fails before any model loads: a missing reward, reward options its kind does
    not read, or a model folder that does not exist."""
    from entrgi.model_source import model_source
    from entrgi.rewards import check_reward_options

    if config.needs_reward and not args.reward_model:
        raise ValueError(f"method {config.method!r} needs a reward: give --reward-model")
    model_source(args.model, "denoiser")
    if args.reward_model:
        check_reward_options(args.reward_kind, args.target, args.reward_system_prompt, args.reward_cache_prefix)
        model_source(args.reward_model, "reward model")


def _report(args, config: GuidanceConfig, log, collected) -> None:
    from entrgi.results import metrics, results_document

    if log is not None:
        records = log.ordered_records()
        summary = metrics(records)
        print(f"{args.output}: {len(records)} prompts, mean Top@1 {summary['mean_top1_reward']}, "
              f"mean Avg@{config.num_samples} {summary['mean_avgN_reward']}")  # fmt: skip
        return
    document = results_document(config, [r for _, results in collected for r in results])
    text = json.dumps(document, indent=2)
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}: mean Top@1 {document['metrics']['mean_top1_reward']}, "
              f"mean Avg@{config.num_samples} {document['metrics']['mean_avgN_reward']}")  # fmt: skip
    else:
        print(text)


def _demo(args) -> int:
    from entrgi.demo import run_demo

    run_demo(target=args.target, model=args.model, reward_model=args.reward_model, reward_kind=args.reward_kind,
             device=args.device)  # fmt: skip
    return 0


def _bench(args) -> int:
    import torch

    from entrgi import benchmark

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)  # a folder that cannot be made fails before the timing
    if args.profile:
        run, floors = None, None
        if args.preset:
            from entrgi.step_benchmark import StepOptions, preset_run
            from entrgi.step_floor import range_floors, step_components

            options = StepOptions.from_args(args)
            run = preset_run(args.preset[0], options=options)
            floors = range_floors(step_components(args.preset[0], options))
        print(benchmark.profile_step(args.steps, out_dir, run=run, floors=floors))
        return 0
    gpu = torch.cuda.is_available()
    if args.suite == "step":
        return _bench_steps(args, out_dir, gpu)
    backends = args.backends or (["torch", "compile", "triton"] if gpu else ["torch"])
    sizes_n = args.n or ([128, 512, 2048] if gpu else [16, 64])
    sizes_d = args.d or ([1024, 2048] if gpu else [64])
    dtypes = args.dtype or (["bfloat16", "float32"] if gpu else ["float32"])
    vocab = args.vocab or (152_064 if gpu else 4096)
    csv_path = out_dir / "op_results.csv"
    benchmark.check_csv(csv_path, benchmark.OpRow)
    env = benchmark.environment()
    rows = []
    for dtype in dtypes:
        for d in sizes_d:
            for n in sizes_n:
                rows += benchmark.bench_op(n, vocab, d, getattr(torch, dtype), backends, args.repeats, env)
    if not rows:
        print(f"entrgi bench: error: {', '.join(backends)} failed at every shape (printed above); {csv_path} "
              "not written", file=sys.stderr)  # fmt: skip
        return 1
    print(benchmark.RunInfo(**env).header())
    print(benchmark.format_table(rows))
    benchmark.append_csv(rows, csv_path)
    plots = benchmark.plot_csv(csv_path, out_dir)
    print(f"appended {len(rows)} rows to {csv_path}; plots: {', '.join(str(p) for p in plots)}")
    return 0


def _bench_steps(args, out_dir: Path, gpu: bool) -> int:
    from entrgi import benchmark, step_benchmark

    csv_path = out_dir / "step_results.csv"
    benchmark.check_csv(csv_path, step_benchmark.StepRow)
    options = step_benchmark.StepOptions.from_args(args)
    rows = []
    for preset in args.preset or (["1xK4-0.6b", "4xK4-1.7b"] if gpu else ["tiny"]):
        rows += step_benchmark.bench_steps(preset, methods=args.methods, options=options, timed=args.repeats)
    print(rows[0].header())
    print(step_benchmark.format_steps(rows))
    benchmark.append_csv(rows, csv_path)
    print(f"appended {len(rows)} rows to {csv_path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="entrgi", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="guided sampling; writes a results JSON (torchrun: one rank per GPU)",
                              formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    gen.add_argument("--model", required=True, help="denoiser id or path (Dream, LLaDA, masked LM)")
    gen.add_argument("--model-kind", choices=("dream", "llada", "mlm"), default=None)
    gen.add_argument("--dream-remote-code", action="store_true",
                     help="a Dream checkpoint runs its own modeling code (written for transformers 4.4x) instead "
                     "of transformers' Qwen2 classes")  # fmt: skip
    gen.add_argument("--reward-model", help="reward model id or path")
    gen.add_argument("--reward-kind", choices=REWARD_KINDS, default="classifier")
    gen.add_argument("--target", help="target text of a similarity reward")
    gen.add_argument("--reward-system-prompt", metavar="TEXT",
                     help="a system turn in a classifier or likelihood reward's chat template")  # fmt: skip
    gen.add_argument("--reward-cache-prefix", action="store_true",
                     help="causal rewards: compute the prompt side's keys/values once per batch")  # fmt: skip
    gen.add_argument("--reward-checkpoint", action="store_true",
                     help="recompute the reward's layer activations in the guidance backward (less memory)")  # fmt: skip
    gen.add_argument("--reward-lean", action=argparse.BooleanOptionalAction, default=True, help=LEAN_HELP)
    gen.add_argument("--denoiser-fused", action=argparse.BooleanOptionalAction, default=True, help=FUSED_HELP)
    gen.add_argument("--compile-layers", action="store_true", help=COMPILE_HELP)
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    gen.add_argument("--dataset", "--prompts-file", dest="dataset", metavar="PATH",
                     help="prompts: a .jsonl file or a .json array of objects (see --prompt-field), or a text file, "
                          "one per line")  # fmt: skip
    gen.add_argument("--prompt-field", default="prompt", help="the JSON field holding the prompt")
    gen.add_argument("--output", "-o", help="results path: .json (the published layout; default stdout) or "
                     ".jsonl (one record per prompt, written per batch; rerun to resume)")  # fmt: skip
    gen.add_argument("--device", type=_device, default="cpu", help="cpu, cuda (torchrun: each rank its own GPU), ...")
    gen.add_argument("--dtype", choices=tuple(DTYPES), default=None)
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_config_flags(gen)
    gen.set_defaults(run=_generate)

    demo = commands.add_parser("demo", help="offline CPU demo: every method on a real MiniLM reward")
    demo.add_argument("--target", help="text the similarity reward moves towards")
    demo.add_argument("--model", help="use this denoiser instead of the built-in demo one")
    demo.add_argument("--reward-model", help="use this reward model instead of MiniLM")
    demo.add_argument("--reward-kind", choices=REWARD_KINDS, default="similarity")
    demo.add_argument("--device", type=_device, default="cpu")
    demo.set_defaults(run=_demo)

    bench = commands.add_parser("bench", help="op / step benchmarks (CSV + plots) or a guided-step profile")
    bench.add_argument("--suite", choices=("op", "step"), default="op",
                       help="op: guided_embedding backends; step: denoising steps of random-weight paper-shape models")  # fmt: skip
    bench.add_argument("--profile", action="store_true", help="profile guided steps (per-component table + trace)")
    bench.add_argument("--steps", type=_at_least(2), default=4, help="steps to profile (the first is warm-up)")
    bench.add_argument("--backends", nargs="+", choices=("torch", "compile", "triton"))
    bench.add_argument("--n", type=_at_least(1), nargs="+", help="rows (default GPU: 128 512 2048; CPU: 16 64)")
    bench.add_argument("--d", type=_at_least(1), nargs="+", help="embedding width (default GPU: 1024 2048; CPU: 64)")
    bench.add_argument("--vocab", type=_at_least(2), help="vocabulary (default GPU: 152064; CPU: 4096)")
    bench.add_argument("--dtype", nargs="+", choices=tuple(DTYPES))
    bench.add_argument("--repeats", type=_at_least(1), default=10, help="timed calls (op) or timed steps (step)")
    bench.add_argument("--preset", nargs="+", choices=("1xK4-0.6b", "4xK4-1.7b", "tiny"),
                       help="step suite models x batch (default GPU: 1xK4-0.6b 4xK4-1.7b; CPU: tiny)")  # fmt: skip
    bench.add_argument("--methods", nargs="+", default=["none", "entrgi", "aps", "expectation"],
                       choices=("none", "entrgi", "aps", "expectation"), help="step suite methods")  # fmt: skip
    bench.add_argument("--new-tokens", type=_at_least(3), default=128, help="step suite response length G (= steps T)")
    bench.add_argument("--guidance-steps", type=_at_least(1), default=3, help="step suite Adam steps M per guided step")
    bench.add_argument("--masked-fraction", type=float, default=0.5,
                       help="step suite / preset profile: share of response positions still masked when timing "
                            "starts (0.5: a run's average step; 1.0: its first steps)")  # fmt: skip
    bench.add_argument(
        "--reward-cache-prefix",
        action="store_true",
        help="step suite / preset profile: the reward caches its prompt side's keys and values",
    )
    bench.add_argument("--reward-checkpoint", action="store_true",
                       help="step suite / preset profile: the reward recomputes its layer activations in the backward")  # fmt: skip
    bench.add_argument("--reward-lean", action=argparse.BooleanOptionalAction, default=True,
                       help=f"step suite / preset profile: {LEAN_HELP}")  # fmt: skip
    bench.add_argument("--denoiser-fused", action=argparse.BooleanOptionalAction, default=True,
                       help=f"step suite / preset profile: {FUSED_HELP}")  # fmt: skip
    bench.add_argument("--compile-layers", action="store_true", help=f"step suite / preset profile: {COMPILE_HELP}")
    bench.add_argument("--adam-moments", choices=ADAM_MOMENTS, default="float32",
                       help="step suite / preset profile: how the logits' Adam keeps its moments (bfloat16 "
                            "halves them; recompute stores none and replays)")  # fmt: skip
    bench.add_argument("--out", default="bench/out", help="folder for the CSV, plots and traces")
    bench.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; bad input (a value out of range, a missing file or model, options
    that do not fit together) ends in one line on stderr and exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as error:
        print(f"entrgi {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
