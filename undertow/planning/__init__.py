"""The planner behind `undertow plan RECIPE [--gpus N]`.

cli.py      the command line (`undertow plan`)
summary.py  parameters, FLOPs/token, per-layer cost and weight bytes of a recipe's model (meta device)
memory.py   the per-GPU memory and step-time model of one parallel layout (activations measured by
            models/profile.py on the meta device, any family)
layouts.py  every layout of N GPUs, estimated and sorted by throughput
table.py    the layout table as text

docs/planning.md states every assumption; the docstrings say which numbers are measured and
which are modeled.
"""
