"""The parallel-layout planner behind `undertow plan RECIPE --gpus N`.

profile.py  what a recipe's model holds in memory, measured on the meta device (any family)
memory.py   the per-GPU memory and step-time model of one parallel layout
layouts.py  every layout of N GPUs, estimated and sorted by throughput
table.py    the layout table as text

docs/planning.md states every assumption; the docstrings say which numbers are measured and
which are modeled.
"""
