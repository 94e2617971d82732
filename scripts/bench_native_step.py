"""CPU training step of a Mamba-1 model with the native selective-scan loops against the PyTorch ones.

    python scripts/bench_native_step.py [--d-model 128] [--layers 4] [--d-state 8] [--batch 16] [--seq 128] [--rounds 6] [--threads 2]

The tiny-mamba recipe's shape by default. Forward + backward of the cross-entropy on random tokens,
native and PyTorch steps interleaved in one process (each after one untimed step); prints the
median of `--rounds` each.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from undertow.kernels.selective_scan import native as scan_native
from undertow.models.mamba.config import MambaConfig
from undertow.models.mamba.model import MambaLM


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-state", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = MambaConfig(vocab_size=2048, d_model=args.d_model, layer_pattern="m" * args.layers, d_state=args.d_state)
    model = MambaLM(cfg)
    model.init_weights()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))

    def step() -> float:
        start = time.perf_counter()
        torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
        return time.perf_counter() - start

    times: dict[bool, list[float]] = {True: [], False: []}
    try:
        for _ in range(args.rounds):
            for native in (True, False):
                scan_native.ENABLED = native
                step()
                times[native].append(step())
    finally:
        scan_native.ENABLED = True
    if scan_native._library() is None:
        print("the native loops are unavailable here: both rows ran the PyTorch loops")
    for native, label in ((True, "native loops"), (False, "PyTorch loops")):
        print(f"{label}: {statistics.median(times[native]) * 1e3:.1f} ms a step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
