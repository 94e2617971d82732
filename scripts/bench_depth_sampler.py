"""Forward passes per generated token of a Huginn-style model: the sequential sampler (r core
steps per token, one after another) against the parallel diagonal sampler
(undertow/models/depth/sampler.py), which returns the same greedy text; and the core steps per
token of cached decoding with an adaptive exit (models/depth/generate.py) at the largest depth.

    python scripts/bench_depth_sampler.py [--checkpoint runs/tiny-depth/checkpoints] [--depths 4 8 16]
        [--prompts 4] [--prompt-len 16] [--new-tokens 32] [--threads 2] [--exit-thresholds 0 0.02 0.05 0.1]
        [--kl-thresholds 0.0001 0.001 0.01]

With --checkpoint (a trained `depth` checkpoint, e.g. `undertow pretrain tiny-depth`'s) the
prompts are random tokens of its vocabulary; without it, a random tiny model (drafts are then
often wrong, the sampler's worst case). Passes count model calls of one core step's depth
(prelude + core step + coda): the sequential sampler spends r per token, the diagonal sampler
~1 per token plus the restarts after wrong drafts. Every diagonal result is checked against the
sequential greedy text. Prints a markdown table with the command, machine and date.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="a depth-family checkpoint (step_* or a checkpoint root)")
    p.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exit-thresholds", type=float, nargs="*", default=[0.0, 0.02, 0.05, 0.1],
                   help="relative latent change below which a token stops its loop (0: never)")
    p.add_argument("--kl-thresholds", type=float, nargs="*", default=[1e-4, 1e-3, 1e-2],
                   help="KL between successive steps' next-token distributions below which a token stops")
    return p.parse_args(argv)


def load_model(checkpoint: str | None):
    from undertow.models.depth.config import DepthConfig
    from undertow.models.depth.model import DepthLM

    if checkpoint is None:
        torch.manual_seed(0)
        model = DepthLM(DepthConfig(arch="huginn", vocab_size=256, d_model=64, n_heads=4, ffn_hidden=128,
                                    n_prelude=1, n_core=2, n_coda=1, mean_depth=4.0, max_depth=16, backprop_depth=2))
        model.init_weights()
        return model.eval(), "random tiny huginn (d 64)"
    from undertow.hf.export import load_model as load_checkpoint_model, read_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(checkpoint)
    _, family, cfg = read_checkpoint(path)
    if family != "depth" or cfg.arch != "huginn":
        sys.exit(f"{path} is a {family} checkpoint, not a huginn one")
    return load_checkpoint_model(path, cfg), path


def greedy_sequential(model, prompt, new_tokens):
    out = prompt
    with torch.no_grad():
        for _ in range(new_tokens):
            out = torch.cat([out, model(out)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out


def main(argv=None) -> int:
    from undertow.models.depth.sampler import diagonal_generate

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, source = load_model(args.checkpoint)
    g = torch.Generator().manual_seed(args.seed)
    rows = []
    for depth in args.depths:
        passes = []
        for _ in range(args.prompts):
            prompt = torch.randint(0, model.cfg.vocab_size, (1, args.prompt_len), generator=g)
            stats = {}
            got = diagonal_generate(model, prompt, args.new_tokens, depth=depth, stats=stats)
            model.set_depth(depth)
            want = greedy_sequential(model, prompt, args.new_tokens)
            model.set_depth(None)
            if not torch.equal(got, want):
                sys.exit(f"depth {depth}: the diagonal sampler's text differs from the sequential one")
            passes.append(stats["passes"])
        per_token = sum(passes) / len(passes) / args.new_tokens
        rows.append((depth, float(depth), per_token, depth / per_token))
    print(f"`python scripts/{' '.join(['bench_depth_sampler.py'] + (argv if argv is not None else sys.argv[1:]))}`"
          f" on {platform.machine()} ({args.threads} threads), torch {torch.__version__}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; model: {source}; "
          f"{args.prompts} prompts of {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy\n")
    print("| depth r | sequential passes/token | diagonal passes/token | fewer passes |")
    print("|---:|---:|---:|---:|")
    for depth, seq, diag, gain in rows:
        print(f"| {depth} | {seq:.1f} | {diag:.2f} | {gain:.1f}x |")
    if args.exit_thresholds:
        exit_table(model, args, max(args.depths))
    return 0


def exit_table(model, args, depth: int) -> None:
    """Cached decoding of all prompts at `depth` with each exit threshold and core cache: mean core
    steps per decoded token, and the share of tokens equal to the no-exit dense text."""
    from undertow.models.depth.generate import generate

    g = torch.Generator().manual_seed(args.seed + 1)
    prompts = torch.randint(0, model.cfg.vocab_size, (args.prompts, args.prompt_len), generator=g)
    reference = generate(model, prompts, args.new_tokens, depth=depth)[:, args.prompt_len:]
    print(f"\ncached decoding at depth {depth} ({args.prompts} prompts, {args.new_tokens} new tokens):\n")
    print("| core cache | exit on | threshold | core steps/token | tokens as without exit |")
    print("|---|---|---:|---:|---:|")
    runs = [(cache, "latent", t) for cache in ("dense", "shared") for t in args.exit_thresholds]
    runs += [("dense", "kl", t) for t in args.kl_thresholds]
    for cache, exit_on, threshold in runs:
        stats = {}
        out = generate(model, prompts, args.new_tokens, depth=depth, cache=cache, exit_threshold=threshold,
                       exit_on=exit_on, stats=stats)
        steps = sum(stats["steps_per_token"]) / len(stats["steps_per_token"])
        same = (out[:, args.prompt_len:] == reference).float().mean().item()
        print(f"| {cache} | {exit_on} | {threshold:g} | {steps:.2f} | {same:.0%} |")


if __name__ == "__main__":
    raise SystemExit(main())
