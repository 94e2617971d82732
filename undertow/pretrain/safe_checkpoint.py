"""Opening a checkpoint without running its code: DCP's `.metadata` through a restricted unpickler.

torch.distributed.checkpoint pickles its metadata (which tensor lies at which offset of which
`.distcp` file) and its FileSystemReader unpickles it with plain `pickle.load`, so a crafted
`.metadata` runs whatever its pickle calls. Checkpoints travel between people and clusters like
Hugging Face weights do, so undertow reads `.metadata` here first: the unpickler admits only the
globals DCP metadata consists of and refuses any other with UnsafeCheckpoint (a ValueError: one
line, exit 2 through the CLI). SafeFileSystemReader then hands DCP the metadata read the same way,
so DCP never unpickles the file itself, and SafeLoadPlanner reads the small non-tensor values
(optimizer hyperparameters) with torch.load(weights_only=True) where DCP's planner unpickles them
freely.

The admitted globals are those a real checkpoint's `.metadata` references (listed by unpickling
one with a recording `find_class`): the dataclasses of torch.distributed.checkpoint.metadata,
filesystem._StorageInfo, torch.Size, the torch dtypes, `torch.serialization._get_layout` (looks
a layout up by name) and pathlib.PosixPath (StorageMeta.checkpoint_id). Each is a plain value
type or a lookup; none reaches the file system, a process or an import.
"""

from __future__ import annotations

import io
import os
import pickle

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

METADATA_NAME = ".metadata"

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
ADMITTED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {(_DCP_METADATA, name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING",
    )}
    | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),
        ("torch", "Size"),
        ("pathlib", "PosixPath"),
    }
    # every dtype (a checkpoint in bfloat16 names torch.bfloat16 where this one names float32)
    | {("torch", str(v).removeprefix("torch.")) for v in vars(torch).values() if isinstance(v, torch.dtype)}
)


class UnsafeCheckpoint(ValueError):
    """A checkpoint's `.metadata` references something DCP metadata never contains."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only ADMITTED_GLOBALS (GLOBAL, STACK_GLOBAL and the copyreg extension codes all
    come through find_class); persistent ids are refused by pickle.Unpickler itself."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) not in ADMITTED_GLOBALS:
            raise UnsafeCheckpoint(
                f"refusing to open {self.source}: it references {module}.{name}, which checkpoint "
                "metadata never contains (it may have been crafted to run code); only "
                "torch.distributed.checkpoint's metadata classes are admitted"
            )
        return super().find_class(module, name)


def read_metadata_safely(metadata_path: str) -> Metadata:
    """The DCP Metadata in file `metadata_path`, unpickled with only ADMITTED_GLOBALS resolvable.
    Raises UnsafeCheckpoint for anything else; a truncated or corrupt file raises what pickle raises
    (damage, not an attack: the caller's fallback handles it)."""
    with open(metadata_path, "rb") as f:
        data = f.read()
    metadata = _RestrictedUnpickler(io.BytesIO(data), metadata_path).load()
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpoint(
            f"refusing to open {metadata_path}: it holds a {type(metadata).__name__}, not DCP Metadata")
    return metadata


def check_checkpoint(path: str) -> None:
    """Read checkpoint directory `path`'s `.metadata` through the restricted unpickler (before DCP
    opens anything); UnsafeCheckpoint when it references anything else."""
    read_metadata_safely(os.path.join(path, METADATA_NAME))


class SafeFileSystemReader(FileSystemReader):
    """DCP's FileSystemReader with its metadata unpickled by read_metadata_safely instead of pickle.load
    (the tensors themselves DCP already reads with torch.load(weights_only=True))."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = read_metadata_safely(os.fspath(self._get_metadata_path(kwargs.get("rank"))))
        if getattr(metadata, "storage_meta", None) is None:  # as FileSystemReader.read_metadata does
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, with the non-tensor values (saved by torch.save) read with
    torch.load(weights_only=True) instead of weights_only=False."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            if "weights only load failed" not in str(e).lower():
                raise  # damage: the caller's fallback handles it
            raise UnsafeCheckpoint(f"refusing to load {fqn} of the checkpoint: it is not plain data "
                                   "(it may have been crafted to run code)") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def unsafe_cause(error: BaseException) -> UnsafeCheckpoint | None:
    """The UnsafeCheckpoint behind `error`: itself, or one a rank raised inside dcp.load (which wraps
    every rank's exception in a CheckpointException's `failures`); None when there is none."""
    if isinstance(error, UnsafeCheckpoint):
        return error
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict):
        for failure in failures.values():
            cause = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(cause, UnsafeCheckpoint):
                return cause
    return None


def load_dcp(state: dict, path: str) -> None:
    """dcp.load of `state` from checkpoint directory `path`, refusing unsafe content (see the module
    docstring). Collective, as dcp.load is."""
    import torch.distributed.checkpoint as dcp

    check_checkpoint(path)
    dcp.load(state, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner())
