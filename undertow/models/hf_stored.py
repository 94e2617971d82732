"""The exact round trip of a remote-code export (models/hf_remote.py): config.json carries our whole
model config under UNDERTOW_KEY beside the remote config's fields, and model.safetensors our own
parameter names (the remote model has our module tree), a tied head written once.

    to_hf_stored(family, cfg, fields, state_dict)      -> (config.json dict, {name: tensor})
    from_hf_stored(config, tensors, family, config_cls, hf_config, model_types, parse=None)
                                                       -> (our config, our state dict, float32)

`fields` is the family's hf_config(cfg, special_ids): what the remote model computes with. Import
refuses a directory without our stored config, or whose fields disagree with it (edited by hand).
`parse` turns the stored dict into the config where config_cls(**stored) cannot (nested dataclasses:
the transformer's MoE block goes through configtools.from_dict). Nothing here imports anything of
undertow but hf_common.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from undertow.models.hf_common import (UNDERTOW_KEY, HFConversionError, check_model_type, store_config,
                                       stored_config, without_tied_head)


def to_hf_stored(family: str, cfg, fields: dict, state_dict: dict) -> tuple[dict, dict]:
    return store_config(dict(fields), family, cfg), without_tied_head(state_dict, cfg.tie_embeddings)


def from_hf_stored(config: dict, tensors: dict, family: str, config_cls, hf_config: Callable,
                   model_types: tuple, parse: Callable[[dict], object] | None = None) -> tuple:
    check_model_type(config, model_types)
    stored = stored_config(config)
    names = {f.name for f in dataclasses.fields(config_cls)}
    # with `parse`, unknown or mistyped stored fields are its to report (from_dict names them)
    if not stored or not (parse is not None or set(stored) <= names):
        raise HFConversionError(f"config.json has no undertow {family} config under {UNDERTOW_KEY!r} (only "
                                "directories written by `undertow convert to-hf` import)")
    cfg = parse(stored) if parse is not None else config_cls(**stored)
    cfg.validate()
    changed = sorted(k for k, v in hf_config(cfg, {}).items() if config.get(k) != v)
    if changed:
        raise HFConversionError(f"config.json's {changed} disagree with its stored undertow config; "
                                "edit neither by hand")
    state = dict(tensors)
    if cfg.tie_embeddings:
        if "embed.weight" not in state:
            raise HFConversionError("the weights have no embed.weight")
        state["lm_head.weight"] = state["embed.weight"]
    return cfg, {name: t.to(torch.float32) for name, t in state.items()}
