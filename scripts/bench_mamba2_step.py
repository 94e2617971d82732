"""One training step (forward + backward) of a tiny Mamba-2: undertow's model against transformers'
Mamba2ForCausalLM of the same shape (its torch path: mamba_ssm / causal_conv1d not installed).

    python scripts/bench_mamba2_step.py [--d-model 256] [--layers 4] [--d-state 64] [--headdim 32]
        [--chunk-size 64] [--batch 4] [--seq-len 512] [--vocab 2048] [--steps 7] [--warmup 2] [--threads 2]

Both models get the same weights (ours exported through models/mamba/hf.py), the same random tokens
and the same loss (mean next-token cross-entropy of the logits). A step is zero_grad + forward +
loss + backward, the two models alternating; the median and the minimum over --steps timed steps
after --warmup are reported (and the two losses must agree).
Our SSD backend is whatever kernel dispatch picks (logged). Prints a markdown table with the
command, machine and date for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-state", type=int, default=64)
    p.add_argument("--headdim", type=int, default=32)
    p.add_argument("--chunk-size", type=int, default=64)
    add_step_args(p)
    return p.parse_args(argv)


def add_step_args(p: argparse.ArgumentParser) -> None:
    """The options of a step benchmark that are not the model's shape (shared with bench_xlstm_step.py)."""
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--steps", type=int, default=7, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch CPU threads")


def build_models(args):
    """(ours, transformers') with identical weights, in training mode."""
    import transformers

    from undertow.models.mamba import hf as adapter
    from undertow.models.mamba.config import MambaConfig
    from undertow.models.mamba.model import MambaLM

    cfg = MambaConfig(vocab_size=args.vocab, d_model=args.d_model, layer_pattern="M" * args.layers,
                      d_state=args.d_state, headdim=args.headdim, chunk_size=args.chunk_size)
    torch.manual_seed(0)
    ours = MambaLM(cfg)
    ours.init_weights()
    config, tensors = adapter.to_hf(cfg, ours.state_dict(), {})
    config.pop(adapter.UNDERTOW_KEY)
    config.pop("architectures")
    theirs = transformers.Mamba2ForCausalLM(transformers.AutoConfig.for_model(config.pop("model_type"), **config))
    theirs.load_state_dict({k: v.clone() for k, v in tensors.items()}, strict=False)
    theirs.tie_weights()
    return ours.train(), theirs.train()


def train_step(forward, model, ids: torch.Tensor) -> tuple[float, float]:
    """(seconds, loss) of zero_grad + forward + loss + backward."""
    start = time.perf_counter()
    model.zero_grad(set_to_none=True)
    logits = forward(model, ids)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
    loss.backward()
    return time.perf_counter() - start, loss.item()


def interleaved_times(contenders, ids: torch.Tensor, args) -> list[list[float]]:
    """Timed steps of each (forward, model), alternating which goes first, so a change of machine
    load during the run hits both alike. Checks that both compute the same loss."""
    times = [[] for _ in contenders]
    for i in range(args.warmup + args.steps):
        order = range(len(contenders)) if i % 2 == 0 else reversed(range(len(contenders)))
        losses = {}
        for k in order:
            seconds, losses[k] = train_step(*contenders[k], ids)
            if i >= args.warmup:
                times[k].append(seconds)
        if max(losses.values()) - min(losses.values()) > 1e-4:
            raise RuntimeError(f"the models disagree (losses {losses}): not the same function, no comparison")
    return times


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    from undertow.kernels.dispatch import select_backend
    from undertow.kernels.ssd import IMPLEMENTATIONS

    ours, theirs = build_models(args)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(1))
    backend = select_backend("ssd", ids.float(), None, tuple(IMPLEMENTATIONS))  # what the model's calls pick
    names = [f"undertow MambaLM (ssd: {backend})", "transformers Mamba2ForCausalLM (torch path)"]
    times = interleaved_times([(lambda m, x: m(x), ours), (lambda m, x: m(x).logits, theirs)], ids, args)
    rows = list(zip(names, times))
    tokens = args.batch * args.seq_len
    print(f"command: `python {' '.join(sys.argv)}`  ")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
          f"{args.threads} torch threads; torch {torch.__version__}, transformers {transformers.__version__}  ")
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}  ")
    print(f"shape: d_model {args.d_model}, {args.layers} Mamba-2 layers, d_state {args.d_state}, headdim "
          f"{args.headdim}, chunk {args.chunk_size}, vocab {args.vocab}, batch {args.batch} x {args.seq_len} tokens, "
          f"float32; median of {args.steps} steps after {args.warmup} warm-up\n")
    print("| model | median s/step | min s/step | tokens/s (median) |")
    print("|---|---:|---:|---:|")
    for name, times in rows:
        med = statistics.median(times)
        print(f"| {name} | {med:.3f} | {min(times):.3f} | {tokens / med:,.0f} |")
    speedup = statistics.median(rows[1][1]) / statistics.median(rows[0][1])
    print(f"\nundertow is {speedup:.2f}x faster per training step (median).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
