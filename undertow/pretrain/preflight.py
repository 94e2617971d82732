"""Checks before any work: the run's directories are writable and hold room for its checkpoints.

A read-only checkpoint directory or a full disk would otherwise surface at the first save, after
hours of training, as an OSError traceback or a torch zip-writer error. The checks run on every
rank (a directory local to one node fails there) and all ranks agree on the outcome.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from undertow.log import get_logger
from undertow.pretrain import checkpoint as ckpt
from undertow.pretrain.checkpoint_manifest import from_all_ranks

log = get_logger("undertow.preflight")

GIB = 2**30


class PreflightError(RuntimeError):
    """The run cannot succeed as configured; found before the model is built."""


def _agree(failure: str | None) -> None:
    """Raise PreflightError on every rank when any rank found a problem (the lowest rank's)."""
    failures = [f for f in from_all_ranks([failure]) if f is not None]
    if failures:
        raise PreflightError(failures[0])


def writable_failure(path: str, field: str) -> str | None:
    """Why directory `path` (config field `field`) cannot be written, or None. Creates it, then a file
    in it: an honest test where permission bits are not (root ignores them; read-only mounts do not)."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".undertow-write-test-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        return f"{field} = {path!r} is not writable ({e.strerror or e}); choose a directory this process can write"
    return None


def check_writable(run_dir: str, checkpoint_dir: str, checkpoint_field: str) -> None:
    """Refuse (on every rank) unless both directories can be created and written. Collective."""
    _agree(writable_failure(run_dir, "training.run_dir") or writable_failure(checkpoint_dir, checkpoint_field))


def checkpoint_bytes(n_saved: int) -> int:
    """Estimated size of one checkpoint of a model whose state dict holds `n_saved` values: float32
    weights and AdamW's two float32 moments for each (DCP saves a tied weight, and its moments, under
    each of its names). meta.json, the manifest and DCP's per-tensor headers are small next to it."""
    return 12 * n_saved


def _existing_bytes(root: str) -> int:
    total = 0
    for _, path in ckpt.list_checkpoints(root):
        for dirpath, _, files in os.walk(path):
            total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    return total


def check_space(checkpoint_dir: str, checkpoint_field: str, one: int, keep_last: int) -> None:
    """Refuse (on every rank) unless checkpoint_dir's filesystem has room for keep_last checkpoints of
    `one` bytes (see checkpoint_bytes) plus the one being written, less what checkpoints already there
    take. Collective."""
    needed = max((keep_last + 1) * one - _existing_bytes(checkpoint_dir), 0)
    free = shutil.disk_usage(checkpoint_dir).free
    failure = None
    if free < needed:
        failure = (
            f"no space for the run's checkpoints at {checkpoint_field} = {checkpoint_dir!r}: needs ~{needed / GIB:.2f} "
            f"GiB (checkpoint.keep_last = {keep_last} checkpoints + 1 being written, ~{one / GIB:.2f} GiB each: "
            f"float32 weights and AdamW moments), {free / GIB:.2f} GiB free; "
            "free space, lower checkpoint.keep_last or choose another directory"
        )
    _agree(failure)
    log.info("preflight: %s writable, ~%.2f GiB per checkpoint, %.2f GiB free", checkpoint_dir, one / GIB, free / GIB)
