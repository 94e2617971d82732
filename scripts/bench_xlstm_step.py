"""One training step (forward + backward) of a tiny xLSTM (xLSTM-7B blocks): undertow's model
against transformers' xLSTMForCausalLM of the same shape (its own torch code: the xlstm package is
not installed).

    python scripts/bench_xlstm_step.py [--d-model 128] [--layers 4] [--heads 2] [--chunk-size 64]
        [--batch 4] [--seq-len 512] [--vocab 2048] [--steps 7] [--warmup 2] [--threads 2] [--compile]

Both models get the same weights (ours exported through models/xlstm/hf.py) and the same random
tokens; a step is zero_grad + forward + loss + backward, each model computing its next-token loss
the way its training does: ours `model(ids, labels=...)` (the trainer's fused head loss,
models/common/fused_loss.py; `--unfused`: logits, then F.cross_entropy), transformers'
`model(ids, labels=ids).loss`. On CPU ours runs its native loops (the mLSTM recurrence, SwiGLU,
RMSNorm, the gated head norm, the head loss's rows: kernels/native.py, on torch's OpenMP threads
where it can; `UNDERTOW_NATIVE=0` for the PyTorch forms alone; under --compile the compiled blocks
call the mLSTM recurrence as a custom operator and leave the elementwise work to inductor). The two models alternate which goes first, and their losses must agree. Each step is timed in wall time and
in the calling thread's CPU time (time.thread_time): on a shared machine the wall time includes the
time the process waits for a core, the thread time does not (with --threads 1 it is the whole work).
qk and v widths must be multiples of 64 for the export (transformers sizes its cache that way).
Prints a markdown table with the command, machine, load and date for docs/benchmarks.md.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_mamba2_step import add_step_args  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each of our blocks, as training.compile does (transformers' model stays eager)")
    p.add_argument("--unfused", action="store_true",
                   help="our loss from the logits (training.fused_loss = false) instead of the fused head loss")
    add_step_args(p)
    return p.parse_args(argv)


def native_summary() -> str:
    """Which native libraries the step loaded, and whether on torch's OpenMP threads."""
    from undertow.kernels import native

    loaded = {name: native.uses_openmp(name) for name, lib in native._libraries.items() if lib is not None}
    if not loaded:
        return "none (UNDERTOW_NATIVE=0, no compiler, or none applied)"
    return ", ".join(f"{name}{' (OpenMP)' if omp else ''}" for name, omp in sorted(loaded.items()))


def build_models(args):
    """(ours, transformers') with identical weights, in training mode."""
    import transformers

    from undertow.models.hf_common import UNDERTOW_KEY
    from undertow.models.xlstm import hf as adapter
    from undertow.models.xlstm.config import XLSTMConfig
    from undertow.models.xlstm.model import XLSTMLM

    cfg = XLSTMConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                      chunk_size=args.chunk_size)
    torch.manual_seed(0)
    ours = XLSTMLM(cfg)
    ours.init_weights()
    config, tensors = adapter.to_hf(cfg, ours.state_dict(), {})
    config.pop(UNDERTOW_KEY)
    config.pop("architectures")
    theirs = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(config.pop("model_type"), **config))
    theirs.load_state_dict({k: v.clone() for k, v in tensors.items()}, strict=False)
    return ours.train(), theirs.train()


def train_step(loss_fn, model, ids: torch.Tensor) -> tuple[float, float]:
    """(seconds, mean loss) of zero_grad + forward + loss + backward."""
    start = time.perf_counter()
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, ids)
    loss.backward()
    return time.perf_counter() - start, loss.item()


def ours_fused(model, ids: torch.Tensor) -> torch.Tensor:
    """The trainer's path: next-token labels, the last position not counted, the fused head loss."""
    labels = torch.cat((ids[:, 1:], torch.full_like(ids[:, :1], -100)), 1)
    return model(ids, labels=labels) / (ids.numel() - ids.shape[0])


def ours_unfused(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def their_loss(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, labels=ids, use_cache=False).loss


def timed_steps(contenders, ids: torch.Tensor, args) -> list[list[tuple[float, float]]]:
    """(wall, thread CPU) seconds of each timed step of each (forward, model), alternating which goes
    first so a change of load hits both alike; raises if the models' losses differ."""
    times = [[] for _ in contenders]
    for step in range(args.warmup + args.steps):
        order = range(len(contenders)) if step % 2 == 0 else reversed(range(len(contenders)))
        losses = {}
        for k in order:
            cpu = time.thread_time()
            wall, losses[k] = train_step(*contenders[k], ids)
            if step >= args.warmup:
                times[k].append((wall, time.thread_time() - cpu))
        if max(losses.values()) - min(losses.values()) > 1e-4:
            raise RuntimeError(f"the models disagree (losses {losses}): not the same function, no comparison")
    return times


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    from undertow.kernels.dispatch import select_backend
    from undertow.kernels.mlstm import IMPLEMENTATIONS

    ours, them = build_models(args)
    if args.compile:
        from undertow.parallel.wrap import apply_compile

        apply_compile(ours)  # the warm-up steps include the compilation
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(1))
    backend = select_backend("mlstm", ids.float(), None, tuple(IMPLEMENTATIONS))
    compiled = ", blocks compiled" if args.compile else ""
    loss = "logits + F.cross_entropy" if args.unfused else "fused head loss"
    names = [f"undertow XLSTMLM (mlstm: {backend}{compiled}, {loss})",
             "transformers xLSTMForCausalLM (its torch code, labels=)"]
    times = timed_steps([(ours_unfused if args.unfused else ours_fused, ours), (their_loss, them)], ids, args)
    tokens = args.batch * args.seq_len
    print(f"command: `python {' '.join(sys.argv)}`  ")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
          f"{args.threads} torch threads; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}  ")
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}  ")
    print(f"native loops: {native_summary()}  ")
    print(f"shape: d_model {args.d_model}, {args.layers} xLSTM-7B blocks, {args.heads} heads, chunk {args.chunk_size}, "
          f"vocab {args.vocab}, batch {args.batch} x {args.seq_len} tokens, float32; median of {args.steps} steps "
          f"after {args.warmup} warm-up\n")
    print("| model | median s/step | min s/step | thread CPU s/step (median) | tokens/s (median) |")
    print("|---|---:|---:|---:|---:|")
    medians = []
    for name, t in zip(names, times):
        wall, cpu = (statistics.median(x) for x in zip(*t))
        medians.append((wall, cpu))
        print(f"| {name} | {wall:.3f} | {min(w for w, _ in t):.3f} | {cpu:.3f} | {tokens / wall:,.0f} |")
    (ours_wall, ours_cpu), (their_wall, their_cpu) = medians
    print(f"\nundertow is {their_wall / ours_wall:.2f}x faster per training step (median wall time), "
          f"{their_cpu / ours_cpu:.2f}x in thread CPU time.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
