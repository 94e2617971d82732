"""The layout table as text: the layouts that fit, best first, then those that do not and why."""

from __future__ import annotations

from undertow.planning.memory import GIB, Estimate, Setup

COLUMNS = ("pp", "dp_r", "dp_s", "cp", "tp", "ep", "AC", "ZeRO", "weights", "grads", "optim", "activ", "states",
           "total GiB", "a2a GiB", "step s", "tokens/s")


def _row(est: Estimate) -> list[str]:
    lay = est.layout
    gib = [f"{v / GIB:.1f}" for v in (est.weights, est.gradients, est.optimizer, est.activations, est.states, est.total,
                                      est.all_to_all)]
    timing = ["-", "-"] if est.step_time is None else [f"{est.step_time:.2f}", f"{est.tokens_per_s:,.0f}"]
    degrees = [str(v) for v in (lay.pp, lay.dp_replicate, lay.dp_shard, lay.cp, lay.tp, lay.ep)]
    return [*degrees, "on" if lay.ac else "off", str(lay.zero), *gib, *timing]


def _grid(rows: list[list[str]], notes: list[str] | None = None) -> list[str]:
    header = list(COLUMNS) + (["why not"] if notes is not None else [])
    body = [r + ([n] if notes is not None else []) for r, n in zip(rows, notes or [None] * len(rows))]
    widths = [max(len(str(line[i])) for line in [header, *body]) for i in range(len(header))]
    last = len(header) - 1 if notes is not None else -1  # the reasons column is text: left-aligned

    def fmt(line: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == last else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip()

    return [fmt(header), fmt(["-" * w for w in widths]), *(fmt(line) for line in body)]


def render(estimates: list[Estimate], setup: Setup, top: int = 10) -> str:
    """`estimates` sorted best first (layouts.plan_layouts); `top` rows per section (0: all)."""
    fits = [e for e in estimates if e.fits]
    fails = [e for e in estimates if not e.fits]
    fails.sort(key=lambda e: -e.tokens_per_s)
    limit = lambda rows: rows if top <= 0 else rows[:top]
    title = (
        f"{setup.gpus} GPUs x {setup.gpu_memory / GIB:.0f} GiB, peak {setup.peak_tflops:.0f} TFLOP/s at MFU "
        f"{setup.mfu:.2f}; seq_len {setup.seq_len}, global batch {setup.global_batch} sequences "
        f"({setup.global_batch * setup.seq_len:,} tokens), micro-batch {setup.micro_batch}; "
        f"memory in GiB per GPU (heaviest pipeline stage), reserve {setup.reserve / GIB:.1f} GiB included; "
        f"a2a: expert-parallel all-to-all GiB sent per GPU and step (not in the step time)"
    )
    lines = [
        title,
        "",
        f"layouts that fit ({len(fits)} of {len(estimates)}), fastest first:",
    ]
    lines += _grid([_row(e) for e in limit(fits)]) if fits else ["  none"]
    if fits and top > 0 and len(fits) > top:
        lines.append(f"  ... {len(fits) - top} more (--top 0 shows all)")
    lines += ["", f"layouts that do not fit ({len(fails)}), fastest first:"]
    shown = limit(fails)
    lines += _grid([_row(e) for e in shown], ["; ".join(e.problems) for e in shown]) if fails else ["  none"]
    if top > 0 and len(fails) > top:
        lines.append(f"  ... {len(fails) - top} more (--top 0 shows all)")
    return "\n".join(lines)
