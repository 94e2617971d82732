"""The `undertow` command: `undertow prep ...` and `undertow pretrain [RECIPE] [--section.field VALUE ...]`."""

from __future__ import annotations

import argparse
import json
import sys

from undertow import versions
from undertow.configtools import ConfigError, describe


def _meta(type_name: str) -> str:
    """Metavar for --help: choices as written, other types upper-cased (INT, FLOAT, LIST...)."""
    return type_name if type_name.startswith("{") else type_name.upper()


def _config_help(recipe: str | None = None) -> str:
    """The config fields with their defaults; with `recipe`, the recipe's values (and only its family's
    model fields), as `undertow pretrain RECIPE --help` shows them."""
    from undertow.models import registry
    from undertow.pretrain.config import ExperimentConfig, available_recipes, load_config

    cfg = load_config(recipe, []) if recipe is not None else None
    lines = [
        "recipes shipped in the package: " + ", ".join(available_recipes()) + " (or a path to a .toml file)",
        "",
        "Every config field can be overridden as --section.field VALUE (lists: comma-separated)"
        + (f"; values of recipe {recipe!r}:" if cfg is not None else ":"),
    ]

    def value(name: str, default):
        if cfg is None:
            return default
        obj = cfg
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj

    label = "value" if cfg is not None else "default"
    for name, type_name, default, text in describe(ExperimentConfig, ""):
        if name == "model":
            continue
        lines.append(f"  --{name} {_meta(type_name)}  ({label} {value(name, default)!r})  {text}")
    for family in [cfg.family] if cfg is not None else registry.families():
        spec = registry.get(family)
        lines.append(f"\nmodel fields of family {family!r} (model.family = {family!r}):")
        for name, type_name, default, text in describe(spec.config_cls, "model"):
            lines.append(f"  --{name} {_meta(type_name)}  ({label} {value(name, default)!r})  {text}")
    return "\n".join(lines)


def _help_recipe(plain: list[str]) -> str | None:
    """The recipe of `pretrain RECIPE --help` (None without one, or without --help)."""
    if "pretrain" not in plain or not {"-h", "--help"} & set(plain):
        return None
    after = plain[plain.index("pretrain") + 1:]
    values = {"--name", "--resume"}  # options of pretrain that take a value
    i = 0
    while i < len(after):
        if after[i] in values:
            i += 2
        elif after[i].startswith("-"):
            i += 1
        else:
            return after[i]
    return None


def cmd_pretrain(args: argparse.Namespace, overrides: list[str]) -> int:
    from undertow.pretrain.config import load_config

    if args.name is not None:
        overrides = [*overrides, "--name", args.name]
    if args.resume is not None:
        overrides = [*overrides, "--checkpoint.resume", args.resume]
    cfg = load_config(args.recipe, overrides)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    from undertow.pretrain.signals import EXIT_REQUEUE, Preempted
    from undertow.pretrain.trainer import Trainer, TrainingDiverged

    try:
        trainer = Trainer(cfg)
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # bad data, resume or launch: before any step
        print(f"error: {e}", file=sys.stderr)
        return 2
    from undertow.pretrain.loader import ShardReadError

    try:
        result = trainer.fit()
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except ShardReadError as e:  # damaged data found mid-run (a worker's traceback text: its last line)
        print(f"error: {str(e).strip().splitlines()[-1].removeprefix(type(e).__module__ + '.')}", file=sys.stderr)
        return 2
    except Preempted as e:  # SIGTERM/SIGUSR1: checkpointed; the exit code asks for a restart or requeue
        print(f"stopped: {e}", file=sys.stderr)
        return EXIT_REQUEUE
    if trainer.rank != 0:  # one summary for the job, not one per process
        return 0
    val = f", validation loss {result.last_val_loss:.4f}" if result.last_val_loss is not None else ""
    if result.already_finished:
        print(f"already finished at step {result.steps}{val}; nothing to do (raise --training.steps to train on); "
              f"run dir {result.run_dir}, checkpoint {result.checkpoint}")
        return 0
    print(
        f"done: {result.steps} steps, last loss {result.last_loss:.4f}{val}, "
        f"{result.skipped_steps} skipped; run dir {result.run_dir}, checkpoint {result.checkpoint}"
    )
    return 0


class _VersionAction(argparse.Action):
    """--version: the versions are read only when asked (package metadata, one line each)."""

    def __init__(self, option_strings, dest, help=None):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(versions.report())
        parser.exit()


def build_parser(help_recipe: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="undertow",
        description="Pretraining for recurrent-family language models.",
    )
    parser.add_argument("--version", action=_VersionAction,
                        help="show undertow's version and its dependencies' (installed here), then exit")
    sub = parser.add_subparsers(dest="command", required=True)

    pre = sub.add_parser(
        "pretrain",
        help="train a model from a recipe",
        description=(
            "Train a model from a TOML recipe (default: tiny, which trains on the corpus embedded in the "
            "package). Checkpoints, TensorBoard events and metrics.jsonl go to training.run_dir; an "
            "interrupted run resumes from its newest checkpoint (checkpoint.resume = auto)."
        ),
        epilog=_config_help(help_recipe),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pre.add_argument("recipe", nargs="?", default=None, help="recipe name or .toml path (default: tiny)")
    pre.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    pre.add_argument("--name", help="run name (default: the recipe's); used in training.run_dir")
    pre.add_argument(
        "--resume",
        metavar="auto|none|DIR",
        help="same as --checkpoint.resume: auto (newest complete checkpoint of the run, the default), "
        "none (start fresh), or a checkpoint directory",
    )
    pre.set_defaults(func=cmd_pretrain, takes_overrides=True)

    from undertow.planning.cli import add_plan_parser

    add_plan_parser(sub)
    from undertow.data_prep.cli import add_prep_parser

    add_prep_parser(sub)
    from undertow.hf.cli import add_convert_parser

    add_convert_parser(sub)
    from undertow.launch.cli import add_launch_parser

    add_launch_parser(sub)
    return parser


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate `--section.field VALUE` / `--section.field=VALUE` overrides from the other arguments."""
    plain, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and "." in arg.split("=", 1)[0]:
            overrides.append(arg)
            if "=" not in arg and i + 1 < len(argv):
                overrides.append(argv[i + 1])
                i += 1
        else:
            plain.append(arg)
        i += 1
    return plain, overrides


def main(argv: list[str] | None = None) -> int:
    plain, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(_help_recipe(plain))
    except (ConfigError, FileNotFoundError) as e:  # `pretrain BAD_RECIPE --help`
        print(f"error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(plain)
    try:
        if getattr(args, "takes_overrides", False):
            return args.func(args, overrides)
        if overrides:
            parser.error(f"unrecognized arguments: {' '.join(overrides)}")
        return args.func(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2


def console(argv: list[str] | None = None) -> None:
    """The `undertow` program (and `python -m undertow.cli`): main, then the process ends. One that
    joined a process group ends through parallel.mesh.end_process (under gloo: os._exit, so no abort
    at interpreter exit). main itself only returns its code: tests and notebooks call it in-process."""
    code = main(argv)
    if "torch.distributed" in sys.modules:
        from undertow.parallel.mesh import end_process

        code = end_process(code)
    sys.exit(code)


if __name__ == "__main__":
    console()
