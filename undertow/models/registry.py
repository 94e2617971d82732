"""Model families by name: the only place that knows which families exist.

pretrain/ and parallel/ look a family up here and use its ModelSpec; adding a family means
adding a folder under models/ and one `register(...)` call in `_register_builtin`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from undertow.configtools import ConfigError


@dataclass(frozen=True)
class ModelSpec:
    """What the framework needs to know about one model family.

    config_cls:      dataclass of the family's hyper-parameters, with `validate()`.
    model_cls:       nn.Module built as `model_cls(config)`; it must offer `init_weights()`
                     (so it can be built on the meta device and materialized later) and
                     `forward(input_ids, *, position_ids, doc_ids, cu_seqlens, max_seqlen) -> logits`.
    flops_per_token: (config, seq_len) -> training FLOPs per token (forward + backward), for MFU.
    layer_cost:      (config, seq_len) -> relative cost per layer (pipeline balancing), or None.
    plan:            the family's tensor/sequence-parallel plan module (models/<family>/plan.py:
                     block_styles, block_params; applied by parallel/tensor.py), or None.
    hf_adapter:      Hugging Face conversion module, or None.
    shape_limits:    (config) -> [(degree, what, size)]: the model dimensions a parallel degree
                     splits ("tp" must divide e.g. ("n_heads", 32)), for ParallelDims.validate and
                     the planner; or None (no limits known).
    state_elements:  (config) -> per layer, the elements (float32) of the recurrent state one
                     sequence carries across a split of its tokens (conv window + SSM state; 0
                     for layers without one), for the planner's context-parallel memory; or None.
    """

    name: str
    config_cls: type
    model_cls: type
    flops_per_token: Callable[[Any, int], float]
    layer_cost: Callable[[Any, int], list[float]] | None = None
    plan: Any = None
    hf_adapter: Any = None
    shape_limits: Callable[[Any], list[tuple[str, str, int]]] | None = None
    state_elements: Callable[[Any], list[int]] | None = None


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> None:
    if spec.name in _REGISTRY:
        raise ValueError(f"model family {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec


def families() -> list[str]:
    _register_builtin()
    return sorted(_REGISTRY)


def get(name: str, field_name: str = "family") -> ModelSpec:
    _register_builtin()
    if name not in _REGISTRY:
        raise ConfigError(f"{field_name} = {name!r} is not a known model family; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def family_of(config: Any) -> str:
    """The family name whose config class `config` is an instance of."""
    _register_builtin()
    for spec in _REGISTRY.values():
        if type(config) is spec.config_cls:
            return spec.name
    raise TypeError(f"{type(config).__name__} is not the config of a registered family")


def build_model(config: Any):
    """Instantiate the family's model (on the current default device; use `torch.device('meta')`)."""
    return get(family_of(config)).model_cls(config)


def build_model_from_state(config: Any, state: dict):
    """The family's model on the CPU holding `state` (parameter name -> tensor, cast to float32)
    exactly, for converters; ValueError when names or shapes do not fit `config`."""
    import torch

    with torch.device("meta"):
        model = build_model(config)
    model.to_empty(device="cpu")
    model.init_weights()  # ties shared weights again after to_empty; every tensor is then overwritten
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as e:
        raise ValueError(f"the weights do not fit the model of the config: {e}") from None
    return model


_BUILTIN_DONE = False


def _register_builtin() -> None:
    global _BUILTIN_DONE
    if _BUILTIN_DONE:
        return
    _BUILTIN_DONE = True
    from undertow.models.transformer import spec as transformer_spec

    register(transformer_spec.SPEC)
    from undertow.models.mamba import spec as mamba_spec

    register(mamba_spec.SPEC)
