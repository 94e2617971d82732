"""Model families by name: the only place that knows which families exist.

pretrain/ and parallel/ look a family up here and use its ModelSpec (model_spec.py). Families are
named by the module that holds their spec (`FAMILY_SPECS`), imported on first use, so this module
imports no family and no family imports it: adding a family means adding a folder under models/
with a `spec.py` that defines `SPEC`, and one line in `FAMILY_SPECS`.
"""

from __future__ import annotations

import importlib
from typing import Any

from undertow.configtools import ConfigError
from undertow.models.model_spec import ModelSpec

FAMILY_SPECS = {  # family name -> module whose SPEC describes it
    "transformer": "undertow.models.transformer.spec",
    "mamba": "undertow.models.mamba.spec",
    "xlstm": "undertow.models.xlstm.spec",
    "depth": "undertow.models.depth.spec",
    "pararnn": "undertow.models.pararnn.spec",
    "titans": "undertow.models.titans.spec",
}

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
    for name, module in FAMILY_SPECS.items():
        spec = importlib.import_module(module).SPEC
        if spec.name != name:
            raise ValueError(f"{module}.SPEC is named {spec.name!r}, registered as {name!r}")
        register(spec)
