"""Checkpoint manifests: the size and sha256 of every file of a checkpoint, written before the commit
(checkpoint.py's save), and the check of a checkpoint's files against it before a load.

Several ranks: each hashes the data files it wrote itself; on verification rank 0 reads the
manifest, every rank checks a share of the files and all take the same verdict.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import torch.distributed as dist

from undertow.log import get_logger

MANIFEST_NAME = "manifest.json"
_RANK_FILE = re.compile(r"^__(\d+)_\d+\.distcp$")  # DCP's FileSystemWriter: one data file per rank
_HASH_BLOCK = 1 << 20
log = get_logger("undertow.checkpoint")


class CheckpointDamaged(RuntimeError):
    """A checkpoint whose files differ from its manifest, or that cannot be read. `reason` is a
    short tag for the name it is set aside under: missing, size, sha256, manifest, meta, unreadable."""

    def __init__(self, path: str, reason: str, detail: str):
        super().__init__(f"checkpoint {path} is damaged: {detail}")
        self.path, self.reason, self.detail = path, reason, detail


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def from_rank0(value):
    """Rank 0's `value` on every rank, so that all ranks take the same decision."""
    if rank_world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def from_all_ranks(values: list) -> list:
    """Every rank's `values`, concatenated in rank order (the same list on every rank)."""
    world = rank_world()[1]
    if world == 1:
        return values
    gathered = [None] * world
    dist.all_gather_object(gathered, values)
    return [v for part in gathered for v in part]


def file_digest(path: str) -> dict:
    """{"size", "sha256"} of one file, streamed once in 1 MiB blocks."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
            size += len(block)
    return {"size": size, "sha256": h.hexdigest()}


def digest_own_shards(tmp: str) -> dict:
    """Size and sha256 of the DCP data files of a save in progress, gathered from every rank.

    Each rank hashes the files it has just written itself (`__<rank>_*.distcp`, still in its page
    cache), in parallel with the others; hashing them all on rank 0 would read the whole checkpoint
    back through one node. Collective."""
    rank = rank_world()[0]
    mine = [name for name in sorted(os.listdir(tmp))
            if (m := _RANK_FILE.match(name)) and int(m.group(1)) == rank]
    return dict(from_all_ranks([(name, file_digest(os.path.join(tmp, name))) for name in mine]))


def write_manifest(tmp: str, shards: dict) -> None:
    """Write manifest.json into the temporary directory, before the rename commits it, so that every
    committed checkpoint has one. `shards`: the data files' digests; rank 0 adds the rest (.metadata,
    meta.json)."""
    files = dict(shards)
    for name in sorted(os.listdir(tmp)):
        if name not in files and name != MANIFEST_NAME and os.path.isfile(os.path.join(tmp, name)):
            files[name] = file_digest(os.path.join(tmp, name))
    with open(os.path.join(tmp, MANIFEST_NAME), "w") as f:
        json.dump({"format": 1, "files": files}, f, indent=1, sort_keys=True)


def read_manifest(path: str) -> tuple[dict | None, str | None]:
    """(files, problem): the manifest's {name: {"size", "sha256"}}, None for a checkpoint written
    before manifests; `problem` says why an existing manifest cannot be used."""
    manifest = os.path.join(path, MANIFEST_NAME)
    if not os.path.isfile(manifest):
        return None, None
    try:
        with open(manifest) as f:
            files = json.load(f)["files"]
        return {name: {"size": int(d["size"]), "sha256": str(d["sha256"])} for name, d in files.items()}, None
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"{MANIFEST_NAME} is unreadable ({type(e).__name__}: {e})"


def check_file(path: str, name: str, expected: dict, mode: str) -> tuple[str, str, str] | None:
    """(name, reason, detail) when file `name` differs from what the manifest recorded, else None."""
    full = os.path.join(path, name)
    if not os.path.isfile(full):
        return name, "missing", f"{name} is missing (expected {expected['size']} bytes)"
    size = os.path.getsize(full)
    if size != expected["size"]:
        return name, "size", f"{name} has {size} bytes, expected {expected['size']}"
    if mode == "sha256":
        found = file_digest(full)["sha256"]
        if found != expected["sha256"]:
            return name, "sha256", f"{name} has sha256 {found[:16]}..., expected {expected['sha256'][:16]}..."
    return None


def verify_checkpoint(path: str, mode: str = "sha256") -> None:
    """Raise CheckpointDamaged when a file of checkpoint `path` is missing or differs from its
    manifest: sizes with mode "size", sizes and sha256 with "sha256"; "off" checks nothing. A
    checkpoint without a manifest (written before them) passes with a warning.

    Collective: rank 0 reads the manifest and shares it, every rank checks every world-th file
    and all take the first problem in file-name order, so they agree on the outcome."""
    if mode == "off":
        return
    rank, world = rank_world()
    files, problem = from_rank0(read_manifest(path) if rank == 0 else None)
    if problem:
        raise CheckpointDamaged(path, "manifest", problem)
    if files is None:
        if rank == 0:
            log.warning("checkpoint %s has no %s (written before manifests): loading it unverified", path, MANIFEST_NAME)
        return
    names = sorted(files)
    found = [p for name in names[rank::world] if (p := check_file(path, name, files[name], mode))]
    found = sorted(from_all_ranks(found))
    if found:
        _, reason, detail = found[0]
        raise CheckpointDamaged(path, reason, detail)
