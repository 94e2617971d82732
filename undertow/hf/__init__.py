"""Hugging Face conversion: `undertow convert to-hf` / `from-hf`.

The generic machinery lives here (export.py: checkpoint -> config.json + model.safetensors +
tokenizer; import_.py: such a directory -> undertow checkpoint; tokenizer.py: SentencePiece ->
tokenizer.json). What a family's tensors and hyper-parameters are called on the Hugging Face
side is the family's business: its adapter, `models/<family>/hf.py`, named by the registry's
`ModelSpec.hf_adapter`. An adapter module provides

    HF_MODEL_TYPES                      the config.json `model_type`s it imports
    hf_architecture(cfg) -> str         the transformers class the config exports to, or
                                        HFConversionError saying why there is none
    to_hf(cfg, state_dict, special_ids) -> (config dict, {hf name: tensor})
    from_hf(config dict, {hf name: tensor}) -> (family config, state_dict)
    REMOTE_CODE or remote_code(cfg)     optional: the remote code (models/hf_remote.py) an export
                                        ships where no stock class fits (per config: None = stock)

This package imports neither transformers nor torch at import time (the CLI stays fast).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from undertow.models.hf_common import UNDERTOW_KEY, HFConversionError

__all__ = ["UNDERTOW_KEY", "HFConversionError", "adapter_for_family", "adapter_for_model_type"]


def adapter_for_family(family: str) -> ModuleType:
    """The registered HF adapter of `family` (models/<family>/hf.py), or HFConversionError."""
    from undertow.models import registry

    spec = registry.get(family)
    adapter = spec.hf_adapter
    if adapter is None:
        try:  # DESIGN.md: models/<family>/hf.py holds the mapping even before the spec names it
            adapter = importlib.import_module(f"undertow.models.{family}.hf")
        except ModuleNotFoundError:
            raise HFConversionError(f"model family {family!r} has no Hugging Face adapter") from None
    return adapter


def adapter_for_model_type(model_type: str) -> tuple[str, ModuleType]:
    """(family, adapter) that imports HF `model_type`, or HFConversionError listing what is supported."""
    from undertow.models import registry

    supported = {}
    for family in registry.families():
        try:
            adapter = adapter_for_family(family)
        except HFConversionError:
            continue
        for hf_type in adapter.HF_MODEL_TYPES:
            supported[hf_type] = (family, adapter)
    if model_type not in supported:
        raise HFConversionError(f"config.json model_type {model_type!r} cannot be imported; "
                                f"supported: {sorted(supported)}")
    return supported[model_type]
