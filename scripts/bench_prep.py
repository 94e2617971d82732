"""Shard-preparation throughput (tokens/s) on the embedded corpus, for several worker counts.

    python scripts/bench_prep.py [--workers 1,2] [--repeat 32] [--trials 3]

The embedded corpus (Python reference-manual text, ~137 K tokens with the default 2048
BPE vocabulary) is written `--repeat` times into one temporary JSONL file, then
`prepare_shards` runs on it `--trials` times per worker count; the median wall time is
reported, with the worker-process start-up included. Prints markdown table rows for
docs/benchmarks.md and checks that every worker count wrote the same shards.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import os
import platform
import statistics
import sys
import tempfile
import time

from undertow.data_prep.corpus import EMBEDDED_CORPUS, ensure_embedded_dataset
from undertow.data_prep.shards import TOKENIZER_NAME, prepare_shards


def _repeated_corpus(path: str, repeat: int) -> None:
    with gzip.open(EMBEDDED_CORPUS, "rb") as f:
        payload = f.read()
    with open(path, "wb") as f:
        for _ in range(repeat):
            f.write(payload)


def _time_prep(inputs: list[str], tokenizer: str, workers: int, trials: int, shard_tokens: int,
               scratch: str) -> tuple[float, dict]:
    """Median seconds of `trials` fresh runs, and the manifest of the last one."""
    seconds = []
    for trial in range(trials):
        out = os.path.join(scratch, f"w{workers}-t{trial}")
        start = time.perf_counter()
        manifest = prepare_shards(inputs, tokenizer, out, shard_tokens=shard_tokens, workers=workers,
                                  progress=False)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), manifest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts (default 1,2)")
    parser.add_argument("--repeat", type=int, default=32, help="copies of the embedded corpus in the input (default 32)")
    parser.add_argument("--trials", type=int, default=3, help="runs per worker count; the median is shown (default 3)")
    parser.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary of the tokenizer (default 2048)")
    parser.add_argument("--shard-tokens", type=int, default=1 << 18, help="tokens per shard (default 262144)")
    args = parser.parse_args()

    tokenizer = os.path.join(ensure_embedded_dataset(vocab_size=args.vocab_size), TOKENIZER_NAME)
    rows, shard_hashes = [], set()
    with tempfile.TemporaryDirectory(prefix="bench-prep-") as scratch:
        inputs = [os.path.join(scratch, "corpus.jsonl")]
        _repeated_corpus(inputs[0], args.repeat)
        for workers in (int(w) for w in args.workers.split(",")):
            seconds, m = _time_prep(inputs, tokenizer, workers, args.trials, args.shard_tokens, scratch)
            shard_hashes.add(tuple(s["sha256"] for s in m["shards"]))
            rows.append(f"| {workers} | {m['documents']:,} | {m['tokens']:,} | {len(m['shards'])} | "
                        f"{seconds:.2f} | {m['tokens'] / seconds:,.0f} |")
    if len(shard_hashes) != 1:
        print("error: worker counts wrote different shards", file=sys.stderr)
        return 1

    print(f"`python scripts/bench_prep.py --workers {args.workers} --repeat {args.repeat} --trials {args.trials}` "
          f"on {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
          f"Python {platform.python_version()}, {datetime.date.today().isoformat()}; "
          f"BPE vocab {args.vocab_size}, median of {args.trials}, worker start-up included\n")
    print("| workers | documents | tokens | shards | seconds | tokens/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
