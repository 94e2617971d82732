"""`undertow plan RECIPE [--gpus N]`: the command line of the planner.

Without --gpus it prints the model's summary (summary.py). With --gpus N it also plans the
parallel layouts of N GPUs: the memory per GPU of every (pp, dp_replicate, dp_shard, cp, tp,
activation checkpointing, ZeRO stage) and an estimated step time, fastest first, with the layouts
that do not fit and why (memory.py, layouts.py, table.py).
"""

from __future__ import annotations

import argparse

import torch

from undertow.configtools import ConfigError
from undertow.planning.layouts import plan_layouts
from undertow.planning.memory import GIB, Setup
from undertow.planning.summary import make_plan, model_facts, resolve_vocab
from undertow.planning.table import render
from undertow.pretrain.metrics import PEAK_TFLOPS


def parse_memory(text: str) -> float:
    """'80GB', '80GiB', '80G' or '80' -> bytes. GB is read as GiB: an "80 GB" GPU has about 80 GiB."""
    number = text.strip().upper().removesuffix("B").removesuffix("I").removesuffix("G")
    try:
        value = float(number)
    except ValueError:
        raise ConfigError(f"--gpu-memory {text!r}: give a size like 80GB (read as GiB)") from None
    if value <= 0:
        raise ConfigError(f"--gpu-memory {text!r}: must be > 0")
    return value * GIB


def make_setup(args: argparse.Namespace, cfg) -> Setup:
    """The plan's question from the command line, with the recipe's defaults; validated."""
    seq_len = args.seq_len or cfg.data.seq_len
    micro_batch = args.micro_batch or cfg.training.micro_batch_size
    peak = args.peak_tflops or PEAK_TFLOPS[args.gpu]
    checks = [
        (args.gpus >= 1, "--gpus", args.gpus, "must be >= 1"),
        (seq_len >= 2, "--seq-len", seq_len, "must be >= 2"),
        (micro_batch >= 1, "--micro-batch", micro_batch, "must be >= 1"),
        (0 < args.mfu <= 1, "--mfu", args.mfu, "must be in (0, 1]"),
        (peak > 0, "--peak-tflops", peak, "must be > 0"),
        (args.reserve_gib >= 0, "--reserve-gib", args.reserve_gib, "must be >= 0"),
        (args.global_batch >= seq_len and args.global_batch % seq_len == 0, "--global-batch", args.global_batch,
         f"tokens per step: a positive multiple of seq_len {seq_len}"),
    ]
    for ok, flag, value, why in checks:
        if not ok:
            raise ConfigError(f"{flag} = {value!r}: {why}")
    return Setup(
        gpus=args.gpus, gpu_memory=parse_memory(args.gpu_memory), seq_len=seq_len,
        global_batch=args.global_batch // seq_len, micro_batch=micro_batch, mfu=args.mfu, peak_tflops=peak,
        reserve=args.reserve_gib * GIB,
    )


def layout_table(args: argparse.Namespace, overrides: list[str]) -> str:
    from undertow.pretrain.config import load_config

    cfg = load_config(args.recipe, overrides)
    resolve_vocab(cfg)
    setup = make_setup(args, cfg)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype or _recipe_dtype(cfg)]
    estimates = plan_layouts(model_facts(cfg, setup.seq_len, dtype), setup)
    return render(estimates, setup, args.top)


def _recipe_dtype(cfg) -> str:
    """The trainer's autocast dtype on a GPU: bfloat16 unless the recipe asks for float32."""
    return "float32" if cfg.training.dtype == "float32" else "bfloat16"


def cmd_plan(args: argparse.Namespace, overrides: list[str]) -> int:
    print(make_plan(args.recipe, overrides).table())
    if args.gpus is not None:
        print()
        print(layout_table(args, overrides))
    return 0


def add_plan_parser(sub) -> None:
    plan = sub.add_parser(
        "plan",
        help="show a recipe's parameters, FLOPs/token and weight bytes; with --gpus, its parallel layouts",
        description="Build the recipe's model on the meta device (no memory, no data) and print its "
        "parameter count, training FLOPs per token at data.seq_len and the size of its weights in "
        "fp32 and bf16. Overrides (--model.d_model 512 ...) apply as in `undertow pretrain`.\n\n"
        "With --gpus N: for every layout of N GPUs (pp x dp_replicate x dp_shard x cp x tp, activation "
        "checkpointing on/off, ZeRO stage 0-3) the memory per GPU (weights, gradients, AdamW states, "
        "activations, recurrent states, a fixed reserve) and a step time from FLOPs at a stated MFU, "
        "fastest first, then the layouts that do not fit and why. Activations are measured on the meta "
        "device (what autograd saves, per block); docs/planning.md states every assumption.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plan.add_argument("recipe", nargs="?", default=None, help="recipe name or .toml path (default: tiny)")
    lay = plan.add_argument_group("parallel layouts (with --gpus)")
    lay.add_argument("--gpus", type=int, default=None, help="GPUs to plan for (e.g. 8)")
    lay.add_argument("--gpu-memory", default="80GB", help="memory of one GPU; GB is read as GiB (default 80GB)")
    lay.add_argument("--gpu", default="H100", choices=sorted(PEAK_TFLOPS),
                     help="GPU whose dense bf16 peak is used (default H100: 989 TFLOP/s)")
    lay.add_argument("--peak-tflops", type=float, default=0.0, help="dense peak TFLOP/s of one GPU (overrides --gpu)")
    lay.add_argument("--mfu", type=float, default=0.4,
                     help="fraction of the peak reached on the FLOPs executed, recompute included (default 0.4)")
    lay.add_argument("--seq-len", type=int, default=0, help="tokens per sequence (default: the recipe's data.seq_len)")
    lay.add_argument("--global-batch", type=int, default=4 * 2**20,
                     help="TOKENS per optimizer step over all GPUs, a multiple of seq_len (default 4194304)")
    lay.add_argument("--micro-batch", type=int, default=0,
                     help="sequences per forward/backward on one rank (default: training.micro_batch_size)")
    lay.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                     help="compute (autocast) dtype (default bfloat16, float32 if the recipe's training.dtype is)")
    lay.add_argument("--reserve-gib", type=float, default=3.0,
                     help="per-GPU allowance for CUDA context, NCCL buffers and fragmentation (default 3)")
    lay.add_argument("--top", type=int, default=10, help="rows per section of the layout table (0: all)")
    plan.set_defaults(func=cmd_plan, takes_overrides=True)
