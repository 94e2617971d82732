"""The load of every expert of every MoE layer over a training run, written to the run directory
when training ends:

    expert_load.csv   layer, expert, routed (token, expert) pairs, fraction of the layer's pairs
    expert_load.md    the fractions as a table (a row per expert, a column per layer) and, per
                      layer, the busiest expert's load over the balanced 1 / E and the load entropy

"Over the run": the training steps this process ran (from step 0, or from the step it resumed at);
a layer counts the pairs its router sent to each expert in every training forward
(MoELayer.routed_total, already summed over the data/context-parallel ranks). Under pipeline
parallelism each stage holds its own layers: the tables of all ranks are gathered (one collective,
every rank calls `write_expert_load`) and rank 0 writes the files.
"""

from __future__ import annotations

import math
import os

import torch.distributed as dist
from torch import nn


def local_loads(model: nn.Module) -> dict[int, list[float]]:
    """layer index -> routed pairs per expert (E,), of the MoE layers this rank holds that have routed."""
    loads = {}
    for module in model.modules():
        total = getattr(module, "routed_total", None)
        if total is not None and hasattr(module, "index"):
            loads[int(module.index)] = total.detach().cpu().tolist()
    return loads


def gathered_loads(model: nn.Module) -> dict[int, list[float]]:
    """`local_loads` of every rank together (a collective when a process group runs). Ranks that hold
    the same layer (data, context and tensor parallel peers) hold the same counts: one is kept."""
    mine = local_loads(model)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return mine
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    merged: dict[int, list[float]] = {}
    for loads in everyone:
        for index, counts in loads.items():
            merged.setdefault(index, counts)
    return dict(sorted(merged.items()))


def load_table(loads: dict[int, list[float]]) -> str:
    """Markdown: the share of each layer's routed pairs per expert (%), then max / (1/E) and entropy."""
    layers = sorted(loads)
    shares = {i: [c / max(sum(loads[i]), 1.0) for c in loads[i]] for i in layers}
    n_experts = max(len(loads[i]) for i in layers)
    lines = ["| expert | " + " | ".join(f"layer {i}" for i in layers) + " |",
             "|---:|" + "---:|" * len(layers)]
    for e in range(n_experts):
        cells = [f"{100 * shares[i][e]:.2f}%" if e < len(shares[i]) else "" for i in layers]
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    busiest = [f"{max(shares[i]) * len(shares[i]):.2f}" for i in layers]
    entropy = [f"{-sum(s * math.log(s) for s in shares[i] if s > 0) / math.log(max(len(shares[i]), 2)):.3f}"
               for i in layers]
    lines.append("| max / (1/E) | " + " | ".join(busiest) + " |")
    lines.append("| entropy / log E | " + " | ".join(entropy) + " |")
    return "\n".join(lines) + "\n"


def write_expert_load(model: nn.Module, run_dir: str, write: bool) -> str | None:
    """Gather the run's expert loads (every rank calls this) and, where `write` (rank 0), write
    expert_load.csv and expert_load.md into `run_dir`. Returns the csv path, or None (not the
    writer, or no MoE layer routed a token)."""
    loads = gathered_loads(model)
    if not (write and loads):
        return None
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "expert_load.csv")
    with open(path, "w") as f:
        f.write("layer,expert,routed_pairs,fraction\n")
        for index, counts in loads.items():
            total = max(sum(counts), 1.0)
            for expert, count in enumerate(counts):
                f.write(f"{index},{expert},{int(count)},{count / total:.6f}\n")
    with open(os.path.join(run_dir, "expert_load.md"), "w") as f:
        f.write("# Expert load over the run\n\nShare of each MoE layer's routed (token, expert) pairs per "
                "expert, over every rank's tokens of the training steps run since this run started (or last "
                "resumed).\n\n" + load_table(loads))
    return path
