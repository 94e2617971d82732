"""The `undertow pretrain` command a launcher starts on every rank, built from a recipe and overrides.

The config is loaded and validated here, on the launching machine, before anything is started or
submitted, so a typo fails in a second instead of after a queue wait. The command pins the run
directory (an absolute path, so every node and every restart writes to the same place) and
`checkpoint.resume = auto`, which is what makes a restarted or requeued job continue from its
newest checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from undertow.configtools import ConfigError, parse_overrides
from undertow.pretrain.config import DEFAULT_RECIPE, ExperimentConfig, load_config, recipe_path


@dataclass
class PretrainCommand:
    cfg: ExperimentConfig
    run_dir: str  # absolute
    module_args: list[str]  # after `python`: ["-m", "undertow.cli", "pretrain", RECIPE, "--section.field=VALUE", ...]


def pretrain_command(recipe: str | None, overrides: list[str], name: str | None = None) -> PretrainCommand:
    """Validate the config and build the worker command. Overrides are passed on as `--key=VALUE` tokens
    (one token each, so no value can be taken for an option), last one of a key winning as in pretrain."""
    values = parse_overrides(overrides)
    if name is not None:
        values["name"] = name
    resume = values.get("checkpoint.resume", "auto")
    if resume != "auto":
        raise ConfigError(
            f"checkpoint.resume = {resume!r}: a launched job must use auto, so that a restarted or requeued job "
            "continues from its own newest checkpoint (start from other weights with checkpoint.init_from)"
        )
    recipe = recipe or DEFAULT_RECIPE
    if recipe.endswith(".toml") or os.sep in recipe:  # a file: absolute, for other nodes and directories
        recipe = os.path.abspath(recipe_path(recipe))
    cfg = load_config(recipe, values)
    run_dir = os.path.abspath(cfg.run_dir)
    values["training.run_dir"] = run_dir
    values["checkpoint.resume"] = "auto"
    args = ["-m", "undertow.cli", "pretrain", recipe, *(f"--{key}={value}" for key, value in values.items())]
    return PretrainCommand(cfg, run_dir, args)


def check_world_size(cfg: ExperimentConfig, processes: int, how: str) -> None:
    """The parallel layout must fill exactly the processes a launch starts; say so before starting them."""
    from undertow.parallel.mesh import NAMES, ParallelDims

    from undertow.parallel.mesh import LayoutError

    dims = ParallelDims(**{name: getattr(cfg.parallel, name) for name in NAMES})
    if dims.world_size != processes:
        raise ConfigError(
            f"the parallel layout ({dims.describe()}) needs {dims.world_size} processes, but {how} starts "
            f"{processes}; make parallel.pp x dp_replicate x dp_shard x cp x tp = {processes} "
            f"(e.g. --parallel.dp_shard {processes}) or start {dims.world_size}"
        )
    try:  # the model's shapes (heads, groups, layers, row length) against the degrees, before any process
        dims.validate(processes, cfg.layout_limits())
    except LayoutError as e:
        raise ConfigError(f"{e} (--parallel.* overrides)") from None
