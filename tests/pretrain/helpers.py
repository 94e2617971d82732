"""Small configs for trainer tests: a 2-layer model on the embedded corpus with a 512-token vocabulary."""

import json
import os

from undertow.pretrain.config import load_config

TINY = {
    "model.d_model": 32,
    "model.n_layers": 2,
    "model.n_heads": 2,
    "model.n_kv_heads": 1,
    "model.multiple_of": 16,
    "data.seq_len": 32,
    "data.embedded_vocab_size": 512,
    "data.val_fraction": 0.05,
    "training.micro_batch_size": 4,
    "training.val_every": 0,
    "schedule.warmup_steps": 2,
    "logging.every": 5,
    "checkpoint.every": 0,
}


def tiny_config(run_dir, **overrides):
    values = {**TINY, "training.run_dir": str(run_dir)}
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_config("tiny", {k: str(v) for k, v in values.items()})


def cli_args(run_dir, **overrides):
    values = {**TINY, "training.run_dir": str(run_dir)}
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    args = []
    for k, v in values.items():
        args += [f"--{k}", str(v)]
    return args


def read_losses(run_dir) -> dict[int, float]:
    """step -> loss of the train records in metrics.jsonl (a resumed run re-records steps; the last wins)."""
    losses = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if rec["kind"] == "train":
                losses[rec["step"]] = rec["loss"]
    return losses
