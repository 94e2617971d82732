"""DeepSpeed ZeRO-1/2/3 as the data-parallel engine (`parallel.engine = "deepspeed"`).

An alternative to FSDP2 that shares the trainer, the loader, the metrics and the checkpoint
format. The materialized model and our AdamW (same parameter groups and hyperparameters) are
handed to `deepspeed.initialize`; the returned engine replaces the model, and a `ZeroOptimizer`
adapter replaces the optimizer in the trainer:

    trainer                          DeepSpeed
    self.model(...)                  engine(...)  (ZeRO-3 gathers each module's parameters)
    self.optimizer.backward(loss)    engine.backward(loss), the last micro-batch of the step
                                     marked as the accumulation boundary (gradients reduced)
    self.optimizer.clip_and_step()   engine.step(): global norm, clip to training.grad_clip,
                                     AdamW on this rank's partition (skipped if non-finite)
    group["lr"] = lr                 the learning rate of the next step (set before it)
    checkpoint save / load           our DCP format, full tensors keyed like a single process

Gradients: DeepSpeed averages them over the data-parallel ranks, like FSDP2, so the trainer's
`grad_scale` (each rank's loss times dp) applies unchanged; the loss is already the mean over the
step's labels, so the engine does not divide it by the accumulation steps again.

Precision: DeepSpeed keeps float32 weights, gradients and AdamW states (its fp32 mode); with
training.dtype = bfloat16 (auto on CUDA) the trainer's autocast computes in bfloat16 around the
engine, as under FSDP2. DeepSpeed's own bf16 mode (bf16 weights, gathered and reduced in bf16)
is not used: ZeRO-3 gathers float32 weights, twice FSDP2's bf16 all-gather traffic.

Checkpoints are written in our format (see pretrain/checkpoint.py), not DeepSpeed's: the full
float32 master weights and AdamW moments of every parameter are gathered one parameter at a time
(`deepspeed.utils.safe_get_full_*`) and saved by name, so a run resumes under FSDP2, one process
or DeepSpeed at any stage and world size, and DeepSpeed resumes FSDP2 checkpoints. Each rank keeps
the full tensors of every world_size-th parameter until DCP has written them.

In this version the engine covers data parallelism only (tp = pp = cp = 1, dp_replicate = 1:
ZeRO partitions over every rank).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings

import torch
import torch.distributed as dist
from torch import nn

from undertow.log import get_logger

log = get_logger("undertow.parallel.deepspeed")
INSTALL_HINT = "pip install 'undertow[deepspeed]'"
OPTIMIZER_KEYS = ("exp_avg", "exp_avg_sq")  # AdamW's per-parameter states besides "step"
LOAD_CHUNK_ELEMENTS = 2**28  # full values read at a time when loading a checkpoint (1 GiB in float32)


def deepspeed_available() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def import_deepspeed(device: torch.device):
    """Import DeepSpeed, pointing it at the CPU accelerator when training on CPU (DS_ACCELERATOR
    must be set before the import; an explicit setting is kept)."""
    if not deepspeed_available():
        raise RuntimeError(f"parallel.engine = 'deepspeed' needs DeepSpeed: {INSTALL_HINT}")
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its config dump and per-step lines
    return deepspeed


def deepspeed_config(cfg, device: torch.device, n_params: int) -> dict:
    """The DeepSpeed config dict of an ExperimentConfig (n_params: the model's parameter count)."""
    t, p = cfg.training, cfg.parallel
    # communication buckets: DeepSpeed's default (5e8 elements, allocated up front), or the whole
    # model when it is smaller
    bucket = int(min(5e8, n_params))
    zero: dict = {"stage": p.zero_stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    if p.zero_offload:
        pin = device.type == "cuda"
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
        if p.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    config = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "gradient_clipping": t.grad_clip,  # 0: no clipping (the norm is still measured)
        "zero_optimization": zero,
        # our torch AdamW also with the optimizer offloaded to CPU (DeepSpeedCPUAdam needs a C++ build)
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    return config


def build_deepspeed(model: nn.Module, optimizer: torch.optim.Optimizer, cfg,
                    device: torch.device) -> tuple[nn.Module, ZeroOptimizer]:
    """Hand `model` (materialized, the same weights on every rank) and `optimizer` (our AdamW over
    it) to DeepSpeed. Returns (engine, adapter): the engine is called like the model, the adapter
    takes the optimizer's place in the trainer."""
    deepspeed = import_deepspeed(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():  # one process (e.g. ZeRO-Offload on one GPU): DeepSpeed needs a group
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed asserts a launcher's variable
    names = _param_names(model)
    group_names = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    config = deepspeed_config(cfg, device, n_params)
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                                      dist_init_required=False)
    log.info("DeepSpeed ZeRO-%d over %d ranks%s (DeepSpeed %s)", cfg.parallel.zero_stage, _world(),
             ", optimizer states offloaded to CPU" + (" with the parameters" if cfg.parallel.zero_stage == 3 else "")
             if cfg.parallel.zero_offload else "", deepspeed.__version__)
    adapter = ZeroOptimizer(engine, ds_optimizer, names, group_names, cfg.training.grad_accum_steps)
    engine.full_state = adapter  # what pretrain/checkpoint.py saves and loads instead of get_state_dict
    return engine, adapter


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _param_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> its first name (a tied parameter is named once, as in get_state_dict)."""
    names: dict[int, str] = {}
    for name, p in model.named_parameters():
        names.setdefault(id(p), name)
    return names


class ZeroOptimizer:
    """Takes the optimizer's place in the trainer for a DeepSpeed engine (see the module doc)."""

    def __init__(self, engine, ds_optimizer, names: dict[int, str], group_names: list[list[str]],
                 grad_accum_steps: int):
        self.engine = engine
        self.ds_optimizer = ds_optimizer
        self.names = names
        self.group_names = group_names  # AdamW's groups by parameter name (DeepSpeed flattens them)
        self.grad_accum_steps = grad_accum_steps
        self._micro = 0  # backward passes since the last step
        self._stepped = False

    # ----------------------------------------------------------------- the trainer's surface
    @property
    def param_groups(self) -> list[dict]:
        """AdamW's parameter groups (over DeepSpeed's flat partitions): set group["lr"] here."""
        return self.ds_optimizer.param_groups

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's (already scaled) loss; the step's last one reduces."""
        self._micro += 1
        self.engine.set_gradient_accumulation_boundary(self._micro == self.grad_accum_steps)
        self.engine.backward(loss, scale_wrt_gas=False)

    def clip_and_step(self) -> torch.Tensor:
        """DeepSpeed's step: the global gradient norm, clipping, AdamW (skipped when the norm is
        not finite). Returns the norm before clipping (inf when the step was skipped)."""
        if self._micro != self.grad_accum_steps:
            raise RuntimeError(f"{self._micro} backward passes before a step; DeepSpeed was configured for "
                               f"{self.grad_accum_steps} (training.grad_accum_steps)")
        self.engine.step()
        self._micro = 0
        self._stepped = True
        norm = self.engine.get_global_grad_norm()
        if not self.engine.was_step_applied():
            norm = float("inf")
        return torch.tensor(float("nan") if norm is None else float(norm))

    def step(self) -> None:
        """Nothing left to do: `clip_and_step` already stepped (DeepSpeed measures, clips and
        steps in one call, so the trainer sets the learning rate before the step's backward)."""
        if not self._stepped:
            raise RuntimeError("ZeroOptimizer.step() before clip_and_step()")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """DeepSpeed released the gradients in its step (also a skipped one)."""
        self._stepped = False

    # ----------------------------------------------------------------- checkpoints
    def _unique_params(self) -> list[tuple[str, nn.Parameter]]:
        return [(name, p) for name, p in self.engine.module.named_parameters() if self.names.get(id(p)) == name]

    def _full_param(self, p: nn.Parameter) -> torch.Tensor:
        """The full float32 value of a parameter (collective under ZeRO)."""
        from deepspeed.utils import safe_get_full_fp32_param

        value = safe_get_full_fp32_param(p)
        if value is None:  # a frozen parameter has no master copy
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
                value = p.detach().float().clone()
        return value

    def _flat_partitions(self) -> list[tuple[dict, torch.Tensor]]:
        """(AdamW parameter group, flat float32 partition) for each partition this rank steps: the
        torch AdamW inside DeepSpeed keeps its states by these."""
        opt = self.ds_optimizer
        groups = opt.optimizer.param_groups
        if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3: sub-groups of the parameter groups
            flats = opt.fp32_partitioned_groups_flat
            return [(groups[opt.sub_group_to_group_id[i]], flat) for i, flat in enumerate(flats)]
        return list(zip(groups, opt.single_partition_of_fp32_groups, strict=True))

    def _ensure_optimizer_states(self) -> None:
        """AdamW creates its states at its first step: before it, create them as it would (zeros at
        step 0, which steps the same), so they can be loaded. And DeepSpeed (ZeRO-1/2) links each
        parameter to its slice of the states once, after the first group's first step, missing the
        later groups: link them again now that every group has states."""
        basic = self.ds_optimizer.optimizer
        for group, flat in self._flat_partitions():
            state = basic.state[flat]
            if "step" not in state:
                on_device = group.get("fused") or group.get("capturable")
                state["step"] = torch.zeros((), dtype=torch.float32, device=flat.device if on_device else "cpu")
            for key in OPTIMIZER_KEYS:
                if key not in state:
                    state[key] = torch.zeros_like(flat, memory_format=torch.preserve_format)
        if hasattr(self.ds_optimizer, "_lazy_init_hp_params_optimizer_state"):
            self.ds_optimizer._hp_optimizer_states_linked = False
            self.ds_optimizer._lazy_init_hp_params_optimizer_state()

    def _step_count(self) -> torch.Tensor:
        """AdamW's step counter (all of DeepSpeed's flat groups step together)."""
        state = self.ds_optimizer.optimizer.state[self._flat_partitions()[0][1]]
        return torch.as_tensor(state["step"], dtype=torch.float32).detach().cpu().clone()

    def checkpoint_state(self) -> tuple[dict, dict]:
        """(model, optimizer) state dicts as get_state_dict(model, AdamW) gives them in one process:
        full tensors keyed by parameter name. Collective. Parameter i is kept by rank i % world
        (the others drop it after gathering), so DCP writes each tensor once."""
        from deepspeed.utils import safe_get_full_optimizer_state

        rank, world = _rank(), _world()
        module = self.engine.module
        model_sd: dict[str, torch.Tensor] = {}
        optim_state: dict[str, dict] = {}
        full: dict[int, torch.Tensor] = {}
        self._ensure_optimizer_states()
        step = self._step_count()
        for i, (name, p) in enumerate(self._unique_params()):
            value = self._full_param(p)
            moments = {key: safe_get_full_optimizer_state(p, key) for key in OPTIMIZER_KEYS} if p.requires_grad else {}
            if i % world == rank:
                full[id(p)] = value.cpu()
                if all(m is not None for m in moments.values()) and moments:
                    optim_state[name] = {"step": step.clone(), **{k: m.cpu() for k, m in moments.items()}}
        for key, value in module.state_dict(keep_vars=True).items():
            if isinstance(value, nn.Parameter):
                if id(value) in full:
                    model_sd[key] = full[id(value)]
            elif rank == 0:
                model_sd[key] = value.detach().cpu().clone()  # buffers: the same on every rank
        groups = [{**{k: v for k, v in group.items() if k != "params" and not k.startswith("_")}, "params": names}
                  for group, names in zip(self.param_groups, self.group_names, strict=True)]
        return model_sd, {"state": optim_state, "param_groups": groups}

    @torch.no_grad()
    def load(self, path: str, with_optimizer: bool) -> None:
        """Load a checkpoint directory of our format (written under any engine and layout) into the
        engine: the module's weights, DeepSpeed's float32 master partitions and, with_optimizer,
        the AdamW states. Every rank reads the full tensors of a few parameters at a time (about
        LOAD_CHUNK_ELEMENTS values with their moments) and keeps its partitions. Collective."""
        import deepspeed
        import torch.distributed.checkpoint as dcp
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        module = self.engine.module
        buffers = {k: v for k, v in module.state_dict(keep_vars=True).items() if not isinstance(v, nn.Parameter)}
        if buffers:
            state = {"model": {k: torch.empty_like(v, device="cpu") for k, v in buffers.items()}}
            _dcp_load(dcp, state, path)
            for key, value in buffers.items():
                value.copy_(state["model"][key])
        if with_optimizer:
            self._ensure_optimizer_states()
        step = None
        for chunk in self._chunks(LOAD_CHUNK_ELEMENTS // (3 if with_optimizer else 1)):
            model_sd, optim_state = {}, {}
            for name, p in chunk:
                shape = getattr(p, "ds_shape", None) or p.shape
                model_sd[name] = torch.empty(shape, dtype=torch.float32)
                if with_optimizer and p.requires_grad:
                    optim_state[name] = {"step": torch.tensor(0.0),
                                         **{k: torch.empty(shape, dtype=torch.float32) for k in OPTIMIZER_KEYS}}
            state = {"model": model_sd, "optim": {"state": optim_state}} if optim_state else {"model": model_sd}
            _dcp_load(dcp, state, path)
            for name, p in chunk:
                full = model_sd[name]
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=hasattr(p, "ds_id")):
                    p.data.copy_(full.view_as(p.data))
                if p.requires_grad:
                    safe_set_full_fp32_param(p, full.to(p.device))
                if name in optim_state:
                    step = optim_state[name]["step"]
                    for key in OPTIMIZER_KEYS:
                        safe_set_full_optimizer_state(p, optim_state[name][key].to(p.device), key)
        if step is not None:
            for _, flat in self._flat_partitions():
                self.ds_optimizer.optimizer.state[flat]["step"].fill_(float(step))

    def _chunks(self, max_elements: int) -> list[list[tuple[str, nn.Parameter]]]:
        """The parameters in groups of about max_elements values (at least one parameter each)."""
        chunks, current, size = [], [], 0
        for name, p in self._unique_params():
            numel = getattr(p, "ds_numel", None) or p.numel()
            if current and size + numel > max_elements:
                chunks.append(current)
                current, size = [], 0
            current.append((name, p))
            size += numel
        return chunks + [current] if current else chunks


def _dcp_load(dcp, state: dict, path: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns when it runs without a process group
        dcp.load(state, checkpoint_id=path)
