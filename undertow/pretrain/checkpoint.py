"""Atomic, resumable checkpoints through torch.distributed.checkpoint (DCP).

Layout of ROOT (the run's checkpoint directory):

    step_00000100/          one complete checkpoint
        *.distcp, .metadata   model + optimizer tensors (DCP; reshardable)
        meta.json             step, config, loader/schedule state, RNG states, counters
        manifest.json         size and sha256 of every other file (written before the commit)
    .step_00000200.tmp/     a save in progress (or one that crashed): never loaded
    step_00000300.damaged-size/   a checkpoint found damaged on load, set aside (never deleted)

A save writes everything into the hidden temporary directory, fsyncs it and renames it to
its final name; the rename is the commit, so a crash at any point leaves the previous
checkpoint usable. After a successful save only the newest `keep_last` are kept.

Loading verifies the files against the manifest first (sizes, and sha256 unless told
otherwise): a damaged checkpoint is named with what is wrong and renamed aside, and a resume
falls back to the newest good one.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import random
import re
import shutil
import tempfile
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from undertow.log import get_logger
from undertow.pretrain.checkpoint_manifest import (
    CheckpointDamaged,
    digest_own_shards,
    from_all_ranks,
    from_rank0,
    rank_world,
    write_manifest,
    verify_checkpoint,
)
from undertow.pretrain.safe_checkpoint import UnsafeCheckpoint, check_checkpoint, load_dcp, unsafe_cause

META_NAME = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_DAMAGED_DIR = re.compile(r"^step_\d{8}\.damaged-")
log = get_logger("undertow.checkpoint")


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:08d}")


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """Complete checkpoints under root as (step, path), oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        path = os.path.join(root, name)
        if m and os.path.isfile(os.path.join(path, META_NAME)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: str) -> str | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def rng_state() -> dict:
    """Every RNG the run may draw from (torch, CUDA, Python, numpy), as JSON-serializable values."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "python": [version, list(internal), gauss],
        "numpy": {**np_state, "state": {"key": np_state["state"]["key"].tolist(), "pos": np_state["state"]["pos"]}},
    }
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def _bytes_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(_bytes_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_bytes_tensor(s) for s in state["cuda"]])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = dict(state["numpy"])
    np_state["state"] = {"key": np.array(np_state["state"]["key"], dtype=np.uint32), "pos": np_state["state"]["pos"]}
    np.random.set_state(np_state)


def _fsync_tree(path: str) -> None:
    for dirpath, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())


def save_checkpoint(
    root: str, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, meta: dict, keep_last: int,
    protect: str | None = None, size_hint: int = 0,
) -> str:
    """Write checkpoint `step` atomically; prune to the newest `keep_last` and `protect` (the trainer's
    last checkpoint known good). Returns its path. A failed save removes its temporary directory; a full
    disk is reported as OSError(ENOSPC) naming ROOT, the size needed (`size_hint` bytes, else this rank's
    tensors) and the space free.

    Collective when torch.distributed is initialized: every rank writes its shards (DCP) and hashes
    them, the first rank writes meta.json and the manifest and commits by the rename; ROOT must be
    on a filesystem that every rank sees."""
    distributed = dist.is_available() and dist.is_initialized()
    lead = not distributed or dist.get_rank() == 0
    final = step_dir(root, step)
    tmp = os.path.join(root, f".step_{step:08d}.tmp")
    if lead:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    if distributed:
        dist.barrier()
    full_state = getattr(model, "full_state", None)  # a DeepSpeed engine maps its state (parallel/deepspeed.py)
    model_sd, optim_sd = full_state.checkpoint_state() if full_state else get_state_dict(model, optimizer)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DCP warns that it runs without a process group
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
        shards = digest_own_shards(tmp)
        if lead:
            write_meta(tmp, {"step": step, **meta})
            write_manifest(tmp, shards)
            _fsync_tree(tmp)
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        if lead:  # a half-written checkpoint would hold the space the next save needs
            shutil.rmtree(tmp, ignore_errors=True)
        full = _no_space_error(root, size_hint or _tensor_bytes((model_sd, optim_sd)), e)
        if full is not None:
            raise full from e
        raise
    if lead:
        if os.path.exists(final):  # re-saving the same step (e.g. the final save after a periodic one)
            shutil.rmtree(final)
        os.replace(tmp, final)
        log.info("checkpoint saved: %s", final)
        prune_checkpoints(root, keep_last, protect)
    if distributed:
        dist.barrier()
    return final


def _tensor_bytes(tree) -> int:
    """Bytes of the tensors (this rank's shards) in nested dicts, lists and tuples."""
    if isinstance(tree, dict):
        return sum(_tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_tensor_bytes(v) for v in tree)
    if torch.is_tensor(tree):
        local = tree.to_local() if hasattr(tree, "to_local") else tree
        return local.numel() * local.element_size()
    return 0


def _no_space_error(root: str, needed: int, cause: BaseException) -> OSError | None:
    """OSError(ENOSPC) naming root, the bytes needed and free, when `cause` comes from a full disk: by
    errno (through DCP's per-rank failures and chained causes) or, since torch's zip writer reports a
    full disk as 'unexpected pos', by less space free than the checkpoint needs. None otherwise."""
    errnos, pending = set(), [cause]
    while pending:
        error = pending.pop()
        errnos.add(getattr(error, "errno", None))
        for failure in (getattr(error, "failures", None) or {}).values():
            pending.append(failure[0] if isinstance(failure, tuple) else failure)
        pending += [c for c in (error.__cause__, error.__context__) if c is not None]
    free = shutil.disk_usage(root).free if os.path.isdir(root) else 0
    if not errnos & {errno.ENOSPC, errno.EDQUOT} and free >= needed:
        return None
    return OSError(errno.ENOSPC, f"no space left on device at {root}: the checkpoint needs ~{needed / 2**30:.2f} "
                                 f"GiB, {free / 2**30:.2f} GiB free ({type(cause).__name__}: {_first_line(cause)})")


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else ""


def prune_checkpoints(root: str, keep_last: int, protect: str | None = None) -> None:
    """Delete all but the newest `keep_last` complete checkpoints and `protect`. The first rank only."""
    for _, old in list_checkpoints(root)[:-keep_last]:
        if protect is None or os.path.abspath(old) != os.path.abspath(protect):
            shutil.rmtree(old, ignore_errors=True)


def set_aside_nonfinite(path: str) -> str:
    """Rename checkpoint `path`, whose weights led only to non-finite losses, to `<path>.nonfinite` so
    that no resume picks it; kept (never deleted) for inspection. Returns the new path. The first rank only."""
    target, n = f"{path}.nonfinite", 1
    while os.path.exists(target):
        n += 1
        target = f"{path}.nonfinite-{n}"
    os.rename(path, target)
    return target


def write_meta(path: str, meta: dict) -> None:
    """Write the meta.json of a checkpoint directory (sorted keys, so two runs' metas diff cleanly)."""
    with open(os.path.join(path, META_NAME), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)


@contextlib.contextmanager
def replacing_directory(out_dir: str, prefix: str):
    """Yields a new temporary sibling of `out_dir` to fill; when the block succeeds it replaces
    out_dir (an existing one is removed first), when it fails it is deleted. Converters write their
    output this way, so a crash never leaves a half-written directory under the final name."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield tmp
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_meta(path: str) -> dict:
    """The meta.json of a complete checkpoint directory; ValueError naming the file when it is not JSON."""
    meta_path = os.path.join(path, META_NAME)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {META_NAME})")
    with open(meta_path) as f:
        try:
            return json.load(f)
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            raise ValueError(f"{meta_path} is not valid JSON (truncated or damaged?): {e}") from None


def load_checkpoint(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Load model (and optimizer) tensors in place from a checkpoint directory; return its meta.
    Its `.metadata` is read through the restricted unpickler first (UnsafeCheckpoint: nothing loaded)."""
    meta = read_meta(path)
    check_checkpoint(path)  # before DCP (or DeepSpeed's loader) opens anything
    full_state = getattr(model, "full_state", None)  # a DeepSpeed engine loads full tensors by name
    if full_state is not None:
        full_state.load(path, with_optimizer=optimizer is not None)
        log.info("checkpoint loaded: %s (step %d)", path, meta["step"])
        return meta
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        members = [list(group["params"]) for group in optim_sd["param_groups"]]
    else:
        state = {"model": get_state_dict(model, [])[0]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_dcp(state, path)
    if optimizer is not None:
        # DCP keeps one rank's copy of the param groups (names and hyperparameters, not tensors);
        # under pipeline parallelism the ranks hold different parameters, and one whose tied
        # embedding is missing from that copy would be refused (zbv: the first and last stage on
        # one rank). Each rank's groups keep their own parameter names and take the hyperparameters.
        for group, names in zip(state["optim"]["param_groups"], members, strict=True):
            group["params"] = names
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={})
    log.info("checkpoint loaded: %s (step %d)", path, meta["step"])
    return meta


# ----------------------------------------------------------------- fallback: damaged checkpoints set aside
def _describe(error: BaseException) -> str:
    """One line for an exception; DCP's CheckpointException by the first failing rank's cause."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        error = failures[min(failures)][0]
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"


def _agreed(path: str, reason: str, read):
    """read() on every rank; when it raises on any rank because of the checkpoint's contents,
    CheckpointDamaged on all of them (the lowest failing rank's cause). Running out of memory is
    not damage and propagates as it is; nor is a refused unsafe checkpoint (UnsafeCheckpoint on all
    ranks: an attack is not worked around by falling back, and the file stays where it is)."""
    try:
        value, failure = read(), None
    except (torch.OutOfMemoryError, MemoryError):
        raise
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        unsafe = unsafe_cause(e)
        value, failure = None, ("unsafe", str(unsafe)) if unsafe else ("damaged", _describe(e))
    failures = [f for f in from_all_ranks([failure]) if f is not None]
    unsafe = [text for kind, text in failures if kind == "unsafe"]
    if unsafe:
        raise UnsafeCheckpoint(unsafe[0])
    if failures:
        raise CheckpointDamaged(path, reason, f"loading it failed: {failures[0][1]}")
    return value


def load_verified(path: str, model, optimizer, mode: str, check=None) -> dict:
    """Verify checkpoint `path` (see verify_checkpoint), read its meta, let `check(path, meta)` refuse an
    incompatible one (its error is not damage: the checkpoint stays as it is), then load it.
    Returns the meta; raises CheckpointDamaged when it is damaged. Collective."""
    verify_checkpoint(path, mode)
    meta = _agreed(path, "meta", lambda: read_meta(path))
    if check is not None:
        check(path, meta)
    _agreed(path, "unreadable", lambda: load_checkpoint(path, model, optimizer))
    return meta


def damaged_checkpoints(root: str) -> list[str]:
    """Checkpoints under root that were set aside as damaged, by name."""
    return sorted(n for n in os.listdir(root) if _DAMAGED_DIR.match(n)) if os.path.isdir(root) else []


def set_aside(path: str, reason: str) -> str:
    """Rename damaged checkpoint `path` to `<path>.damaged-<reason>` (with a counter when taken) and
    return the new path. Never deleted: a person may inspect or repair it. Rank 0 renames; collective."""
    target = None
    if rank_world()[0] == 0:
        target, n = f"{path}.damaged-{reason}", 1
        while os.path.exists(target):
            n += 1
            target = f"{path}.damaged-{reason}-{n}"
        os.rename(path, target)
    return from_rank0(target)


def load_newest_good(root: str, model, optimizer, mode: str, check=None) -> tuple[str, dict] | None:
    """(path, meta) of the newest checkpoint under root that verifies and loads (see load_verified);
    each damaged newer one is set aside with a warning. None when root holds no checkpoint at all;
    RuntimeError when every one is damaged (starting over silently would throw the run away)."""
    for _, path in reversed(from_rank0(list_checkpoints(root))):
        try:
            return path, load_verified(path, model, optimizer, mode, check)
        except CheckpointDamaged as e:
            aside = set_aside(path, e.reason)
            if rank_world()[0] == 0:
                log.warning("DAMAGED CHECKPOINT %s: %s; set aside as %s, falling back to the previous one",
                            path, e.detail, os.path.basename(aside))
    damaged = from_rank0(damaged_checkpoints(root))
    if damaged:
        raise RuntimeError(
            f"no usable checkpoint in {root}: {', '.join(damaged)} are damaged (set aside); repair one "
            "(rename it back to step_NNNNNNNN) or start over with checkpoint.resume=none"
        )
    return None
