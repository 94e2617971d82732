"""ParallelDims: the layout of a run (pp, dp_replicate, dp_shard, cp, tp; ep) and its named DeviceMesh.

The layout is validated against the world size and the model's shapes before any process does
work, with errors that say what to change. Mesh dimensions are named "pp", "dp_replicate",
"dp_shard", "cp", "tp" (outermost first: tp ranks are neighbours, so they share a node); the
flattened "dp" (dp_replicate x dp_shard) is what the loader splits data over and "dp_shard_cp"
(dp_shard x cp) is what FSDP2 shards parameters over.

ep (expert parallelism) is not a mesh dimension of its own: it splits the MoE experts over ep of
the "dp_shard_cp" ranks (parallel/expert.py, which unflattens "dp_shard_cp" into (ep, replicas)
when ep < dp_shard x cp), so it adds no processes; ep must divide dp_shard x cp. dp_replicate ranks
hold copies of the same experts; tp ranks hold slices of every expert's width; each pipeline stage
splits its own MoE layers.

Process groups are built once per process and layout (`process_groups()`): a second Trainer of the
same layout in one process (a notebook's sweep, a resume, the test harness) takes the first one's
mesh instead of new groups. Every gloo group keeps three threads alive until it is destroyed, and
nothing destroys a dropped mesh's groups, so a process that built Trainer after Trainer piled up
thousands of threads (the 4-process layout test: 5,800 threads, 60% of the CPU in the kernel). Torch's
DTensor caches also hand out meshes equal to an earlier one (same ranks and names), so destroying
the groups of an earlier mesh is not an option.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from undertow.parallel.expert_layout import expert_layout_problem

MESH_NAMES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")  # the mesh's dimensions, outermost first
NAMES = MESH_NAMES + ("ep",)  # every degree of a layout (parallel.<name> in the config)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class LayoutError(ValueError):
    """A parallel layout that cannot run; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class ParallelDims:
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1
    ep: int = 1

    def __post_init__(self):
        for name in NAMES:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise LayoutError(f"parallel.{name} = {value!r}: must be an integer >= 1")

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.cp * self.tp  # ep adds no processes

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many different batches one step sees."""
        return self.dp_replicate * self.dp_shard

    @property
    def is_single(self) -> bool:
        return self.world_size == 1

    def describe(self) -> str:
        parts = [f"{n}{getattr(self, n)}" for n in NAMES if getattr(self, n) > 1]
        return " x ".join(parts) if parts else "single process"

    def validate(self, world_size: int, shape_limits: list[tuple[str, str, int]] | None = None) -> None:
        """Raise LayoutError unless the layout fills `world_size` processes and every degree divides
        the model dimension it splits. `shape_limits` lists (degree, what it splits, its size), e.g.
        [("tp", "n_heads", 6), ("pp", "layers", 4)] (a ModelSpec's `shape_limits(config)`)."""
        if self.world_size != world_size:
            raise LayoutError(
                f"parallel layout {self.describe()} needs {self.world_size} processes, but the world size is "
                f"{world_size}; make pp x dp_replicate x dp_shard x cp x tp = {world_size}"
            )
        problem = expert_layout_problem(self)
        if problem:
            raise LayoutError(problem)
        for degree, what, size in shape_limits or []:
            value = getattr(self, degree)
            if degree == "pp":
                if value > size:
                    raise LayoutError(f"pp={value} exceeds {what}={size}; valid pp: 1..{size}")
            elif size % value:
                valid = ", ".join(str(d) for d in divisors(size))
                raise LayoutError(f"{degree}={value} does not divide {what}={size}; valid {degree}: {valid}")

    def build_mesh(self, device_type: str | None = None) -> DeviceMesh:
        """The named mesh over the current process group (which must be initialized), with the
        flattened "dp", "dp_shard_cp" and "dp_cp" dimensions added; the same object for every call
        with this layout in this process (`process_groups`)."""
        device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
        shape = tuple(getattr(self, n) for n in MESH_NAMES)
        cache = process_groups()
        key = ("mesh", device_type, shape)
        if key not in cache:  # built once per process and layout (module docstring)
            mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_NAMES)
            mesh[("dp_replicate", "dp_shard")]._flatten("dp")
            mesh[("dp_shard", "cp")]._flatten("dp_shard_cp")
            mesh[("dp_replicate", "dp_shard", "cp")]._flatten("dp_cp")
            cache[key] = mesh
        return cache[key]


_GROUPS: dict = {"world": None, "entries": {}}


def process_groups() -> dict:
    """This process's cache of process groups and meshes (key -> value), emptied when the default
    process group changes (destroyed and initialized again). Every rank must look up the same keys
    in the same order: a miss builds groups, which is collective."""
    world = dist.group.WORLD
    if _GROUPS["world"] is not world:
        _GROUPS["world"] = world
        _GROUPS["entries"] = {}
    return _GROUPS["entries"]


def init_process_group_from_env() -> tuple[int, int]:
    """Initialize torch.distributed from torchrun's environment (NCCL on CUDA, gloo on CPU) when
    WORLD_SIZE > 1 and it is not yet initialized. Returns (rank, world_size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def end_process(exit_code: int) -> int:
    """End a process that joined a process group, without the abort gloo can cause at exit.

    A gloo worker thread drops its reference to a finished collective's tensors after the caller
    has its result; when the tensor was made in Python, the drop takes the GIL. If the main thread
    reaches interpreter shutdown first, Python ends that thread with pthread_exit inside a noexcept
    C++ destructor (c10d ProcessGroupGloo runLoop -> ~AsyncWork -> decref_pyobject -> take_gil) and
    the process dies of SIGABRT ("terminate called without an active exception") after its work
    was done: a torchrun or Slurm job counted as failed, a test spawn seen crashing in 1 of 3 runs.
    So, after a success (exit_code 0, which every rank reaches): a barrier (every rank past its last
    collective) and the process groups destroyed; after a failure neither (the peers may be inside
    another collective, which a barrier would meet). Then under gloo: standard streams and logging
    flushed and os._exit(exit_code), which skips the interpreter's shutdown, where the race is (its
    atexit work is the flushing done here). Under NCCL, and without a process group, returns exit_code.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return exit_code
    gloo = dist.get_backend() == "gloo"
    if exit_code == 0:
        dist.barrier()
        dist.destroy_process_group()
        _GROUPS.update(world=None, entries={})
    if not gloo:
        return exit_code
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(exit_code)
