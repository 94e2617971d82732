"""What `undertow plan RECIPE` prints first: size and cost of a recipe's model, without building it
for real.

The model is instantiated on the meta device through the registry (any family), so a 7B recipe
plans in a second on a laptop. The table gives parameters, training FLOPs per token at the
recipe's seq_len (the family's own count, the one MFU uses), the spread of its per-layer cost
(what the pipeline split balances) and the bytes of the weights. `model_facts` gathers what the
layout model (memory.py, layouts.py) needs about the same model.
"""

from __future__ import annotations

import dataclasses

import torch

from undertow.configtools import ConfigError
from undertow.models import registry
from undertow.models.profile import BASE_LEN, profile_model
from undertow.parallel.pipeline_split import stage_costs
from undertow.planning.memory import ModelFacts


@dataclasses.dataclass
class Plan:
    recipe: str
    family: str
    layers: int
    seq_len: int
    parameters: int
    embedding_parameters: int
    active_parameters: int  # per token: all but the experts a token is not routed to (= parameters without MoE)
    flops_per_token: float
    layer_flops: list[float] | None  # the family's per-layer cost (pipeline balancing), if it has one

    def rows(self) -> list[tuple[str, str]]:
        rows = [
            ("recipe", self.recipe),
            ("family", self.family),
            ("layers", str(self.layers)),
            ("parameters", f"{_si(self.parameters)} ({self.parameters:,})"),
            ("  of which embeddings/head", f"{_si(self.embedding_parameters)}"),
        ]
        if self.active_parameters != self.parameters:
            rows.append(("active parameters per token", f"{_si(self.active_parameters)} ({self.active_parameters:,})"))
        rows += [
            (f"training FLOPs/token @ seq_len {self.seq_len}", f"{self.flops_per_token:.3e}"),
        ]
        if self.layer_flops:
            rows.append(("  per layer, min .. max", f"{min(self.layer_flops):.3e} .. {max(self.layer_flops):.3e}"))
        return rows + [
            ("weights fp32", _bytes(4 * self.parameters)),
            ("weights bf16", _bytes(2 * self.parameters)),
        ]

    def table(self) -> str:
        rows = self.rows()
        left = max(len(k) for k, _ in rows)
        right = max(len(v) for _, v in rows)
        rule = f"+-{'-' * left}-+-{'-' * right}-+"
        lines = [rule] + [f"| {k:<{left}} | {v:>{right}} |" for k, v in rows] + [rule]
        return "\n".join(lines)


def _si(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def _bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def resolve_vocab(cfg) -> None:
    """vocab_size = 0 means 'from the tokenizer': known without preparing data only for the
    embedded corpus (its tokenizer has data.embedded_vocab_size pieces)."""
    if cfg.model.vocab_size:
        return
    if cfg.data.sources == ["embedded"]:
        cfg.model.vocab_size = cfg.data.embedded_vocab_size
        return
    raise ConfigError(
        "model.vocab_size = 0 (from the tokenizer) cannot be planned without the data's tokenizer; "
        "give the size, e.g. --model.vocab_size 32000"
    )


def make_plan(recipe: str | None, overrides: list[str] | None = None) -> Plan:
    """Load the recipe (with overrides), build its model on the meta device, measure it."""
    from undertow.pretrain.config import DEFAULT_RECIPE, load_config

    cfg = load_config(recipe, overrides)
    resolve_vocab(cfg)
    spec = registry.get(cfg.family)
    with torch.device("meta"):
        model = spec.model_cls(cfg.model)
    unique = {id(p): p for p in model.parameters()}.values()  # tied weights once
    embedding_ids = {id(p) for name, p in model.named_parameters() if name.split(".")[0] in ("embed", "lm_head")}
    # modules that hold weights a token does not use (MoE layers: the experts it is not routed to)
    inactive = sum(m.inactive_parameters() for m in model.modules() if hasattr(m, "inactive_parameters"))
    return Plan(
        recipe=recipe or DEFAULT_RECIPE,
        family=cfg.family,
        layers=len(model.layers),
        seq_len=cfg.data.seq_len,
        parameters=sum(p.numel() for p in unique),
        embedding_parameters=sum(p.numel() for p in unique if id(p) in embedding_ids),
        active_parameters=sum(p.numel() for p in unique) - inactive,
        flops_per_token=spec.flops_per_token(cfg.model, cfg.data.seq_len),
        layer_flops=spec.layer_cost(cfg.model, cfg.data.seq_len) if spec.layer_cost else None,
    )


def model_facts(cfg, seq_len: int, compute_dtype: torch.dtype, base_len: int = BASE_LEN) -> ModelFacts:
    """Everything the layout model needs about the recipe's model, from the registry and a meta
    profile (measured at base_len and 2 * base_len tokens, see models/profile.py)."""
    spec = registry.get(cfg.family)
    profile = profile_model(spec.model_cls, cfg.model, compute_dtype, base_len, fused_loss=cfg.training.fused_loss)
    n = len(profile.blocks)
    experts, n_experts, routed = expert_facts(spec.model_cls, cfg.model)
    return ModelFacts(
        profile=profile,
        flops_per_token=spec.flops_per_token(cfg.model, seq_len),
        stage_costs=stage_costs(spec, cfg.model, seq_len),
        state_elements=spec.state_elements(cfg.model) if spec.state_elements else [0] * n,
        shape_limits=spec.shape_limits(cfg.model) if spec.shape_limits else [],
        expert_elements=experts,
        n_experts=n_experts,
        routed_per_token=routed,
        context_limits=cfg.model.context_limits(seq_len) if hasattr(cfg.model, "context_limits") else [],
    )


def expert_facts(model_cls, model_config) -> tuple[list[int], int, int]:
    """(expert weight elements per block ([] without MoE layers), experts per layer, activation
    elements a token sends to its experts summed over the MoE layers (top_k x d_model each)), from
    a meta build and the layers' expert-parallel hook (`expert_parallel_plan`)."""
    with torch.device("meta"):
        model = model_cls(model_config)
    per_block, n_experts, routed = [], 0, 0
    for block in model.layers:
        elements = 0
        for m in block.modules():
            if callable(getattr(m, "expert_parallel_plan", None)):
                n_experts, names = m.expert_parallel_plan()
                weights = [getattr(m, name) for name in names]
                elements += sum(w.numel() for w in weights)
                routed += m.cfg.top_k * weights[0].shape[1]
        per_block.append(elements)
    return (per_block if n_experts else []), n_experts, routed
