"""`asyncopd` command line: validate, prepare, train, demo, serve, bench, analyze-estimators, config."""

import argparse
import sys


def _overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. pipeline.max_staleness=2 estimator=mc_rkl")


def _cmd_config(args: argparse.Namespace) -> int:
    from asyncopd.config.load import compose_config, to_yaml

    print(to_yaml(compose_config(args.overrides)))  # any composable config: `asyncopd validate` judges it
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from asyncopd.cli.validate import render
    from asyncopd.config.load import compose_config

    text, ok = render(compose_config(args.overrides))
    print(text)
    return 0 if ok else 2


def _cmd_prepare(args: argparse.Namespace) -> int:
    from asyncopd.model.prepare import run_prepare
    from asyncopd.validation import load_config

    run_prepare(load_config(args.overrides), force=args.rebuild)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from asyncopd.core.errors import Preempted
    from asyncopd.pipeline.run import run_training
    from asyncopd.validation import load_config

    if getattr(args, "multirun", False):
        from asyncopd.cli.multirun import run_multirun

        return run_multirun(args.overrides)
    cfg = load_config(args.overrides)
    if args.prepare:
        from asyncopd.model.prepare import run_prepare

        run_prepare(cfg)
    try:
        run_training(cfg)
    except Preempted as e:  # scancel / preemption: the step in flight finished and was checkpointed
        print(f"asyncopd: {e}", file=sys.stderr)
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    from asyncopd.bench.study import gather, print_study

    rows = gather(args.dir)
    print_study(rows, args.out or args.dir)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from asyncopd.bench.pipeline_bench import run_pipeline_bench

    run_pipeline_bench(args)
    return 0


def _cmd_export_hf(args: argparse.Namespace) -> int:
    """A megatron learner checkpoint (any layout) -> a Hugging Face checkpoint directory."""
    from pathlib import Path

    from asyncopd.core.errors import ConfigError
    from asyncopd.learner.checkpoints import resolve_checkpoint

    ckpt = resolve_checkpoint(args.checkpoint)
    if not (ckpt / "megatron").is_dir():
        hf = (ckpt / "config.json").exists() and any(ckpt.glob("model*.safetensors"))
        raise ConfigError(f"{args.checkpoint}: " + (
            "already a Hugging Face checkpoint (the hf learner saves them): serve or load it as it is" if hf else
            "no megatron learner checkpoint here (expected <run>/checkpoint, a checkpoints/step-N directory or a "
            "run directory holding them)"))
    if Path(args.out).exists() and any(Path(args.out).iterdir()):
        raise ConfigError(f"{args.out} exists and is not empty: pick a new directory for the export")
    from asyncopd.learner.megatron.model import export_hf

    out = export_hf(str(ckpt), args.out, bucket_bytes=int(args.shard_gb * (1 << 30)))
    print(f"exported {ckpt} -> {out}")
    return 0


def _raised_from(error: BaseException | None, kind: type[BaseException]) -> BaseException | None:
    """`error` or the first exception in its `raise ... from` chain that is a `kind` (a pipeline stage's error
    reaches the CLI wrapped in the learner loop's)."""
    while error is not None and not isinstance(error, kind):
        error = error.__cause__
    return error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="asyncopd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="print the resolved config")
    _overrides(p)
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("validate", help="will this config run, and will it fit? (layouts, GPUs, memory per role; "
                       "starts nothing; exit 2 names what to change)")
    _overrides(p)
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("prepare", help="install (shipped) or build tokenizer, teacher and student (cached)")
    p.add_argument("--rebuild", action="store_true",
                   help="train both models from scratch even if shipped or cached ones match the config")
    _overrides(p)
    p.set_defaults(func=_cmd_prepare)

    for name, prepare, text in (("train", False, "run on-policy distillation"),
                                ("demo", True, "prepare (cached) then train: the embedded demo")):
        p = sub.add_parser(name, help=text)
        _overrides(p)
        p.set_defaults(func=_cmd_train, prepare=prepare)
    sub.choices["train"].add_argument(
        "-m", "--multirun", action="store_true",
        help="a Hydra sweep: one run per point of `key=a,b` overrides (hydra/launcher=submitit_slurm submits each "
        "to Slurm; hydra.sweep.dir=DIR, default runs/sweep-<timestamp>), then its study")

    p = sub.add_parser("study", help="a sweep's runs in one table (samples/s, tokens/s, accuracy, staleness, busy "
                       "time per role) with plots: `asyncopd study runs/sweep-...`")
    p.add_argument("dir", help="a sweep directory (or any directory holding run directories)")
    p.add_argument("--out", default="", help="where study.json and study.png go (default: DIR)")
    p.set_defaults(func=_cmd_study)

    from asyncopd.cli import serve

    p = sub.add_parser("serve", help="our rollout engine or teacher server as a standalone process, like "
                       "`python -m sglang.launch_server` (until SIGTERM/SIGINT)")
    serve.add_arguments(p)
    p.set_defaults(func=serve.run)

    p = sub.add_parser("bench", help="sync vs async pipeline benchmark (`asyncopd bench memory`: estimator "
                       "memory, `bench latency`: HTTP call latency, `bench prepare`: the prepare recipe over seeds, "
                       "`bench weights`: weight-update bandwidth, `bench router`: sglang-router's overhead, "
                       "`bench learner`: the megatron learner per layout)")
    from asyncopd.bench.pipeline_bench import add_arguments as add_pipeline_bench

    add_pipeline_bench(p)
    p.set_defaults(func=_cmd_bench)

    import importlib

    for name, module, text in (
            ("bench-memory", "estimator_memory", "peak extra memory of each estimator vs one logits tensor"),
            ("bench-prepare", "prepare_bench", "the prepare recipe from scratch over seeds x torch threads"),
            ("bench-latency", "latency", "HTTP latency of /health, /generate, /score, weight update"),
            ("bench-weights", "weight_bench", "weight-update time and GB/s vs a raw torch.distributed broadcast"),
            ("bench-router", "router_bench", "per-request overhead of sglang-router vs calling an engine directly"),
            ("bench-learner", "learner_bench", "megatron learner per TP x PP x DP layout: tokens/s, memory, export")):
        bench = importlib.import_module(f"asyncopd.bench.{module}")
        p = sub.add_parser(name, help=text)
        bench.add_arguments(p)
        p.set_defaults(func=lambda a, bench=bench: (bench.run(a), 0)[1])

    p = sub.add_parser("export-hf", help="a megatron learner checkpoint (any TP/PP/DP layout) as a Hugging Face "
                       "checkpoint (config, tokenizer, safetensors shards)")
    p.add_argument("checkpoint", help="<run>/checkpoint, <run>/checkpoints/step-N, or a run directory (its newest)")
    p.add_argument("out", help="a new directory for the Hugging Face checkpoint")
    p.add_argument("--shard-gb", type=float, default=2.0, help="size of each safetensors shard (GiB)")
    p.set_defaults(func=_cmd_export_hf)

    p = sub.add_parser("analyze-estimators", help="bias/variance of reverse-KL gradient estimators")
    from asyncopd.bench import estimator_analysis

    estimator_analysis.add_arguments(p)
    p.set_defaults(func=lambda a: (estimator_analysis.run(a), 0)[1])

    p = sub.add_parser("simulate", help="discrete-event model of the pipeline at cluster scale: calibrate against "
                       "a bench (--calibrate bench.json) or project GPU splits x k (--project paper)")
    from asyncopd.bench import simulate

    simulate.add_arguments(p)
    p.set_defaults(func=lambda a: (simulate.run(a), 0)[1])

    argv = list(sys.argv[1:] if argv is None else argv)
    # `bench` takes free Hydra overrides, so its subcommands are routed here
    if argv[:1] == ["bench"] and argv[1:2] in (["memory"], ["latency"], ["prepare"], ["weights"], ["router"],
                                               ["learner"]):
        argv = [f"bench-{argv[1]}", *argv[2:]]
    args = parser.parse_args(argv)
    from asyncopd.core.errors import ConfigError, TeacherDegenerate
    from asyncopd.model.prepare import PrepareError

    try:
        return args.func(args)
    except ConfigError as e:
        print(f"asyncopd: config error: {e}", file=sys.stderr)
        return 2
    except PrepareError as e:  # the recipe or a shipped model failed its check: what to do, no traceback
        print(f"asyncopd: prepare failed: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # a teacher answered scores no trained model gives: what happened, no traceback
        degenerate = _raised_from(e, TeacherDegenerate)
        if degenerate is None:
            raise
        print(f"asyncopd: teacher failed: {degenerate}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
